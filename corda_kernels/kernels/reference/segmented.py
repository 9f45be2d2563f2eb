"""Reference (specification) of the segmented many-adapter low-rank linear op and its gradients.

Many LoRA-style adapters share one frozen base layer; each row of ``x`` (a token, or a whole
sequence) names the adapter it uses, and one call serves the mixed batch (Punica / S-LoRA style
multi-adapter serving and training). With ``x`` viewed as ``(N, in)`` and ``a = index[m]`` the
adapter of row ``m``::

    u[m]  = x[m] · A_aᵀ                                  (r_max,)  in the accumulation dtype
    y[m]  = x[m] · weightᵀ + bias + (u[m] ⊙ v_a) · B_aᵀ  (out,)    cast to x.dtype
    y[m]  = x[m] · weightᵀ + bias                         when a == -1 (no adapter)

Shapes: ``x (N, in)`` (the op flattens leading dims), ``weight (out, in)``, ``A (n, r_max, in)`` and
``B (n, out, r_max)`` the adapters' factors stacked and zero-padded to the largest rank ``r_max``,
``index (N,)`` int64 in ``[-1, n)``, ``bias (out,)``. ``v (n, r_max)`` is :func:`adapter_scales`:
adapter ``a``'s scale ``s_a`` on its first ``ranks[a]`` rank components and 0 on the padding, so
padded rows of ``A_a`` / columns of ``B_a`` never contribute, whatever they hold, and get zero
gradient.

Precision as in :mod:`corda_kernels.kernels.reference.lowrank_linear`: the accumulation dtype is
fp64 for fp64 inputs and fp32 otherwise, and this module computes everything in it (the precision
oracle). ``A`` / ``B`` may be fp32 on a 16-bit ``x`` / ``weight`` (the compute dtype); they are
rounded to the compute dtype where they enter a product (:func:`compute_factor`), ``v`` never is;
their gradients are accumulated in fp32 and returned in each factor's own dtype.

The gradients (``g_m = dy[m] · B_a``, rows of adapter ``a`` only; ``v_a`` as above)::

    dx[m] = dy[m] · weight + (g_m ⊙ v_a) · A_a
    dA_a  = Σ_{m: index[m]=a} (g_m ⊙ v_a)ᵀ x[m]          dB_a = Σ_{m: index[m]=a} dy[m]ᵀ (u[m] ⊙ v_a)
    dweight = dyᵀ · x                                     dbias = Σ_m dy[m]

This module loops over the adapters and masks rows (every adapter's products over every row), which
is slow but obviously right; the torch and Triton backends group rows by adapter instead.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._dtypes import accumulation_dtype
from .lowrank_linear import compute_factor


def adapter_scales(
    scales: torch.Tensor, ranks: Optional[torch.Tensor], r_max: int, dtype: torch.dtype, device
) -> torch.Tensor:
    """``v (n, r_max)``: ``scales[a]`` on adapter ``a``'s first ``ranks[a]`` rank components and 0
    on its padding (``ranks`` None: every adapter has rank ``r_max``)."""
    v = scales.to(device=device, dtype=dtype)[:, None].expand(-1, r_max)
    if ranks is None:
        return v.contiguous()
    live = torch.arange(r_max, device=device)[None, :] < ranks.to(device)[:, None]
    return v * live


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    index: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    keep_u: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, u)``: ``y (..., out)`` in ``x.dtype``, ``u (N, r_max)`` in the accumulation dtype (rows
    of index -1 hold zeros). ``index`` has ``x.shape[:-1]`` (or ``(N,)``) entries. Differentiable
    by torch autograd (the gradients' specification). ``keep_u`` (whether a gradient will read ``u``)
    is the backends' common signature; the specification always returns ``u``."""
    acc = accumulation_dtype(x.dtype)
    n, r_max = A.shape[0], A.shape[1]
    x2 = x.reshape(-1, x.shape[-1]).to(acc)
    idx = index.reshape(-1)
    v = adapter_scales(scales, ranks, r_max, acc, x.device)
    y = x2 @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    u = x2.new_zeros(x2.shape[0], r_max)
    for a in range(n):
        rows = (idx == a)[:, None]
        u_a = x2 @ compute_factor(A[a], x.dtype, acc).T
        low = (u_a * v[a]) @ compute_factor(B[a], x.dtype, acc).T
        u = torch.where(rows, u_a, u)
        y = y + torch.where(rows, low, torch.zeros_like(low))
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0]), u


def lowrank_linear_segmented(x, weight, A, B, index, scales, ranks=None, bias=None) -> torch.Tensor:
    """The op's output ``y`` (see the module docstring)."""
    return forward(x, weight, A, B, index, scales, ranks, bias)[0]


def backward(
    dy: torch.Tensor,
    x: Optional[torch.Tensor],
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    index: torch.Tensor,
    scales: torch.Tensor,
    ranks: Optional[torch.Tensor],
    u: Optional[torch.Tensor],
    needs: tuple[bool, bool, bool, bool, bool],
) -> list[Optional[torch.Tensor]]:
    """``[dx, dweight, dA, dB, dbias]`` for the inputs flagged in ``needs`` (None otherwise).

    ``x`` is only read for dweight/dA and ``u`` only for dB, so callers save them only then.
    """
    need_x, need_w, need_a, need_b, need_bias = needs
    acc = u.dtype if u is not None else accumulation_dtype(dy.dtype)
    n, r_max = A.shape[0], A.shape[1]
    dy2 = dy.reshape(-1, dy.shape[-1]).to(acc)
    idx = index.reshape(-1)
    v = adapter_scales(scales, ranks, r_max, acc, dy.device)
    x2 = None if x is None else x.reshape(-1, x.shape[-1]).to(acc)
    dx = dy2 @ weight.to(acc) if need_x else None
    dA = torch.zeros(A.shape, dtype=acc, device=A.device) if need_a else None
    dB = torch.zeros(B.shape, dtype=acc, device=B.device) if need_b else None
    for a in range(n):
        rows = (idx == a)[:, None].to(acc)
        h = (dy2 @ compute_factor(B[a], dy.dtype, acc)) * v[a] * rows
        if need_x:
            dx = dx + h @ compute_factor(A[a], dy.dtype, acc)
        if need_a:
            dA[a] = h.T @ x2
        if need_b:
            dB[a] = (dy2 * rows).T @ (u * v[a])
    grads: list[Optional[torch.Tensor]] = [None] * 5
    if need_x:
        grads[0] = dx.reshape(dy.shape[:-1] + (weight.shape[1],)).to(dy.dtype)
    if need_w:
        grads[1] = (dy2.T @ x2).to(weight.dtype)
    if need_a:
        grads[2] = dA.to(A.dtype)
    if need_b:
        grads[3] = dB.to(B.dtype)
    if need_bias:
        grads[4] = dy2.sum(0).to(weight.dtype)
    return grads
