"""Exact singular triplets of a batch of matrices: the largest r (a full SVD cropped) and the
smallest r, accurately (fp64), also when ill-conditioned.

Public calls: :func:`largest_singular_triplets` ``(A, rank)`` (PiSSA with ``svd="exact"``, the
exact reference of :func:`~corda_kernels.linalg.randomized_svd.randomized_svd`) and
:func:`smallest_singular_triplets` ``(A, rank)`` (knowledge-preserved CorDA, MiLoRA, SiVA), each
returning ``(U, S, Vh)``. Pure torch, batched over leading dims (cuSOLVER/cuBLAS through
``torch.linalg`` on a GPU).

Why not the Gram matrix alone: the eigenvalues of ``G = A^T A`` are ``σ_i²`` and a symmetric
eigensolver gets them to an absolute error of about ``eps · σ_max²``, i.e. ``σ_i`` to a relative
error of about ``eps · κ_i²`` where ``κ_i = σ_max / σ_i``. In fp32 (``eps = 6e-8``) every ``σ``
below ``~2.4e-4 σ_max`` is noise: at ``κ = 1e6`` the bottom values come out wrong by orders of
magnitude (negative eigenvalues, even). In fp64 (``eps = 1.1e-16``) the same bound reaches 1 at
``κ = 1e8``, and the Gram eigenvectors of a cluster of small ``σ`` are mixed with their neighbours
by ``eps · σ_max² / (σ_j² - σ_i²)``, which a Rayleigh–Ritz step on ``A`` cannot undo: on a
geometric spectrum of condition ``1e8`` the Gram + Rayleigh–Ritz bottom values are off by
3-4% (``bench/studies/exact_svd_accuracy.py``).

Method (all fp64; ``A`` made tall, ``p x k`` with ``p >= k``, by transposing when wide):

1. ``G = R^T R`` from ``A = QR`` (``= A^T A`` to rounding, cheaper for a tall ``A``), ``eigh(G)``
   (only the wanted range: ``_eigh.eigh_range``): the
   ``b = min(k, r + guard)`` smallest eigenvectors ``Z``
   (``guard = max(32, r)`` extra columns), a start already close to the bottom subspace.
2. Three steps of inverse subspace iteration with the triangular factor of ``A = QR`` (never
   ``G``): ``Z <- qr(R^{-1} R^{-T} Z)``. Triangular solves are backward stable, so this converges
   to the bottom subspace of ``A + E`` with ``||E|| = O(eps ||A||)`` -- the accuracy of a full SVD
   -- and the guard columns make each step shrink the error by ``(σ_r / σ_{b+1})²`` at least.
   (On a geometric spectrum of condition 1e8, 200 values, 2 steps with 16 guard columns left the
   left/right vectors 3e-5 off; 2 steps with 32 reach the fp64 SVD's own accuracy; 3 is margin.)
   Diagonal entries of ``R`` below ``k · eps · max|R_ii|`` are raised to that floor (a backward
   perturbation of the same size), so exactly singular matrices are fine.
3. Rayleigh–Ritz: ``svd(A Z) = Ũ Σ W^T``; the last ``r`` columns give ``U = Ũ``, ``S = Σ``,
   ``V = Z W``.

The singular values then carry an absolute error of ``O(eps · σ_max)`` (relative ``1e-9`` at
``κ = 1e8``), like ``torch.linalg.svd`` in fp64, for about the cost of one ``eigh`` of the
``k x k`` Gram matrix plus one QR of ``A``.
"""

from __future__ import annotations

import torch

from ._checks import check_finite, check_matrix, check_rank, compute_dtype
from ._eigh import eigh_range
from ._products import gram_lower

INVERSE_ITERATIONS = 3
MIN_GUARD = 32


