"""Torch composition of the segmented many-adapter low-rank op (the ``torch`` backend: the CPU path,
valid on any device).

Same math as :mod:`corda_kernels.kernels.reference.segmented`, organised for speed in the inputs'
own dtype: the base GEMM ``x·Wᵀ + b`` runs once over every row, then rows are grouped by adapter
(one stable ``argsort`` of the index and one ``bincount`` per call: :func:`groups`) and each
adapter present runs its two skinny GEMMs on its rows only, added into ``y`` with ``index_add_``
(or in place, on a slice, when the index is already sorted: then no gather or scatter at all).
Rows of index -1 are in no group. The backward groups the same way: ``g = dy_rows·B_a``,
``dx_rows += (g ⊙ v_a)·A_a``, ``dA_a = (g ⊙ v_a)ᵀ x_rows``, ``dB_a = dy_rowsᵀ (u_rows ⊙ v_a)``; the
base ``dy·W`` and ``dW = dyᵀx`` once. Each group's work is a handful of torch calls, which is what
a many-adapter call spends its time on at small sizes; so each group's products skip its rank
padding (``ranks``), in fp32/fp64 (no rounding between products) the scale ``s_a`` rides on the
GEMM's ``alpha`` (``(u ⊙ v_a)·B_aᵀ = s_a·u·B_aᵀ`` on the live ranks) and ``dB`` is scaled by ``v``
once at the end, products are written straight into ``dA_a`` / ``dB_a``, and ``u`` is not stored
when no gradient reads it (a no-grad forward). 16-bit inputs keep the
reference's order (``u ⊙ v`` rounded to the compute dtype, then the product).

Why grouping and not a gather of per-row factors (``bmm`` of ``x[m]`` with ``A[index[m]]``, BGMV
style): on the CPU the gather reads ``N·r·in`` factor numbers where grouping reads each adapter's
factors once, and it lost at every measured size, small token counts included
(``bench/studies/segmented_grouping.py``, one thread, 1024² base, r 64, random indices, ms, best of 7;
2-core CPU shared with other jobs, load average 4.9): 4 adapters, 8 rows: grouped 0.52, gather 1.39;
16 adapters, 64 rows: 2.67 vs 11.86; 64 adapters, 8 rows: 0.71 vs 1.75; 64 adapters, 256 rows: 12.4
vs 113. Padding every group to the largest and running two ``bmm`` (no Python loop) was not faster
either (64 adapters, 1024 rows: 35.8 vs 33.5; 64 adapters, 8 rows: 2.56 vs 0.71) and costs memory when
groups are skewed. Grouping needs the group sizes on the host (one ``.tolist()``: a device sync on
CUDA, where Triton is the default backend).

fp32 factors on a 16-bit ``x`` are rounded to ``x``'s dtype once per call (factor-sized casts, the
reference's rounding rule); their gradients come back in fp32 (products in the compute dtype,
widened, as the single-adapter torch path does). ``u`` (``(N, r_max)``) is returned in the
accumulation dtype; its rows of index -1 hold zeros.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch.nn import functional as F

from ..._dtypes import accumulation_dtype
from ..reference.segmented import adapter_scales

Rows = Union[slice, torch.Tensor]


def groups(index: torch.Tensor, n_adapters: int) -> list[tuple[int, Rows]]:
    """``[(adapter, rows), ...]`` for every adapter with rows in ``index`` (``(N,)`` int64, -1 for
    none): ``rows`` a slice when the index is sorted (the rows are contiguous), else an int64 tensor of
    row numbers in ascending order. One host sync (group sizes and sortedness in one transfer)."""
    N = index.numel()
    if N == 0:
        return []
    counts = torch.bincount(index + 1, minlength=n_adapters + 1)
    is_sorted = (index[1:] >= index[:-1]).all() if N > 1 else torch.ones((), dtype=torch.bool, device=index.device)
    host = torch.cat([counts, is_sorted.to(counts.dtype)[None]]).tolist()
    counts_h, is_sorted = host[:-1], bool(host[-1])
    order = None if is_sorted else torch.argsort(index, stable=True)
    out = []
    start = counts_h[0]  # rows of -1 come first
    for a in range(n_adapters):
        c = counts_h[a + 1]
        if c:
            out.append((a, slice(start, start + c) if is_sorted else order[start : start + c]))
        start += c
    return out


def _take(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _add_rows(y: torch.Tensor, rows: Rows, t: torch.Tensor, f: torch.Tensor, alpha: float = 1.0) -> None:
    """``y[rows] += alpha · t · f`` (in place on a slice, ``index_add_`` otherwise)."""
    if isinstance(rows, slice):
        y[rows].addmm_(t, f, alpha=alpha)
    else:
        y.index_add_(0, rows, t @ f, alpha=alpha)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def forward(x, weight, A, B, index, scales, ranks=None, bias=None, keep_u=True):
    """``(y, u)``: ``y (..., out)`` in ``x.dtype``, ``u (N, r_max)`` fp32 (fp64 for fp64 inputs);
    ``keep_u=False`` (no gradient will read it) skips writing ``u`` and returns None."""
    out_f, in_f = weight.shape
    n, r_max = A.shape[0], A.shape[1]
    dtype = x.dtype
    acc = accumulation_dtype(dtype)
    x2 = x.reshape(-1, in_f)
    y = F.linear(x2, weight, bias)
    u = torch.zeros(x2.shape[0], r_max, dtype=acc, device=x.device) if keep_u else None
    grouped = groups(index.reshape(-1), n)
    if grouped:
        v = adapter_scales(scales, ranks, r_max, acc, x.device)
        exact = dtype == acc
        live = _live_ranks(ranks, n, r_max)
        s_a = scales.tolist()
        A_a = _as(A, dtype).unbind(0)
        Bt_a = _as(B, dtype).transpose(1, 2).unbind(0)
        v_a = v.unbind(0)
        for a, rows in grouped:
            r = live[a]
            ua = F.linear(_take(x2, rows), A_a[a][:r])
            if keep_u:
                _put_rows(u[:, :r], rows, ua)
            if exact:  # v is s_a on the live ranks: the scale rides on the GEMM's alpha
                _add_rows(y, rows, ua, Bt_a[a][:r], s_a[a])
            else:
                _add_rows(y, rows, _as(_as(ua, acc) * v_a[a][:r], dtype), Bt_a[a][:r])
    return y.reshape(*x.shape[:-1], out_f), u


def _live_ranks(ranks: Optional[torch.Tensor], n: int, r_max: int) -> list[int]:
    """Each adapter's rank (``r_max`` without ``ranks``): a group's products skip its padding."""
    return [r_max] * n if ranks is None else [min(int(r), r_max) for r in ranks.tolist()]


def _put_rows(u: torch.Tensor, rows: Rows, values: torch.Tensor) -> None:
    if isinstance(rows, slice):
        u[rows] = values
    else:
        u.index_copy_(0, rows, _as(values, u.dtype))


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out = a · b`` (straight into ``out`` when the dtypes agree; else computed, then cast in)."""
    if out.dtype == a.dtype == b.dtype and out.is_contiguous():
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def backward(dy, x, weight, A, B, index, scales, ranks, u, needs):
    """``[dx, dweight, dA, dB, dbias]`` for the inputs flagged in ``needs`` (None otherwise)."""
    need_x, need_w, need_a, need_b, need_bias = needs
    out_f, in_f = weight.shape
    n, r_max = A.shape[0], A.shape[1]
    dtype = dy.dtype
    acc = accumulation_dtype(dtype)
    dy2 = dy.contiguous().reshape(-1, out_f)  # a broadcast dy (stride 0) sends CPU matmuls down a slow path
    x2 = None if x is None else x.reshape(-1, in_f)
    grads: list[Optional[torch.Tensor]] = [None] * 5
    dx = dy2 @ weight if need_x else None
    dA = torch.zeros(A.shape, dtype=A.dtype, device=A.device) if need_a else None
    dB = torch.zeros(B.shape, dtype=B.dtype, device=B.device) if need_b else None
    if need_x or need_a or need_b:
        grouped = groups(index.reshape(-1), n)
        v = adapter_scales(scales, ranks, r_max, acc, dy.device)
        exact = dtype == acc
        A_a = _as(A, dtype).unbind(0)
        B_a = _as(B, dtype).unbind(0)
        v_a = v.unbind(0)
        live = _live_ranks(ranks, n, r_max)
        s_a = scales.tolist()
        dA_a = None if dA is None else dA.unbind(0)
        dB_a = None if dB is None else dB.unbind(0)
        for a, rows in grouped:
            r = live[a]
            dyg = _take(dy2, rows)
            Ba, va = B_a[a][:, :r], v_a[a][:r]
            if need_x or need_a:
                h = (dyg @ Ba).mul_(s_a[a]) if exact else _as(_as(dyg @ Ba, acc) * va, dtype)  # (dy·B_a) ⊙ v_a
                if need_x:
                    _add_rows(dx, rows, h, A_a[a][:r])
                if need_a:
                    _mm_into(dA_a[a][:r], h.T, _take(x2, rows))
            if need_b:  # exact dtypes: dy_aᵀ u_a here, ⊙ v once for all adapters below
                ua = _take(u, rows)[:, :r]
                _mm_into(dB_a[a][:, :r], dyg.T, ua if exact else _as(ua * va, dtype))
        if need_b and exact:
            dB.mul_(v[:, None, :])
    if need_x:
        grads[0] = dx.reshape(dy.shape[:-1] + (in_f,))
    if need_w:
        grads[1] = dy2.T @ x2
    grads[2], grads[3] = dA, dB
    if need_bias:
        grads[4] = dy2.sum(0)
    return grads
