"""Torch composition of the fused low-rank linear op (the ``torch`` backend: the CPU path, valid on any device).

Same math as :mod:`corda_kernels.kernels.reference.lowrank_linear`, organised for speed in the
inputs' own dtype: the compact factors are zero-padded to dense ``(r, in)`` / ``(out, r)`` copies
(``r`` is small, so this costs O(r · d) memory and a few percent of the base FLOPs) and the
low-rank term is accumulated straight into the output with ``addmm_``. So without dropout neither
the forward nor the backward forms an ``(N, n_rows)`` or ``(N, n_cols)`` temporary, and index
sets need no gather of ``x`` or ``dy``. With dropout, ``x_c`` is gathered and masked once
(``(N, n_cols)``) and ``dx``'s low-rank part is added with ``index_add_``. ``u`` (``(N, r)``) is
returned in the accumulation dtype (fp32, or fp64 for fp64 inputs).

fp32 factors on a 16-bit ``x`` are rounded to ``x``'s dtype once per call (factor-sized casts,
the reference's rounding rule); their gradients come back in fp32 (``ddiag`` accumulated in fp32,
``dA`` / ``dB`` as products in the compute dtype, widened: CPU matmuls have no fp32 output for
16-bit inputs, and widening ``x`` instead would be an activation-sized pass).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from ..._dtypes import accumulation_dtype
from ..reference.lowrank_linear import Options, diag_scale


def _dense_cols(A: torch.Tensor, col_index: Optional[torch.Tensor], in_features: int) -> torch.Tensor:
    """``A`` (r, n_cols) placed at columns ``col_index`` of a zero ``(r, in)`` matrix."""
    if col_index is None:
        return A
    return A.new_zeros(A.shape[0], in_features).index_copy_(1, col_index, A)


def _dense_rows(B: torch.Tensor, row_index: Optional[torch.Tensor], out_features: int) -> torch.Tensor:
    """``B`` (n_rows, r) placed at rows ``row_index`` of a zero ``(out, r)`` matrix."""
    if row_index is None:
        return B
    return B.new_zeros(out_features, B.shape[1]).index_copy_(0, row_index, B)


def _dropped_cols(x2, col_index, keep):
    xc = x2 if col_index is None else x2.index_select(1, col_index)
    return xc * keep


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (no call when it already is: a no-op ``.to`` still costs µs per call)."""
    return t if t.dtype == dtype else t.to(dtype)


def forward(x, weight, A, B, opts: Options):
    """``(y, u)`` with ``y`` of shape ``(..., out)`` in ``x.dtype`` and ``u`` ``(N, r)`` fp32/fp64."""
    scale, bias, row_index, col_index, diag, dropout, _ = opts
    out_f, in_f = weight.shape
    keep = opts.keep(x.numel() // max(in_f, 1), A.shape[1], x.device)
    dtype = x.dtype
    acc = accumulation_dtype(dtype)
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
    A, B = _as(A, dtype), _as(B, dtype)
    if keep is None:
        u = _as(F.linear(x2, _dense_cols(A, col_index, in_f)), acc)
    else:
        u = _as(F.linear(_dropped_cols(x2, col_index, keep), A), acc).mul_(1.0 / (1.0 - dropout))
    y = F.linear(x2, weight, bias)
    if dtype == acc:  # no rounding of t: fold the scale into the product (one op fewer per call)
        t = u if diag is None else u * diag
        y.addmm_(t, _dense_rows(B, row_index, out_f).T, alpha=scale)
    else:
        t = (u * diag_scale(diag, scale, A.shape[0], acc, x.device)).to(dtype)
        y.addmm_(t, _dense_rows(B, row_index, out_f).T)
    return (y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)), u


def forward_autograd(x, weight, A, B, bias, diag, scale):
    """``y`` for the plain case (every tensor fp32 or every tensor fp64; no index sets, no
    dropout) in differentiable torch ops: the products of :func:`forward`, with autograd's C++
    engine running the backward. No Python runs per layer in the backward, which is what a
    training step of small layers on the CPU spends its time on. Saves what autograd's own
    ``mm``/``addmm`` save (``x`` only when ``A`` or ``weight`` needs a gradient, ``u`` for ``B``)."""
    out_f, in_f = weight.shape
    x2 = x if x.dim() == 2 else x.reshape(-1, in_f)
    u = F.linear(x2, A)
    y = F.linear(x2, weight, bias).addmm_(u if diag is None else u * diag, B.T, alpha=scale)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], out_f)


def backward(dy, x, weight, A, B, u, opts: Options, needs):
    """``[dx, dweight, dA, dB, ddiag, dbias]`` for the inputs flagged in ``needs`` (None otherwise)."""
    scale, _, row_index, col_index, diag, dropout, _ = opts
    need_x, need_w, need_a, need_b, need_d, need_bias = needs
    out_f, in_f = weight.shape
    keep = opts.keep(dy.numel() // max(out_f, 1), A.shape[1], dy.device)
    dtype = dy.dtype
    acc = accumulation_dtype(dtype)
    # contiguous: a broadcast dy (stride 0, e.g. from y.sum()) sends CPU matmuls down a slow non-BLAS path
    dy = dy.contiguous()
    dy2 = dy if dy.dim() == 2 else dy.reshape(-1, out_f)
    A_dtype, B_dtype = A.dtype, B.dtype
    A, B = _as(A, dtype), _as(B, dtype)
    ds = scale if diag is None else diag_scale(diag, scale, A.shape[0], acc, dy.device)  # a scalar is one op fewer
    grads: list[Optional[torch.Tensor]] = [None] * 6
    g = h = None
    if need_x or need_a or need_d:
        g = _as(dy2 @ _dense_rows(B, row_index, out_f), acc)
        h = _as(g * ds, dtype)
    if need_x:
        dx = dy2 @ weight
        if keep is None:
            dx.addmm_(h, _dense_cols(A, col_index, in_f))
        else:
            low = (h @ A).mul_(keep).mul_(1.0 / (1.0 - dropout))
            if col_index is None:
                dx += low
            else:
                dx.index_add_(1, col_index, low)
        grads[0] = dx if dy.dim() == 2 else dx.reshape(dy.shape[:-1] + (in_f,))
    x2 = None if x is None else (x if x.dim() == 2 else x.reshape(-1, in_f))
    if need_w:
        grads[1] = dy2.T @ x2
    if need_a:
        if keep is None:
            dA = h.T @ x2
            dA = dA if col_index is None else dA.index_select(1, col_index)
        else:
            dA = (h.T @ _dropped_cols(x2, col_index, keep)).mul_(1.0 / (1.0 - dropout))
        grads[2] = _as(dA, A_dtype)
    if need_b:
        dB = dy2.T @ _as(u * ds, dtype)
        grads[3] = _as(dB if row_index is None else dB.index_select(0, row_index), B_dtype)
    if need_d:
        grads[4] = _as(scale * (g * u).sum(0), diag.dtype)
    if need_bias:
        grads[5] = dy2.sum(0)
    return grads
