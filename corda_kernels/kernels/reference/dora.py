"""Reference (specification) of the fused DoRA op, its weight norm and its gradients.

With ``x`` viewed as ``(N, in)``, ``s = scale`` and ``m`` the magnitude vector ``(out,)``::

    u = x · Aᵀ                                             (N, r)    accumulation dtype
    z = x · Wᵀ + s · u · Bᵀ                                (N, out)  the adapted linear, no bias
    n_o = ‖W_o + s · (B · A)_o‖₂                           (out,)    closed form, below
    f = m / n   (0 where n == 0)                           (out,)
    y = z ⊙ f + bias                                       (N, out)  cast to x.dtype

The norm, per output row ``o``, without the ``(out, in)`` matrix ``W + s·B·A``::

    n_o² = ‖W_o‖² + 2s · Σ_k P_{o,k} B_{o,k} + s² · Σ_k (B · G)_{o,k} B_{o,k},
    P = W · Aᵀ (out, r),   G = A · Aᵀ (r, r)

``‖W_o‖²`` depends on the frozen ``W`` only, so callers may pass it cached (``weight_sq``). When
``s·B·A`` nearly cancels a row of ``W`` the three terms cancel and the closed form loses relative
accuracy; rows with ``n_o² < CANCEL_RATIO · (‖W_o‖² + s²·Σ(B·G)_o·B_o)`` (the largest the sum of the
terms' magnitudes can be, since ``|cross| <= ‖W_o‖² + quad``) are recomputed directly as
``‖W_o + s·B_o·A‖`` (``k·r·in`` work for ``k`` such rows; never ``out × in``). ``n_o² < 0`` from
rounding is clamped to 0. A row whose adapted weight is exactly zero (``n_o = 0``) has ``f_o = 0``: its
output is the bias (PEFT divides by zero there and returns NaN). PEFT 0.21 adds no epsilon.

The norm is a constant in the backward (detached, as DoRA's paper §4.3 and PEFT do). With
``dyf = dy ⊙ f`` the gradients are the low-rank op's (:mod:`.lowrank_linear`) with ``dy := dyf``::

    dx = dyf · W + s · (dyf · B) · A      dA = s · (dyf · B)ᵀ · x      dB = s · dyfᵀ · u
    dm = Σ_N dy ⊙ z / n   (0 where n == 0)                           dbias = Σ_N dy

No gradient for ``W`` (the base is frozen). Dtypes: as the low-rank op (``A``, ``B`` and ``m`` may be fp32
on a 16-bit ``W``; ``A``, ``B`` rounded to the compute dtype where they enter a product, ``m`` never
rounded); ``n`` and ``f`` are in the accumulation dtype (fp64 for fp64 inputs, else fp32). No dropout:
PEFT's DoRA applies dropout to the input of both the low-rank and a second base product, which this op
does not fuse (callers with active dropout run PEFT's own path).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ..._dtypes import accumulation_dtype
from .lowrank_linear import compute_factor

# Rows whose squared norm is below this fraction of the terms' magnitudes are recomputed directly.
CANCEL_RATIO = 0.25


class DoraOptions(NamedTuple):
    """The optional parts of one call of the DoRA op, in the order every layer uses (public op,
    registered op, autograd, kernels): ``scale`` the adapter scale ``s``; ``bias (out,)``;
    ``weight_sq (out,)`` the cached ``‖W_o‖²`` in the accumulation dtype (None: computed)."""

    scale: float = 1.0
    bias: Optional[torch.Tensor] = None
    weight_sq: Optional[torch.Tensor] = None


def weight_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """``‖W_o‖²`` per row, accumulated in the accumulation dtype (no widened copy of ``W``)."""
    acc = accumulation_dtype(weight.dtype)
    return torch.linalg.vector_norm(weight, dim=1, dtype=acc).square()


def combine_norm(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    weight_sq: torch.Tensor,
    P: torch.Tensor,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """``n`` (out,) from ``‖W_o‖²`` and ``P = W·Aᵀ`` (both in the accumulation dtype ``acc``): the
    closed form plus the cancellation guard (module docstring). Shared by every backend (the
    ``(r, r)`` and ``(out, r)`` parts are cheap; the backends differ in how they form ``P``)."""
    acc = P.dtype
    Ac = compute_factor(A, compute_dtype, acc)
    Bc = compute_factor(B, compute_dtype, acc)
    G = Ac @ Ac.T
    cross = (P * Bc).sum(1)
    quad = ((Bc @ G) * Bc).sum(1)
    sq = weight_sq + (2.0 * scale) * cross + (scale * scale) * quad
    bad = sq < CANCEL_RATIO * (weight_sq + (scale * scale) * quad)
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        direct = weight.index_select(0, rows).to(acc) + scale * (Bc.index_select(0, rows) @ Ac)
        sq = sq.index_copy(0, rows, direct.square().sum(1))
    return sq.clamp_min(0.0).sqrt()


def weight_norm(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float = 1.0,
    weight_sq: Optional[torch.Tensor] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``n_o = ‖W_o + s·(B·A)_o‖₂`` (out,) in the accumulation dtype of ``compute_dtype`` (default
    ``weight``'s), everything upcast (the precision oracle)."""
    compute_dtype = compute_dtype or weight.dtype
    acc = accumulation_dtype(compute_dtype)
    wsq = weight_sq_norm(weight.to(acc)) if weight_sq is None else weight_sq.to(acc)
    P = weight.to(acc) @ compute_factor(A, compute_dtype, acc).T
    return combine_norm(weight, A, B, scale, wsq, P, compute_dtype)


