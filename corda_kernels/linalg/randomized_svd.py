"""Batched randomized SVD (top-r singular triplets) with power iterations.

Public call: :func:`randomized_svd` ``(A, rank, *, oversample=None, n_iter=None, seed=0,
generator=None) -> (U, S, Vh)``. Pure torch: on a GPU the matmuls run on cuBLAS and the QR/SVD
factorizations on cuSOLVER through ``torch.linalg``; every step is batched over leading dims.
Accuracy of the defaults, measured: ``bench/results/RESULTS_decompose.md``.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._checks import check_finite, check_matrix, check_rank, compute_dtype
from .exact_svd import crop_svd

# Real weights have flat spectra, and a wide sketch converges in fewer (sequential) iterations
# (bench/studies/tune_randomized_svd.py).
MIN_OVERSAMPLE = 96
DEFAULT_N_ITER = 10
# Cost model for choosing the exact SVD: the randomized method makes 2q + 2 passes over A with l
# columns (~4 (q + 1) m n l flops), a divide-and-conquer SVD ~EXACT_COST m n k (CPU break-even at
# l/k = 0.22 with q = 10).
EXACT_COST = 10.0


def default_oversample(rank: int) -> int:
    """``max(96, 2 r)`` extra sketch columns (the measured default)."""
    return max(MIN_OVERSAMPLE, 2 * rank)


def randomized_svd(
    A: torch.Tensor,
    rank: int,
    *,
    oversample: Optional[int] = None,
    n_iter: Optional[int] = None,
    seed: Union[int, Sequence[int]] = 0,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``rank`` singular triplets of every matrix in ``A``, by randomized subspace iteration.

    Args:
        A: ``(..., m, n)`` bf16/fp16/fp32 (computed in fp32) or fp64 (computed in fp64); any strides.
        rank: ``r`` in ``1..min(m, n)``.
        oversample: extra sketch columns ``p`` (default ``max(96, 2 r)``); the sketch has
            ``l = min(r + p, min(m, n))`` columns.
        n_iter: power (subspace) iterations ``q`` (default 10); each multiplies by ``A A^T`` once
            and re-orthonormalizes (QR) after both products.
        seed: seeds a generator on ``A``'s device (ignored when ``generator`` is given); or one seed
            per matrix (flattened batch order), so that each matrix's sketch, hence its result,
            does not depend on the batch it is computed in.
        generator: the source of the Gaussian sketch, on ``A``'s device.

    Returns:
        ``U (..., m, r)``, ``S (..., r)`` descending, ``Vh (..., r, n)``, in the compute dtype, so that
        ``U @ diag(S) @ Vh`` is the rank-``r`` approximation ``Q Q^T A`` truncated to ``r``.

    Algorithm (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1), on the side that makes the
    orthonormalized basis the shorter one (``M = A`` when ``m <= n``, else ``M = A^T``):
    ``Q = qr(M Ω)``; ``q`` times ``Q = qr(M qr(M^T Q))``; then ``svd(Q^T M)``. Every matrix of the
    batch gets its own independent Gaussian sketch ``Ω``, drawn in one call, so the result is
    deterministic for a given ``seed``, batch shape and device. When the passes would cost more than
    a full SVD (``4 (q + 1) l > EXACT_COST · min(m, n)``; e.g. l > 0.23 min(m, n) at q = 10,
    measured on CPU) the exact SVD is returned instead: more accurate for less.

    Accuracy: relative excess error ``(||A - A_r||_F - ||A - A*_r||_F) / ||A - A*_r||_F <= 1e-4`` on real
    weights, CorDA's ``W C_d`` and power-law spectra at ranks 8..128; on nearly degenerate top-r
    subspaces (very flat spectra) convergence is slow: pass a larger ``n_iter``.
    """
    op = "randomized_svd"
    check_matrix(A, op)
    check_rank(rank, A.shape, op)
    for label, value in (("oversample", oversample), ("n_iter", n_iter)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{op}: {label} must be a non-negative int or None, got {value!r}")
    if generator is not None and generator.device != A.device:
        raise ValueError(f"{op}: generator is on {generator.device} but A is on {A.device}")
    check_finite(A, op)

    oversample = default_oversample(rank) if oversample is None else oversample
    n_iter = DEFAULT_N_ITER if n_iter is None else n_iter
    A = A.to(compute_dtype(A))
    width = min(rank + oversample, *A.shape[-2:])
    if generator is None and not isinstance(seed, int) and len(seed) != A[..., 0, 0].numel():
        raise ValueError(f"{op}: {len(seed)} seeds for a batch of {A[..., 0, 0].numel()} matrices")
    if 4 * (n_iter + 1) * width > EXACT_COST * min(A.shape[-2:]):
        return crop_svd(A, rank)
    M, omega, transposed = _sketch(A, width, generator, seed)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(n_iter):
        Q = torch.linalg.qr(M @ torch.linalg.qr(M.mT @ Q).Q).Q
    return _factors(M, Q, rank, transposed)


def _sketch(A: torch.Tensor, width: int, generator: Optional[torch.Generator], seed):
    """``M`` (``A`` or ``A^T``, whichever has fewer rows), an independent Gaussian ``Ω`` per matrix."""
    transposed = A.shape[-2] > A.shape[-1]
    M = A.mT if transposed else A
    shape = (M.shape[-1], width)
    if generator is None and not isinstance(seed, int):
        seeds = list(seed)
        draws = [
            torch.randn(
                shape, generator=torch.Generator(device=A.device).manual_seed(int(s)), dtype=A.dtype, device=A.device
            )
            for s in seeds
        ]
        return M, torch.stack(draws).reshape(*M.shape[:-2], *shape), transposed
    if generator is None:
        generator = torch.Generator(device=A.device).manual_seed(seed)
    omega = torch.randn(*M.shape[:-2], *shape, generator=generator, dtype=A.dtype, device=A.device)
    return M, omega, transposed


def _factors(M: torch.Tensor, Q: torch.Tensor, rank: int, transposed: bool):
    """The top ``rank`` triplets of ``Q Q^T M``, returned for ``A`` (``M^T`` when ``transposed``)."""
    Ub, S, Vh = torch.linalg.svd(Q.mT @ M, full_matrices=False)
    U, S, Vh = Q @ Ub[..., :rank], S[..., :rank], Vh[..., :rank, :]
    if transposed:
        U, Vh = Vh.mT, U.mT
    return U.contiguous(), S.contiguous(), Vh.contiguous()
