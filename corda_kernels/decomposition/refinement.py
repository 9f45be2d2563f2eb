"""Quantized residuals: store ``W' = W − s·B·A`` quantized (NF4 / int8), optionally refined LoftQ-style.

Without refinement (``iters = 0``) the residual is quantized once (QPiSSA / QCorDA). With ``iters = T``
the factors and the quantized residual are alternated (LoftQ)::

    Q_0 = quant(W − s·B_0·A_0);   for t = 1..T:   s·B_t·A_t = best rank-r fit of (W − Q_{t−1}) in the metric,
                                                  Q_t = quant(W − s·B_t·A_t)

The metric is CorDA's own when a covariance is given, ``‖(W − Q − s·B·A)·C_d‖_F`` (``C_d`` the
damped covariance CorDA decomposed with; the fit is the truncated SVD of ``(W − Q)·C_d`` mapped back
through ``C_d⁻¹``, as CorDA splits it), else Frobenius (truncated SVD of ``W − Q``). Quantization is
not a projection in either metric, so an iterate can be worse than its predecessor: the best iterate
(lowest error, ``Q_0`` included) is kept, so the error never increases with ``T``.
"""

from __future__ import annotations

import numbers
from typing import Callable, NamedTuple, Optional

import torch

from ..ops.quantized import QuantizedWeight, check_format, quantize_weight


class Quantization(NamedTuple):
    """What ``apply(quantize=..., quantize_iters=...)`` asks for."""

    fmt: str
    iters: int = 0


# Refinements beyond a few stop improving (the best iterate is kept); each costs one SVD and one
# quantization per layer. The bound keeps a typo (10**9) from running for days.
MAX_QUANTIZE_ITERS = 100


def check_quantize_iters(iters, quantize: Optional[str] = None, option: str = "quantize_iters") -> int:
    """``iters`` as an int: an integer in ``[0, MAX_QUANTIZE_ITERS]`` (not a bool, a float or a string),
    non-zero only with a quantized residual. The one check behind apply, apply_blockwise and the CLI."""
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral):
        raise TypeError(
            f"{option} must be an integer in [0, {MAX_QUANTIZE_ITERS}] (refinements of the quantized residual), "
            f"got {type(iters).__name__} {iters!r}"
        )
    if not 0 <= iters <= MAX_QUANTIZE_ITERS:
        raise ValueError(
            f"{option} must be an integer in [0, {MAX_QUANTIZE_ITERS}] (refinements of the quantized residual; "
            f"the error stops improving after a few), got {iters}"
        )
    if iters and quantize is None:
        raise ValueError(f"{option}={iters} refines a quantized residual: it needs quantize='nf4'|'int8' too")
    return int(iters)


def make_quantization(quantize: Optional[str], iters: int = 0) -> Optional[Quantization]:
    check_format(quantize)
    iters = check_quantize_iters(iters, quantize)
    return None if quantize is None else Quantization(quantize, iters)


def damped(C: torch.Tensor, damp: float) -> torch.Tensor:
    """``C + damp · mean(diag C) · I`` in fp64 (CorDA's damping with the factor it settled on)."""
    C = C.double()
    return C + damp * C.diagonal().mean() * torch.eye(C.shape[0], dtype=C.dtype, device=C.device)


def weighted_error(W: torch.Tensor, Q: torch.Tensor, delta: torch.Tensor, C: Optional[torch.Tensor] = None) -> float:
    """``‖(W − Q − delta)·C‖_F`` (Frobenius without ``C``), in fp64."""
    E = W.double() - Q.double() - delta.double()
    return float(torch.linalg.matrix_norm(E if C is None else E @ C.double()))


def _fit(E: torch.Tensor, r: int, scale: float, C: Optional[torch.Tensor]):
    """Factors ``(A (r, in), B (out, r))`` fp64 with ``s·B·A`` the best rank-r fit of ``E`` in the metric."""
    M = E if C is None else E @ C
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    U, S, Vh = U[:, :r], S[:r], Vh[:r]
    if C is not None:
        Vh = torch.linalg.solve(C, Vh.T).T  # Vh · C⁻¹ (C symmetric)
    root = (S / scale).sqrt()
    return root[:, None] * Vh, U * root