def crop_svd(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` triplets of ``torch.linalg.svd(A)`` (no checks; ``A`` in its compute dtype)."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[..., :rank].contiguous(), S[..., :rank].contiguous(), Vh[..., :rank, :].contiguous()


def largest_singular_triplets(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` largest singular triplets of every matrix in ``A`` by a full SVD.

    The exact counterpart of :func:`corda_kernels.randomized_svd` (PiSSA's ``svd="exact"``).

    Args:
        A: ``(..., m, n)`` bf16/fp16/fp32 (computed in fp32) or fp64.
        rank: ``r`` in ``1..min(m, n)``.

    Returns:
        ``U (..., m, r)``, ``S (..., r)`` descending, ``Vh (..., r, n)`` in the compute dtype.

    Raises:
        TypeError: ``A`` is not a float tensor.
        ValueError: ``A`` is not ``(..., m, n)``, is empty, or ``rank`` is outside ``1..min(m, n)``.
        FloatingPointError: ``A`` holds NaN or Inf.
    """
    op = "largest_singular_triplets"
    check_matrix(A, op)
    check_rank(rank, A.shape, op)
    check_finite(A, op)
    return crop_svd(A.to(compute_dtype(A)), rank)


def _bottom_subspace(T: torch.Tensor, rank: int) -> torch.Tensor:
    """Orthonormal ``(..., k, b)`` basis close to the bottom right singular subspace of tall ``T``."""
    k = T.shape[-1]
    width = min(k, rank + max(MIN_GUARD, rank))
    if width == k:  # the whole space: Rayleigh–Ritz alone is an exact SVD
        return eigh_range(gram_lower(T), 0, width)[1]
    R = torch.linalg.qr(T, mode="r").R
    # RᵀR is TᵀT to rounding (QR is backward stable): k³ flops instead of p·k² for the start.
    Z = eigh_range(gram_lower(R), 0, width)[1]
    diag = R.diagonal(dim1=-2, dim2=-1)
    floor = (k * torch.finfo(T.dtype).eps) * diag.abs().amax(dim=-1, keepdim=True)
    sign = torch.where(diag < 0, -1.0, 1.0).to(T.dtype)
    R = R.clone()
    R.diagonal(dim1=-2, dim2=-1).copy_(torch.where(diag.abs() < floor, sign * floor, diag))
    for _ in range(INVERSE_ITERATIONS):
        Y = torch.linalg.solve_triangular(R.mT, Z, upper=False)
        Z = torch.linalg.qr(torch.linalg.solve_triangular(R, Y, upper=True)).Q
    return Z


def smallest_singular_triplets(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``rank`` smallest singular triplets of every matrix in ``A``.

    Args:
        A: ``(..., m, n)`` float tensor (bf16/fp16/fp32/fp64); computed in fp64 whatever its dtype.
        rank: ``r`` in ``1..min(m, n)``.

    Returns:
        ``U (..., m, r)``, ``S (..., r)``, ``Vh (..., r, n)``, fp32 (fp64 for fp64 ``A``), with
        ``S`` in descending order, so that they equal the last ``r`` triplets of
        ``torch.linalg.svd(A)`` (columns up to sign, where the singular values are distinct).
        The singular values are accurate to ``O(eps_fp64 · σ_max)`` absolute (see the module doc).

    Raises:
        TypeError: ``A`` is not a float tensor.
        ValueError: ``A`` is not ``(..., m, n)``, is empty, or ``rank`` is outside ``1..min(m, n)``.
        FloatingPointError: ``A`` holds NaN or Inf.
    """
    op = "smallest_singular_triplets"
    check_matrix(A, op)
    check_rank(rank, A.shape, op)
    check_finite(A, op)
    return smallest_triplets(A, rank)


def smallest_triplets(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`smallest_singular_triplets` without its checks (for callers that made them)."""
    out_dtype = compute_dtype(A)
    m, n = A.shape[-2:]
    A = A.to(torch.float64)
    transpose = m < n
    T = A.mT if transpose else A  # (..., p, k), p >= k
    Z = _bottom_subspace(T, rank)
    Ut, S, Wh = torch.linalg.svd(T @ Z, full_matrices=False)
    U, S, V = Ut[..., -rank:], S[..., -rank:], Z @ Wh[..., -rank:, :].mT
    if transpose:
        U, V = V, U
    return U.to(out_dtype).contiguous(), S.to(out_dtype).contiguous(), V.mT.to(out_dtype).contiguous()
