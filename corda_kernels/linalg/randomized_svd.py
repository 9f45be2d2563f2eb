"""Batched randomized SVD (top-r singular triplets) with power iterations.

Public call: :func:`randomized_svd` ``(A, rank, *, oversample=None, n_iter=None, seed=0,
generator=None) -> (U, S, Vh)``. Pure torch: on a GPU the matmuls run on cuBLAS and the QR/SVD
factorizations on cuSOLVER through ``torch.linalg``; every step is batched over leading dims.
Accuracy of the defaults, measured: ``bench/results/decompose.md``.
"""

from __future__ import annotations

import math
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
    tol: Optional[float] = None,
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
        tol: judge each matrix's result per component and refine it until it passes (see
            :func:`converged`): ``None`` (default) skips the check. A matrix whose components
            still fail once refining would cost more than a full SVD, or stops improving, gets
            the exact SVD.

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

    Raises:
        TypeError: ``A`` is not a float tensor.
        ValueError: ``A`` is not ``(..., m, n)`` or is empty; ``rank`` is outside ``1..min(m, n)``;
            ``oversample`` / ``n_iter`` is not a non-negative int; ``generator`` is on another
            device; the number of seeds differs from the number of matrices.
        FloatingPointError: ``A`` holds NaN or Inf.
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
    Q = _iterate(M, Q, n_iter)
    if tol is not None:
        Q = _refine(A, M, Q, rank, tol, n_iter, width)
        if isinstance(Q, tuple):
            return Q
    return _factors(M, Q, rank, transposed)


def _iterate(M: torch.Tensor, Q: torch.Tensor, n_iter: int) -> torch.Tensor:
    for _ in range(n_iter):
        Q = torch.linalg.qr(M @ torch.linalg.qr(M.mT @ Q).Q).Q
    return Q


def ritz_check(M: torch.Tensor, Q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(residuals, gaps, σ_1)`` of the top ``rank`` Ritz triplets of ``M`` on the basis ``Q``
    (``(..., rank)``, ``(..., rank)``, ``(...)``).

    With ``Q^T M = U_b diag(S) V^T`` and ``u_i = Q U_b e_i``: ``M^T u_i = σ_i v_i`` holds exactly,
    so the residual of pair ``i`` is ``||M v_i − σ_i u_i||`` (the part of ``M v_i`` outside the
    basis). Its gap is the distance to the next value, ``σ_i − σ_{i+1}`` (for ``i = r``: to the
    ``(r+1)``-th Ritz value), less the residual of that next pair (Ritz values are lower bounds; a
    true value lies within a residual of each). By the sin-θ theorem the angle between a computed
    and a true singular vector is at most about ``residual / gap``.
    """
    residual, gaps, S = _ritz(M, Q, rank)
    return residual, gaps, S[..., 0]


def _ritz(M: torch.Tensor, Q: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`ritz_check` with every Ritz value ``(..., l)`` in place of ``σ_1``."""
    Ub, S, Vh = torch.linalg.svd(Q.mT @ M, full_matrices=False)
    k = min(rank + 1, S.shape[-1])
    V = Vh[..., :k, :].mT
    residual = (M @ V - (Q @ Ub[..., :k]) * S[..., None, :k]).norm(dim=-2)
    if k == rank:  # the basis spans the whole space: nothing beyond the r-th value
        return residual, torch.full_like(residual, float("inf")), S
    gaps = S[..., :rank] - S[..., 1 : rank + 1] - residual[..., 1 : rank + 1]
    return residual[..., :rank], gaps, S


def converged(residual: torch.Tensor, gaps: torch.Tensor, tol: float) -> torch.Tensor:
    """``(...)`` bool: every component's ``residual <= tol · gap``. A residual at the working
    precision's floor does not pass by itself: when the gap is below ``floor / tol`` the components
    are not determined to ``tol`` by this solver, and refining stalls, which sends the matrix to the
    exact SVD (the solver PEFT and ``svd="exact"`` use)."""
    return (residual <= tol * gaps.clamp_min(0)).all(dim=-1)


def _refine(A, M, Q, rank: int, tol: float, n_iter: int, width: int):
    """Refine the matrices of the batch whose Ritz pairs fail :func:`converged` by more subspace
    iterations, as many as predicted to pass: the worst ``residual / (tol · gap)`` shrinks by about
    ``(σ_l / σ_r)²`` per iteration (``σ_l`` the basis' smallest Ritz value), and at least twice as
    many as the last round. A matrix whose prediction, doubled, would cost more than a full SVD, or
    whose ratio did not at least halve in a round, gets the exact SVD at once (a flat spectrum
    around ``σ_r`` goes exact after one check instead of after rounds of iterations).
    Returns ``Q``, or ``(U, S, Vh)`` for ``A`` when some matrix went exact."""
    flatM, flatQ = M.reshape(-1, *M.shape[-2:]), Q.reshape(-1, *Q.shape[-2:]).clone()
    todo = torch.arange(flatM.shape[0], device=M.device)
    worst = torch.full((flatM.shape[0],), float("inf"), dtype=flatM.dtype, device=M.device)
    budget = EXACT_COST * min(M.shape[-2:]) / (4 * width) - 1  # iterations that cost a full SVD
    spent, step, exact = n_iter, 1, []
    while todo.numel():
        residual, gaps, S = _ritz(flatM[todo], flatQ[todo], rank)
        ok = converged(residual, gaps, tol)
        failing = todo[~ok]
        if not failing.numel():
            break
        tiny = torch.finfo(S.dtype).tiny
        ratio = (residual / (tol * gaps.clamp_min(tiny))).amax(dim=-1)[~ok]
        # Prediction: the residual shrinks by `rate` per iteration towards tol times the Ritz gap
        # (the gap less the next residual, as converged() uses, is not yet known while it is negative).
        S = S[~ok]
        ritz_gaps = (S[:, :rank] - S[:, 1 : rank + 1]).clamp_min(tiny)
        target = (residual[~ok] / (tol * ritz_gaps)).amax(dim=-1)
        rate = (S[:, -1] / S[:, rank - 1].clamp_min(tiny)).square().clamp(tiny, 1.0)
        needed = torch.log(target).clamp_min(0) / -torch.log(rate)  # inf on a flat spectrum
        hopeful = (ratio <= 0.5 * worst[failing]) & (spent + 2 * needed <= budget)  # 2x: the rate is estimated
        exact += failing[~hopeful].tolist()
        worst[failing] = ratio
        todo = failing[hopeful]
        if not todo.numel():
            break
        step = max(2 * step, math.ceil(float(needed[hopeful].amax())))
        if spent + step > budget:
            exact += todo.tolist()
            break
        flatQ[todo] = _iterate(flatM[todo], flatQ[todo], step)
        spent += step
    if not exact:
        return flatQ.reshape(Q.shape)
    U, S, Vh = _factors(flatM, flatQ, rank, A.shape[-2] > A.shape[-1])
    exact_U, exact_S, exact_Vh = crop_svd(A.reshape(-1, *A.shape[-2:])[exact], rank)
    U[exact], S[exact], Vh[exact] = exact_U, exact_S, exact_Vh
    batch = A.shape[:-2]
    return U.reshape(*batch, *U.shape[-2:]), S.reshape(*batch, rank), Vh.reshape(*batch, *Vh.shape[-2:])


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