def quantize_residual(
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    quantization: Quantization,
    C: Optional[torch.Tensor] = None,
    name: str = "weight",
    on_iteration: Optional[Callable[[int, float], None]] = None,
) -> tuple[QuantizedWeight, torch.Tensor, torch.Tensor, list[float]]:
    """``(Q, A, B, errors)``: the quantized residual of ``W (out, in)`` in ``dtype`` and the factors (fp32)
    after ``quantization.iters`` refinements; ``errors[t]`` is the metric's error of iterate ``t``
    (the returned one is the smallest). ``C``: the (damped) covariance of CorDA's metric, or None.
    ``on_iteration(t, error)`` is called after each refinement (progress)."""
    W64 = W.double()
    Cd = None if C is None else C.double().to(W.device)
    r = A.shape[0]

    def step(A, B):
        delta = scale * (B.double() @ A.double())
        Q = quantize_weight((W64 - delta).to(dtype), quantization.fmt, name)
        return Q, weighted_error(W64, Q.dequantize(torch.float64), delta, Cd)

    Q, err = step(A, B)
    best, errors = (err, Q, A, B), [err]
    for t in range(1, quantization.iters + 1):
        A, B = _fit(W64 - Q.dequantize(torch.float64), r, scale, Cd)
        Q, err = step(A, B)
        errors.append(err)
        if on_iteration is not None:
            on_iteration(t, err)
        if err < best[0]:
            best = (err, Q, A, B)
    _, Q, A, B = best
    return Q, A.float(), B.float(), errors


def quantize_residuals(
    targets,
    inits,
    quantization: Optional[Quantization],
    covariances=None,
    *,
    progress: bool = False,
) -> dict:
    """Decomposition's last step with ``quantize=``: each layer's frozen base formed and quantized
    (``W' = W − s·B·A`` with the factors rounded as the forward uses them, or W itself for methods
    without a residual), refined with its factors ``quantization.iters`` times; returns the inits
    with ``residual`` set (and the refined factors, fp32). ``covariances``: CorDA's, for its metric.

    ``targets``: name -> the layer (``nn.Linear`` / ``Conv1D``); ``inits``: name -> ``LayerInit``."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from ..integrations import hf
    from ..kernels.reference.lowrank_linear import delta_weight
    from .plan import layer_covariances

    if quantization is None:
        return dict(inits)
    refining = quantization.iters > 0
    bar = tqdm(
        total=len(inits) * quantization.iters if refining else 0,
        desc="refine quantized residuals",
        unit="iter",
        disable=not (progress and refining),
    )

    def on_iteration(t, error):
        bar.update(1)
        bar.set_postfix(error=f"{error:.3g}")

    out = {}
    try:
        with torch.no_grad():
            for name, init in inits.items():
                weight = hf.weight_matrix(targets[name]).detach()
                dtype = weight.dtype
                if not refining:
                    base = weight
                    if init.subtract:
                        A, B = init.A.to(dtype), init.B.to(dtype)
                        delta = delta_weight(
                            A,
                            B,
                            *weight.shape,
                            scale=init.scale,
                            diag=init.diag,
                            row_index=init.row_index,
                            col_index=init.col_index,
                        )
                        base = (weight.float() - delta).to(dtype)
                    out[name] = replace(init, residual=quantize_weight(base, quantization.fmt, name))
                    continue
                if (
                    not init.subtract
                    or init.diag is not None
                    or init.row_index is not None
                    or init.col_index is not None
                ):
                    raise ValueError(
                        f"layer {name}: quantize_iters refits dense factors B·A to W − Q; this method's adapter "
                        "(no residual, a diagonal or feature indices) does not allow it"
                    )
                C = None
                if covariances is not None:
                    cov = layer_covariances(covariances, [name], weight.shape[1], init.A.device).unique[0]
                    C = damped(cov, init.stats.get("damp", 0.0))
                Q, A, B, errors = quantize_residual(
                    weight.float(), init.A, init.B, init.scale, dtype, quantization, C, name, on_iteration
                )
                stats = {**init.stats, "quantization_errors": errors}
                out[name] = replace(init, A=A, B=B, residual=Q, stats=stats)
    finally:
        bar.close()
    return out
