"""Top eigenpairs of a batch of symmetric positive semi-definite matrices, optionally warm-started.

Public call: :func:`top_eigenpairs` ``(C, rank, start=None) -> (values, vectors, basis)``. Used by
PEFT's EVA on our engine (:mod:`corda_kernels.integrations.peft_eva`), which needs the top
eigenvectors of every layer's running input covariance after every batch: the covariance changes
little from one batch to the next, so the previous basis is an excellent start.

Method: without a start (or when the matrix is small next to the basis width) an exact ``eigh``
of the top ``p`` eigenpairs only (:func:`~corda_kernels.linalg._eigh.eigh_range`). With a start
``Q`` (``(..., d, p)``, ``p > rank`` columns): subspace iteration ``Q <- qr(C Q)`` with a
Rayleigh-Ritz step each time (``eigh`` of the ``p x p`` projection, in fp64), until every one of
the top ``rank`` Ritz pairs has a residual ``||C v - θ v|| <= tol · θ_1``; matrices that do not get
there in ``max_iter`` steps get the exact ``eigh``. A residual ``ε`` bounds the eigenvalue error
by ``ε`` (``ε² / gap`` in practice) and the angle of the eigenvector by ``ε / gap``.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._eigh import eigh_range

# Relative residual (to the largest eigenvalue) accepted per Ritz pair; fp32 products reach ~1e-6.
TOL = 1e-5
MAX_ITER = 48
MIN_GUARD = 16  # extra basis columns beyond rank (the convergence ratio is θ_{p+1} / θ_rank)


def basis_width(rank: int, d: int) -> int:
    """Columns of the warm-start basis for ``rank`` eigenpairs of a ``d x d`` matrix."""
    return min(d, rank + max(rank, MIN_GUARD))


def _full(C: torch.Tensor, rank: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values, vectors = eigh_range(C, C.shape[-1] - width, width)
    values, vectors = values.flip(-1), vectors.flip(-1)
    return values[..., :rank].contiguous(), vectors[..., :rank].contiguous(), vectors[..., :width].contiguous()


def top_eigenpairs(
    C: torch.Tensor,
    rank: int,
    start: Optional[torch.Tensor] = None,
    *,
    tol: float = TOL,
    max_iter: int = MAX_ITER,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` largest eigenpairs of each symmetric PSD matrix of ``C``.

    Args:
        C: ``(..., d, d)`` fp32 or fp64, symmetric.
        rank: ``1..d``.
        start: optional ``(..., d, p)`` basis to start from (e.g. the ``basis`` of the previous
            call), ``rank < p <= d``; ``None`` runs the exact ``eigh``.
        tol: accepted residual ``||C v - θ v||`` relative to the largest eigenvalue.
        max_iter: subspace iterations before a matrix falls back to a full ``eigh``.

    Returns:
        ``values (..., rank)`` descending, ``vectors (..., d, rank)`` (orthonormal columns) and
        ``basis (..., d, p)`` (``p = basis_width(rank, d)`` or the start's width) to warm-start the
        next call, all in ``C``'s dtype.
    """
    d = C.shape[-1]
    width = start.shape[-1] if start is not None else basis_width(rank, d)
    if start is None or width >= d or 2 * width >= d or width <= rank:
        return _full(C, rank, basis_width(rank, d) if start is None else width)
    batch = C.shape[:-2]
    Cb = C.reshape(-1, d, d)
    Q = torch.linalg.qr(start.reshape(-1, d, width).to(C.dtype)).Q
    values = torch.empty(Cb.shape[0], width, dtype=C.dtype, device=C.device)
    vectors = torch.empty(Cb.shape[0], d, width, dtype=C.dtype, device=C.device)
    todo = torch.arange(Cb.shape[0], device=C.device)
    for _ in range(max_iter):
        Z = Cb[todo] @ Q
        H = (Q.mT @ Z).double()
        theta, Y = torch.linalg.eigh((H + H.mT) / 2)
        theta, Y = theta.flip(-1), Y.flip(-1).to(C.dtype)
        V = Q @ Y
        R = Z @ Y - V * theta.to(C.dtype)[:, None, :]
        residual = R[..., :rank].norm(dim=-2)
        ok = (residual <= tol * theta[:, :1].abs().to(C.dtype)).all(-1)
        values[todo[ok]] = theta[ok].to(C.dtype)
        vectors[todo[ok]] = V[ok]
        todo, Z = todo[~ok], Z[~ok]
        if todo.numel() == 0:
            break
        Q = torch.linalg.qr(Z).Q
    if todo.numel():
        v, _, basis = _full(Cb[todo], width, width)
        values[todo], vectors[todo] = v, basis
    values = values.reshape(*batch, width)
    vectors = vectors.reshape(*batch, d, width)
    return values[..., :rank].contiguous(), vectors[..., :rank].contiguous(), vectors
