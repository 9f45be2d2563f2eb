"""Context-oriented SVD (CorDA): damping of the input covariance and the SVD of ``W · C_d``.

Public calls:

- :func:`damp_covariance` ``(C, *, damp=0.01, growth=2.0, ...) -> DampedCovariance(covariance,
  cholesky, damp)``: ``C_d = C + damp · mean(diag C) · I`` with ``damp`` doubled until ``C_d`` is
  well conditioned (PEFT's criterion, estimated without an inverse), and its Cholesky factor.
- :func:`co_svd` ``(W, C, rank, *, mode="ipa"|"kpa", ...) -> CoSVD(U, S, V, damp)``: the top
  (instruction-previewed) or bottom (knowledge-preserved) ``r`` components of the SVD of
  ``W · C_d``, mapped back to ``W ≈ U · diag(S) · V^T`` with ``V = C_d^{-1} V_svd``.

Everything is batched over leading dims (layers of one shape decomposed together) and pure torch
(cuBLAS/cuSOLVER through ``torch.linalg`` on a GPU).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Optional, Sequence, Union

import torch

from .._measure import release_free_memory
from ._checks import check_finite, check_matrix, check_rank, compute_dtype, name_suffix
from ._products import times_fp64
from .exact_svd import crop_svd, smallest_triplets
from .randomized_svd import randomized_svd
from .top_svd import top_triplets

MODES = ("ipa", "kpa")
SVD_SOLVERS = ("randomized", "exact", "top")
# Largest |C - C^T| accepted, relative to max |diag C|: rounding of a Gram product, not a
# half-filled (upper-triangle-only) accumulator.
SYMMETRY_TOL = 1e-4
# Sketch for W·C_d (ipa). Its spectrum is steep (power-law exponent 1.0-2.1 against 0.1-0.9 for raw
# weights), so a narrower sketch and fewer iterations than randomized_svd's defaults reach the 1e-4
# accuracy targets (SmolLM2: q = 1 at r = 8, 2 at r = 16-32, 4 at r = 64-128; one more for margin).
CO_SVD_OVERSAMPLE = 40
# Per-component acceptance of the randomized result (randomized_svd's tol): each Ritz pair's
# residual at most this fraction of the gap to the next value (sin θ <= ~1e-3), else refined or exact.
CO_SVD_TOL = 1e-3


def co_svd_n_iter(rank: int) -> int:
    return 2 if rank <= 8 else 3 if rank <= 32 else 5


_DEFERRED = object()  # damp_covariance(factor_dtype=_DEFERRED): no factor (cholesky None)


class DampedCovariance(NamedTuple):
    """``covariance`` ``(..., n, n)`` = ``C + damp · mean(diag C) · I``; ``cholesky`` its lower
    factor; ``damp`` ``(...)`` fp64, the factor used for each matrix."""

    covariance: torch.Tensor
    cholesky: torch.Tensor
    damp: torch.Tensor


class CoSVD(NamedTuple):
    """``W ≈ U · diag(S) · V^T`` restricted to ``r`` components of the SVD of ``W · C_d``.

    ``U (..., out, r)`` orthonormal, ``S (..., r)`` descending, ``V (..., in, r)`` = ``C_d^{-1}``
    times the right singular vectors (PEFT's ``V_WC``; not orthonormal), ``damp (...)`` fp64,
    ``energy (...)`` fp64 ``||W · C_d||_F^2`` (so ``sum(S**2) / energy`` is the share the r
    components hold).
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    damp: torch.Tensor
    energy: torch.Tensor  # (...) fp64: ||W · C_d||_F^2, the total the r components are a part of


def _asymmetry(C: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``max |C - Cᵀ|`` of each matrix, a panel of ``block`` rows at a time against the columns
    right of its start (every pair once, no ``n x n`` temporary)."""
    n = C.shape[-1]
    out = None
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        panel = (C[..., i0:i1, i0:] - C[..., i0:, i0:i1].mT).abs_().flatten(-2).amax(dim=-1)
        out = panel if out is None else torch.maximum(out, panel)
    return out


def _check_covariance(C, op: str, name: str) -> None:
    check_matrix(C, op, "C", name)
    if C.shape[-1] != C.shape[-2]:
        raise ValueError(f"{op}{name_suffix(name)}: C must be square (..., n, n), got {tuple(C.shape)}")
    check_finite(C, op, "C", name)
    diag_max = C.diagonal(dim1=-2, dim2=-1).abs().amax(dim=-1)
    asym = _asymmetry(C)
    if bool((asym > SYMMETRY_TOL * diag_max).any()):
        raise ValueError(
            f"{op}{name_suffix(name)}: C of shape {tuple(C.shape)} is not symmetric (max |C - C^T| = "
            f"{asym.max().item():.3g}); an upper-triangle-only accumulator must be finalized "
            "(finalize_covariance) first"
        )


def damp_covariance(
    C: torch.Tensor,
    *,
    damp: float = 0.01,
    growth: float = 2.0,
    tol: float = 0.05,
    max_increases: int = 30,
    probes: int = 16,
    seed: int = 0,
    factor_dtype: Optional[torch.dtype] = None,
    name: str = "",
) -> DampedCovariance:
    """Damp each covariance until it is well conditioned, and factor it (no explicit inverse).

    Args:
        C: ``(..., n, n)`` symmetric PSD covariance (bf16/fp16/fp32 -> fp32, fp64 stays fp64).
        damp: the first factor tried; ``C_d = C + damp · mean(diag C) · I``.
        growth: ``damp`` is multiplied by this while the check fails (PEFT: 2).
        tol: threshold of the conditioning check (PEFT: 0.05).
        max_increases: after this many increases a still-failing matrix raises ``ValueError``.
        probes: random probe vectors of the check.
        seed: seeds the probes, so the check (hence the damp) is deterministic.
        factor_dtype: dtype of the returned factor (default: ``C``'s compute dtype); fp64 asks for
            an fp64 Cholesky of the accepted ``C_d``.
        name: a label (e.g. the layer) used in error messages.

    The check. PEFT (``collect_eigens_for_layer``) accepts ``C_d`` when ``||C_d · inv(C_d) - I||_F
    < 0.05`` with an explicit fp32 inverse. That residual is the rounding error of fp32 solves
    (it grows like ``eps_fp32 · ||C_d|| · ||C_d^{-1}||_F``). Here the same quantity is estimated
    from ``k = probes`` unit random vectors ``P`` and the fp32 Cholesky factor:
    ``sqrt(n / k) · ||C_d · cholesky_solve(P) - P||_F`` (each column's squared residual estimates
    the mean over the columns of ``I``). ``C_d`` must also be positive definite (the Cholesky
    succeeds); PEFT would accept an indefinite ``C_d`` whose LU inverse is accurate. The check is
    done in fp32 whatever ``C``'s dtype, so that the damp is PEFT's (same choice as PEFT on every
    SmolLM2 covariance: ``bench/studies/damp_vs_peft.py``). Since ``λ_max <= trace C``,
    ``cond(C_d) <= 1 + n / damp``, so the first damp fails only for very wide layers or degenerate
    (e.g. indefinite) C.

    Returns:
        :class:`DampedCovariance` ``(covariance, cholesky, damp)``: ``C_d`` in ``C``'s compute
        dtype, its lower Cholesky factor in ``factor_dtype``, and the damp used per matrix, an fp64
        tensor of shape ``C.shape[:-2]``.

    Raises:
        TypeError: ``C`` is not a float tensor.
        ValueError: ``C`` is not square, not symmetric (an upper-triangle accumulator not
            finalized), empty, has a non-positive mean diagonal (no calibration data reached it),
            is still not positive definite after ``max_increases`` increases, or an option is out
            of range.
        FloatingPointError: ``C`` holds NaN or Inf.
    """
    op = "damp_covariance"
    _check_covariance(C, op, name)
    if not (damp > 0 and growth > 1 and tol > 0 and max_increases >= 0 and probes >= 1):
        raise ValueError(
            f"{op}{name_suffix(name)}: need damp > 0, growth > 1, tol > 0, max_increases >= 0 and probes >= 1; got "
            f"damp={damp}, growth={growth}, tol={tol}, max_increases={max_increases}, probes={probes}"
        )
    dtype = compute_dtype(C)
    factor = factor_dtype is not _DEFERRED  # co_svd's: C_d now, its factor later (_factor)
    factor_dtype = dtype if factor_dtype is None or not factor else factor_dtype
    batch, n = C.shape[:-2], C.shape[-1]
    flat = C.reshape(-1, n, n).to(dtype)
    scale = flat.diagonal(dim1=-2, dim2=-1).mean(dim=-1)
    if bool((scale <= 0).any()):
        bad = int((scale <= 0).nonzero()[0])
        raise ValueError(
            f"{op}{name_suffix(name)}: C (shape {tuple(C.shape)}) has a non-positive mean diagonal at flat batch index "
            f"{bad}: no calibration data reached it (an all-zero covariance cannot be damped)"
        )

    generator = torch.Generator(device=C.device).manual_seed(seed)
    P = torch.randn(n, probes, generator=generator, dtype=torch.float32, device=C.device)
    P /= P.norm(dim=0)
    flat32, scale32 = flat.float(), scale.float()
    damps = torch.full((flat.shape[0],), float(damp), dtype=torch.float64, device=C.device)
    # Work space (peak host memory of preprocess_corda): C_d is C plus a shift on the diagonal, added
    # in place (no identity matrix, no shift · I product); the fp32 factors are kept only when they
    # are the result. Same values as C + shift · I.
    factor32 = torch.empty_like(flat32) if factor and factor_dtype == torch.float32 else None
    todo = torch.arange(flat.shape[0], device=C.device)
    for _ in range(max_increases + 1):
        shift = scale32[todo] * damps[todo].float()
        Cd = flat32[todo] if todo.numel() < flat32.shape[0] else flat32.clone()
        Cd.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
        L, info = torch.linalg.cholesky_ex(Cd)
        residual = (Cd @ _cholesky_solve(P, L) - P).flatten(-2).norm(dim=-1) * math.sqrt(n / probes)
        del Cd
        ok = (info == 0) & torch.isfinite(residual) & (residual < tol)
        if factor32 is not None:
            factor32[todo[ok]] = L[ok]
        del L
        todo = todo[~ok]
        if todo.numel() == 0:
            break
        damps[todo] *= growth
    else:
        first = int(todo[0])
        raise ValueError(
            f"{op}{name_suffix(name)}: C (shape {tuple(C.shape)}) is still singular or ill-conditioned after "
            f"{max_increases} damp increases (damp = {damps[first].item():.3g} · mean(diag C) at flat batch index "
            f"{first}, {todo.numel()} matrix(es) failing); check the covariance for degenerate inputs"
        )

    shift = (scale * damps.to(dtype)) if dtype == torch.float64 else (scale32 * damps.float())
    damped = flat.clone()
    damped.diagonal(dim1=-2, dim2=-1).add_(shift[:, None])
    if factor32 is not None:
        L = factor32.reshape(C.shape)
    else:
        L = _factor(damped, factor_dtype, name).reshape(C.shape) if factor else None
    return DampedCovariance(damped.reshape(C.shape), L, damps.reshape(batch))


def _factor(damped: torch.Tensor, dtype: torch.dtype, name: str = "") -> torch.Tensor:
    """The lower Cholesky factor of ``damped`` in ``dtype``, column-major and factored in place:
    LAPACK's layout, so no copy in or out (nor in the triangular solves that use it)."""
    factor = torch.empty_like(damped, dtype=dtype).mT.copy_(damped)  # C_d is symmetric
    info = torch.empty(factor.shape[:-2], dtype=torch.int32, device=factor.device)
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    if bool((info != 0).any()):
        raise torch.linalg.LinAlgError(
            f"damp_covariance{name_suffix(name)}: the {dtype} Cholesky factorization of the damped covariance "
            "failed (its fp32 factorization succeeded)"
        )
    return factor


def _trim(C: torch.Tensor) -> None:
    """Hand the C heap's free pages back (host memory, covariances of at least 1 MiB): glibc keeps
    the n x n temporaries of the step before resident otherwise (measured: tens of MiB at n = 1376)."""
    if C.device.type == "cpu" and C.shape[-1] ** 2 * 4 >= 1 << 20:
        release_free_memory()


def _cholesky_solve(B: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """``cholesky_solve(B, L)`` as its two triangular solves (LAPACK's potrs does the same), which
    take the n x n factor as it is; ``torch.cholesky_solve`` copies it first."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, B, upper=False), upper=True)


def _check_mode(value, allowed, op: str, label: str, name: str) -> None:
    if value not in allowed:
        raise ValueError(
            f"{op}{name_suffix(name)}: {label} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
        )


def _solver(mode: str, svd: Optional[str], op: str, name: str) -> str:
    _check_mode(mode, MODES, op, "mode (PEFT's 'ipm' is 'ipa', 'kpm' is 'kpa')", name)
    svd = svd or ("randomized" if mode == "ipa" else "exact")
    _check_mode(svd, SVD_SOLVERS if mode == "ipa" else ("exact",), op, f"svd for mode={mode!r}", name)
    return svd


def _check_weight(W: torch.Tensor, C: torch.Tensor, rank: int, op: str, name: str) -> None:
    if W.device != C.device:
        raise ValueError(f"{op}{name_suffix(name)}: W is on {W.device} but C is on {C.device}")
    check_rank(rank, W.shape, op, "W", name)
    check_finite(W, op, "W", name)


def _damped(C: torch.Tensor, damp: float, growth: float, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C_d, damps)`` of each distinct covariance, without its factor (made later, if needed)."""
    distinct, _, damps = damp_covariance(C, damp=damp, growth=growth, factor_dtype=_DEFERRED, name=name)
    _trim(C)
    return distinct, damps


def _components(W, Cd, C, rank, mode, svd, seed, n_iter, oversample):
    """``(U, S, Vh, energy)``: the ``rank`` kept triplets of ``W · Cd`` and ``||W · Cd||_F^2``
    (no checks; ``C`` only for :func:`_trim`)."""
    if mode == "ipa":
        dtype = torch.float64 if torch.float64 in (W.dtype, Cd.dtype) else torch.float32
        WC = W.to(dtype) @ Cd.to(dtype)
        energy = torch.linalg.vector_norm(WC, dim=(-2, -1), dtype=torch.float64).square()  # no fp64 copy
        if svd == "exact":
            return (*crop_svd(WC, rank), energy)
        if svd == "top":
            return (*top_triplets(WC, rank, seed=seed if isinstance(seed, int) else int(seed[0])), energy)
        n_iter = co_svd_n_iter(rank) if n_iter is None else n_iter
        oversample = CO_SVD_OVERSAMPLE if oversample is None else oversample
        U, S, Vh = randomized_svd(WC, rank, oversample=oversample, n_iter=n_iter, seed=seed, tol=CO_SVD_TOL)
        return U, S, Vh, energy
    WC = times_fp64(W.double(), Cd)
    energy = WC.square().sum((-2, -1))
    _trim(C)
    return (*smallest_triplets(WC, rank), energy)


def _right_vectors(mode: str, W, U, S, Vh, factor: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``V = C_d^{-1} V_svd`` (fp64) for the kept triplets of ``W · C_d``.

    ipa: ``V_svd = C_d Wᵀ U S⁻¹`` for the triplets of ``W · C_d`` (``C_d`` symmetric), so ``V = Wᵀ U
    S⁻¹``: no factor of ``C_d`` and none of its conditioning (the solve adds ``C_d^{-1}`` times the
    triplets' rounding). Components near an fp32 product's noise (``S <= in · eps_fp32 · S_1``) and
    kpa, whose small ``S`` would amplify ``U``'s rounding, solve with the fp64 factor ``factor()``."""
    if mode != "ipa":
        return _cholesky_solve(Vh.mT.double(), factor())
    S64 = S.double()
    noise = S64 <= W.shape[-1] * torch.finfo(torch.float32).eps * S64[..., :1]
    V = times_fp64(U.double().mT, W).mT / S64.clamp_min(torch.finfo(torch.float64).tiny)[..., None, :]
    if bool(noise.any()):
        V = torch.where(noise[..., None, :], _cholesky_solve(Vh.mT.double(), factor()), V)
    return V


def _result(U, S, V, damps, energy, out_dtype, batch) -> CoSVD:
    return CoSVD(
        U.to(out_dtype).contiguous(),
        S.to(out_dtype).contiguous(),
        V.to(out_dtype).contiguous(),
        damps.expand(batch).clone() if damps.shape != batch else damps,
        energy,
    )


def co_svd(
    W: torch.Tensor,
    C: torch.Tensor,
    rank: int,
    *,
    mode: str = "ipa",
    svd: Optional[str] = None,
    damp: float = 0.01,
    growth: float = 2.0,
    oversample: Optional[int] = None,
    n_iter: Optional[int] = None,
    seed: Union[int, Sequence[int]] = 0,
    cov_index: Optional[torch.Tensor] = None,
    name: str = "",
    method: Optional[str] = None,
) -> CoSVD:
    """CorDA's context-oriented SVD of ``W`` under the input covariance ``C``.

    Args:
        W: ``(..., out, in)`` weights, any float dtype.
        C: ``(..., in, in)`` input covariances whose batch dims broadcast to ``W``'s (e.g. one
            ``(in, in)`` matrix shared by q/k/v stacked in ``W``).
        rank: ``r`` in ``1..min(out, in)``.
        mode: ``"ipa"`` (instruction-previewed: the largest ``r``; PEFT's ``"ipm"``) or ``"kpa"``
            (knowledge-preserved: the smallest ``r``; PEFT's ``"kpm"``).
        svd: the solver, as CorDA's ``svd=`` option: ``"randomized"`` (ipa default:
            :func:`randomized_svd`; each result is judged per component and refined, or replaced
            by the exact SVD, until every Ritz pair's residual is at most ``CO_SVD_TOL`` times its
            gap to the next value), ``"exact"`` (ipa: full SVD cropped; kpa: always
            :func:`smallest_singular_triplets`) or ``"top"`` (ipa: :func:`top_singular_triplets`,
            the top ``r`` to an fp32 SVD's accuracy without a full SVD, PEFT's ``"ipm"`` contract;
            fp32 results whatever the input dtype).
        damp: the first damping factor, see :func:`damp_covariance` (one damp per distinct ``C``).
        growth: the factor ``damp`` grows by while the check fails, see :func:`damp_covariance`.
        oversample: extra sketch columns of the randomized solver (default ``CO_SVD_OVERSAMPLE``).
        n_iter: power iterations of the randomized solver (default :func:`co_svd_n_iter`).
        seed: the randomized solver's seed, an int or one per matrix.
        cov_index: for a batch of layers whose inputs are shared (q/k/v, gate/up): ``C`` is then
            ``(G, in, in)``, the G distinct covariances, and matrix ``i`` of ``W``'s ``(L, out, in)``
            batch uses ``C[cov_index[i]]``; each distinct covariance is damped and factored once.
        name: a label (e.g. the layer) used in error messages.
        method: deprecated name of ``svd``.

    Math (PEFT's ``collect_eigens_for_layer`` + ``crop_corda_eigens``): ``C_d`` = damped ``C``;
    ``W C_d = U_f diag(S_f) V_f^T``; keep the top (ipa) or bottom (kpa) ``r`` triplets ``U, S,
    V_svd``; ``V = C_d^{-1} V_svd``. Then ``U diag(S) V^T`` is the part of ``W`` those components
    carry. Precision: ipa multiplies ``W C_d`` in fp32 and takes ``V = Wᵀ U S⁻¹`` (the same vectors:
    ``V_svd = C_d Wᵀ U S⁻¹``; no solve, components at the product's noise level excepted); kpa forms
    ``W C_d`` and its bottom triplets in fp64 (they are ill-conditioned) and solves for ``V`` with
    an fp64 Cholesky factor of ``C_d`` (its condition reaches ``1 + n / damp``; no inverse).

    Returns:
        :class:`CoSVD` ``(U, S, V, damp, energy)``, fp32 (fp64 when ``W`` is fp64); ``damp`` and
        ``energy`` (fp64) have ``W``'s batch shape.

    Raises:
        TypeError: ``W`` or ``C`` is not a float tensor.
        ValueError: ``mode`` or ``svd`` is unknown (kpa takes ``svd="exact"`` only); shapes
            disagree (``C`` not ``(..., in, in)``, batch dims that do not broadcast, a bad
            ``cov_index``); ``rank`` is outside ``1..min(out, in)``; ``W`` and ``C`` are on
            different devices; ``C`` cannot be damped (see :func:`damp_covariance`).
        FloatingPointError: ``W`` or ``C`` holds NaN or Inf.
    """
    op = "co_svd"
    if method is not None:
        if svd is not None and svd != method:
            raise ValueError(f"{op}{name_suffix(name)}: pass svd= only (method= is its deprecated name)")
        warnings.warn("co_svd(method=...) is deprecated; use svd=...", DeprecationWarning, stacklevel=2)
        svd = method
    svd = _solver(mode, svd, op, name)
    check_matrix(W, op, "W", name)
    check_matrix(C, op, "C", name)
    if C.shape[-1] != W.shape[-1] or C.shape[-2] != W.shape[-1]:
        raise ValueError(
            f"{op}{name_suffix(name)}: C must be (..., in, in) with in = W.shape[-1] = {W.shape[-1]}; got W "
            f"{tuple(W.shape)} and C {tuple(C.shape)}"
        )
    if cov_index is not None:
        if W.dim() != 3 or C.dim() != 3 or tuple(cov_index.shape) != (W.shape[0],) or cov_index.dtype != torch.int64:
            raise ValueError(
                f"{op}{name_suffix(name)}: with cov_index, W must be (L, out, in), C (G, in, in) and cov_index "
                f"an int64 (L,) tensor; got W {tuple(W.shape)}, C {tuple(C.shape)}, "
                f"cov_index {tuple(cov_index.shape)} {cov_index.dtype}"
            )
        if W.shape[0] and not (0 <= int(cov_index.min()) and int(cov_index.max()) < C.shape[0]):
            raise ValueError(f"{op}{name_suffix(name)}: cov_index must lie in [0, {C.shape[0]})")
    try:
        batch = torch.broadcast_shapes(W.shape[:-2], C.shape[:-2]) if cov_index is None else W.shape[:-2]
    except RuntimeError:
        batch = None
    if batch != W.shape[:-2]:
        raise ValueError(
            f"{op}{name_suffix(name)}: C's batch dims {tuple(C.shape[:-2])} must broadcast to W's {tuple(W.shape[:-2])}"
        )
    _check_weight(W, C, rank, op, name)

    # Peak memory: the fp64 factor (2x C_d), where needed, is made after the solver.
    distinct, damps = _damped(C, damp, growth, name)
    Cd, index = distinct, None
    if cov_index is not None:
        index = cov_index.to(C.device)
        Cd, damps = distinct[index], damps[index]
    U, S, Vh, energy = _components(W, Cd, C, rank, mode, svd, seed, n_iter, oversample)
    del Cd
    _trim(C)

    def factor():  # each distinct covariance factored once, when needed
        L = _factor(distinct, torch.float64, name)
        return L if index is None else L[index]

    V = _right_vectors(mode, W, U, S, Vh, factor)
    return _result(U, S, V, damps, energy, compute_dtype(W), batch)


def co_svd_shared(
    weights: Sequence[torch.Tensor],
    C: torch.Tensor,
    ranks: Union[int, Sequence[int]],
    *,
    mode: str = "ipa",
    svd: Optional[str] = None,
    damp: float = 0.01,
    growth: float = 2.0,
    seeds: Union[int, Sequence[int]] = 0,
    names: Sequence[str] = (),
) -> list[CoSVD]:
    """:func:`co_svd` of layers of any shapes that read the same input (q/k/v, gate/up) and so share
    one covariance: ``C`` is checked, damped and factored once instead of once per layer.

    Args:
        weights: ``(out_i, in)`` matrices, any float dtypes, on ``C``'s device.
        C: ``(in, in)``, their input covariance.
        ranks: ``r`` for all, or one per weight.
        mode: ``"ipa"`` or ``"kpa"``, as :func:`co_svd`.
        svd: the solver, as :func:`co_svd`.
        damp: the first damping factor, as :func:`co_svd`.
        growth: the factor ``damp`` grows by, as :func:`co_svd`.
        seeds: the solver's seed for all, or one per weight.
        names: one label per weight for error messages (the first also names ``C``).

    Returns:
        One :class:`CoSVD` per weight, equal to ``co_svd(weights[i], C, ranks[i], ...)`` (``damp``
        and ``energy`` 0-d).

    Raises:
        TypeError: a weight or ``C`` is not a float tensor.
        ValueError: as :func:`co_svd` (mode, solver, shapes, rank, devices, damping); also no
            weights, ``C`` not one ``(in, in)`` matrix, or ``ranks`` / ``seeds`` / ``names`` whose
            length is not the number of weights.
        FloatingPointError: a weight or ``C`` holds NaN or Inf.
    """
    op = "co_svd_shared"
    weights = list(weights)
    count = len(weights)
    ranks = [ranks] * count if isinstance(ranks, int) and not isinstance(ranks, bool) else list(ranks)
    seeds = [seeds] * count if isinstance(seeds, int) and not isinstance(seeds, bool) else list(seeds)
    names = list(names) or [""] * count
    label = names[0] if names else ""
    if not count or not (len(ranks) == len(seeds) == len(names) == count):
        raise ValueError(
            f"{op}{name_suffix(label)}: need one or more weights and one rank, seed and name per weight (or one "
            f"rank / seed for all); got {count} weights, {len(ranks)} ranks, {len(seeds)} seeds, {len(names)} names"
        )
    svd = _solver(mode, svd, op, label)
    check_matrix(C, op, "C", label)
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"{op}{name_suffix(label)}: C must be one (in, in) matrix, got {tuple(C.shape)}")
    for W, rank, name in zip(weights, ranks, names):
        check_matrix(W, op, "W", name)
        if W.dim() != 2 or W.shape[1] != C.shape[0]:
            raise ValueError(
                f"{op}{name_suffix(name)}: W must be (out, in) with in = {C.shape[0]} (C's side), got {tuple(W.shape)}"
            )
        _check_weight(W, C, rank, op, name)

    distinct, damps = _damped(C, damp, growth, label)
    parts = [_components(W, distinct, C, r, mode, svd, s, None, None) for W, r, s in zip(weights, ranks, seeds)]
    _trim(C)
    factored = []

    def factor():  # once for all the layers, when needed
        if not factored:
            factored.append(_factor(distinct, torch.float64, label))
        return factored[0]

    results = []
    for W, (U, S, Vh, energy) in zip(weights, parts):
        V = _right_vectors(mode, W, U, S, Vh, factor)
        results.append(_result(U, S, V, damps, energy, compute_dtype(W), W.shape[:-2]))
    return results