def factor(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``f = m / n`` in ``norm``'s dtype, 0 where ``n == 0``."""
    m = magnitude.to(norm.dtype)
    return torch.where(norm > 0, m / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))


def forward(x, weight, A, B, magnitude, opts: DoraOptions):
    """``(y, z, u, n)``: ``y (..., out)`` in ``x.dtype``; ``z (N, out)`` (the unscaled adapted linear,
    saved for ``dm``) in ``x.dtype``; ``u (N, r)`` and ``n (out,)`` in the accumulation dtype.
    Differentiable by torch autograd in ``x``, ``A``, ``B``, ``magnitude`` with the norm detached
    (the gradients' specification)."""
    scale, bias, weight_sq = opts
    acc = accumulation_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(acc)
    with torch.no_grad():
        n = weight_norm(weight, A.detach(), B.detach(), scale, weight_sq, x.dtype)
    u = x2 @ compute_factor(A, x.dtype, acc).T
    z = x2 @ weight.to(acc).T + scale * (u @ compute_factor(B, x.dtype, acc).T)
    y = z * factor(magnitude, n)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0]), z.to(x.dtype), u, n


def dora_linear(x, weight, A, B, magnitude, *, scale=1.0, bias=None, weight_sq=None):
    """The op's output ``y`` (see the module docstring)."""
    return forward(x, weight, A, B, magnitude, DoraOptions(scale, bias, weight_sq))[0]


def backward(dy, x, weight, A, B, magnitude, z, u, n, opts: DoraOptions, needs):
    """``[dx, dA, dB, dmagnitude, dbias]`` for the inputs flagged in ``needs`` (None otherwise);
    ``x`` is read for dA only, ``u`` for dB, ``z`` for dmagnitude."""
    scale = opts.scale
    need_x, need_a, need_b, need_m, need_bias = needs
    acc = n.dtype
    dy2 = dy.reshape(-1, dy.shape[-1]).to(acc)
    f = factor(magnitude, n)
    dyf = dy2 * f
    grads: list[Optional[torch.Tensor]] = [None] * 5
    g = dyf @ compute_factor(B, dy.dtype, acc)
    if need_x:
        dx = dyf @ weight.to(acc) + scale * (g @ compute_factor(A, dy.dtype, acc))
        grads[0] = dx.reshape(dy.shape[:-1] + (weight.shape[1],)).to(dy.dtype)
    if need_a:
        grads[1] = (scale * (g.T @ x.reshape(-1, x.shape[-1]).to(acc))).to(A.dtype)
    if need_b:
        grads[2] = (scale * (dyf.T @ u.to(acc))).to(B.dtype)
    if need_m:
        inv_n = factor(torch.ones_like(n), n)
        grads[3] = ((dy2 * z.to(acc)).sum(0) * inv_n).to(magnitude.dtype)
    if need_bias:
        grads[4] = dy2.sum(0).to(weight.dtype)
    return grads
