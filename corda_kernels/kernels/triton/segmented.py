"""Triton kernels of the segmented many-adapter low-rank op (Punica's SGMV idea): skinny GEMMs over
row tiles grouped by adapter. The base GEMM ``x·Wᵀ + b`` (and ``dy·W``, ``dyᵀx``) stays torch /
cuBLAS; these kernels add the adapters' terms.

Notation as in :mod:`corda_kernels.kernels.reference.segmented` (``v (n, r_max)``: each adapter's
scale on its live rank components, 0 on the padding; ``ranks[a]`` its rank).

Grouping (:func:`tile_map`, torch ops on the device, no host sync): the rows with an adapter are
sorted by it (stable ``argsort``; ``order`` lists row numbers adapter by adapter) and each adapter's
segment is cut into tiles of ``BLOCK_M`` rows. The grid has the static upper bound
``cdiv(N, BLOCK_M) + n`` tiles; for tile ``t`` the map gives its adapter (-1: past the last tile, the
program exits) and its ``[start, end)`` in ``order``. Rows of index -1 are in no tile.

- ``_seg_shrink_kernel``: ``U[m, :R_a] = G[m, :] · F_a`` for the rows ``m`` of a tile of adapter
  ``a``, a skinny ``(rows, r)`` GEMM gathering its rows through ``order``; rank components at or
  past ``R_a = ranks[a]`` are neither read nor written (``U`` starts zeroed). Forward:
  ``u = x·A_aᵀ``; backward: ``g = dy·B_a``. Grid: tiles x rank blocks.
- ``_seg_expand_kernel``: ``Y[m, :] += ((T[m, :R_a] ⊙ v_a) · F_a)``, read-modify-write of the
  tile's rows of ``Y`` (every row is in at most one tile: no races); ``ceil(R_a / BLOCK_K)``
  K-iterations. Forward: ``y += (u ⊙ v_a)·B_aᵀ`` onto the base result; backward:
  ``dx += (g ⊙ v_a)·A_a`` onto ``dy·W``. Grid: tiles x output-column blocks.
- ``_seg_gram_kernel``: ``C_a[p, :R_a] = Σ_{m in segment a} G[m, p] (H[m, :] ⊙ v_a)``, a
  reduction over each adapter's rows, split over ``SPLIT`` programs per adapter with fp32 atomics
  when the grid would be too small. ``dB_a = dy_aᵀ (u_a ⊙ v_a)`` and ``dA_aᵀ = x_aᵀ (g_a ⊙ v_a)``.
  Grid: feature blocks x rank blocks x (adapters · SPLIT).

``u`` and ``g`` are fp32 ``(N, r_max)``; ``T ⊙ v`` / ``H ⊙ v`` are rounded to the input dtype right
before their ``tl.dot`` (as a same-dtype torch composition rounds them); fp32 factors on 16-bit
inputs are read as stored and rounded at the ``tl.dot`` inputs (the reference's rounding rule).
Every ``tl.dot`` accumulates in fp32; fp32 inputs use ``input_precision="ieee"``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._backend import triton_interpreted
from ..reference.segmented import adapter_scales
from . import sm_count


@triton.jit
def _tile_rows(tile_adapter_ptr, tile_start_ptr, tile_end_ptr, order_ptr, BLOCK_M: tl.constexpr):
    """``(adapter, rows, row_ok)`` of this program's tile (adapter -1: no tile)."""
    pid = tl.program_id(0)
    a = tl.load(tile_adapter_ptr + pid)
    start = tl.load(tile_start_ptr + pid)
    end = tl.load(tile_end_ptr + pid)
    offs = start + tl.arange(0, BLOCK_M)
    row_ok = offs < end
    rows = tl.load(order_ptr + offs, mask=row_ok, other=0).to(tl.int64)
    return a, rows, row_ok


@triton.jit
def _seg_shrink_kernel(
    g_ptr,
    f_ptr,
    u_ptr,
    rank_ptr,
    order_ptr,
    tile_adapter_ptr,
    tile_start_ptr,
    tile_end_ptr,
    J,
    stride_gm,
    stride_gk,
    stride_fa,
    stride_fj,
    stride_fr,
    stride_um,
    stride_ur,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    a, rows, m_ok = _tile_rows(tile_adapter_ptr, tile_start_ptr, tile_end_ptr, order_ptr, BLOCK_M)
    if a < 0:
        return
    r_a = tl.load(rank_ptr + a)
    r0 = tl.program_id(1) * BLOCK_R
    if r0 >= r_a:
        return
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_ok = offs_r < r_a
    g_rows = g_ptr + rows[:, None] * stride_gm
    f_base = f_ptr + a.to(tl.int64) * stride_fa + offs_r[None, :] * stride_fr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < J
        g = tl.load(g_rows + offs_j[None, :] * stride_gk, mask=m_ok[:, None] & j_ok[None, :], other=0.0)
        f = tl.load(
            f_base + offs_j.to(tl.int64)[:, None] * stride_fj, mask=j_ok[:, None] & r_ok[None, :], other=0.0
        ).to(g_ptr.dtype.element_ty)
        acc = tl.dot(g, f, acc, input_precision=PRECISION, out_dtype=tl.float32)
    u_ptrs = u_ptr + rows[:, None] * stride_um + offs_r[None, :] * stride_ur
    tl.store(u_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _seg_expand_kernel(
    y_ptr,
    t_ptr,
    v_ptr,
    f_ptr,
    rank_ptr,
    order_ptr,
    tile_adapter_ptr,
    tile_start_ptr,
    tile_end_ptr,
    N,
    stride_ym,
    stride_yn,
    stride_tm,
    stride_tr,
    stride_va,
    stride_fa,
    stride_fr,
    stride_fn,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    a, rows, m_ok = _tile_rows(tile_adapter_ptr, tile_start_ptr, tile_end_ptr, order_ptr, BLOCK_M)
    if a < 0:
        return
    r_a = tl.load(rank_ptr + a)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    t_rows = t_ptr + rows[:, None] * stride_tm
    f_cols = f_ptr + a.to(tl.int64) * stride_fa + offs_n.to(tl.int64)[None, :] * stride_fn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, r_a, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < r_a
        v = tl.load(v_ptr + a * stride_va + offs_k, mask=k_ok, other=0.0)
        t = tl.load(t_rows + offs_k[None, :] * stride_tr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        t = (t * v[None, :]).to(y_ptr.dtype.element_ty)
        f = tl.load(f_cols + offs_k[:, None] * stride_fr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(t, f.to(y_ptr.dtype.element_ty), acc, input_precision=PRECISION, out_dtype=tl.float32)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_ok = m_ok[:, None] & n_ok[None, :]
    y = tl.load(y_ptrs, mask=y_ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=y_ok)


@triton.jit
def _seg_gram_kernel(
    g_ptr,
    h_ptr,
    v_ptr,
    c_ptr,
    rank_ptr,
    order_ptr,
    seg_start_ptr,
    seg_count_ptr,
    P,
    stride_gm,
    stride_gk,
    stride_hm,
    stride_hr,
    stride_va,
    stride_ca,
    stride_cp,
    stride_cr,
    SPLIT: tl.constexpr,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    a = tl.program_id(2) // SPLIT
    part = tl.program_id(2) % SPLIT
    r_a = tl.load(rank_ptr + a)
    r0 = tl.program_id(1) * BLOCK_R
    start = tl.load(seg_start_ptr + a)
    count = tl.load(seg_count_ptr + a)
    per_part = (count + SPLIT - 1) // SPLIT
    m_begin = start + part * per_part
    m_end = tl.minimum(start + count, m_begin + per_part)
    if (r0 >= r_a) | (m_begin >= m_end):
        return  # C starts zeroed: padding and adapters without rows keep zero
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = r0 + tl.arange(0, BLOCK_R)
    p_ok = offs_p < P
    r_ok = offs_r < r_a
    v = tl.load(v_ptr + a * stride_va + offs_r, mask=r_ok, other=0.0)
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        rows = tl.load(order_ptr + offs_m, mask=m_ok, other=0).to(tl.int64)
        g = tl.load(
            g_ptr + rows[:, None] * stride_gm + offs_p[None, :] * stride_gk,
            mask=m_ok[:, None] & p_ok[None, :],
            other=0.0,
        )
        h = tl.load(
            h_ptr + rows[:, None] * stride_hm + offs_r[None, :] * stride_hr,
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        h = (h * v[None, :]).to(g_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(g), h, acc, input_precision=PRECISION, out_dtype=tl.float32)
    c_ptrs = c_ptr + a.to(tl.int64) * stride_ca + offs_p.to(tl.int64)[:, None] * stride_cp + offs_r[None, :] * stride_cr
    c_ok = p_ok[:, None] & r_ok[None, :]
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=c_ok)
    else:
        tl.store(c_ptrs, acc, mask=c_ok)


def launch_config(dtype: torch.dtype, r_max: int, n_rows: int, n_adapters: int, device: torch.device) -> dict:
    """Tile sizes: 16-wide in the interpreter (it executes every lane in numpy); on CUDA see
    :func:`gpu_config`."""
    if triton_interpreted() or device.type != "cuda":
        return dict(bm=16, bn=16, bk=16, bj=16, br=16, bp=16, bm_gram=16, warps=1, stages=1)
    return gpu_config(dtype, r_max, n_rows, n_adapters)


def gpu_config(dtype: torch.dtype, r_max: int, n_rows: int, n_adapters: int) -> dict:
    """CUDA (not tuned on a GPU yet): row tiles sized to the mean segment (16 to 64 rows: one token per
    adapter is a 16-row tile, not a mostly empty 64-row one), the rank in one block up to 128,
    reduction slices of 64 (16-bit) / 32 (fp32), 64-wide output-column and feature tiles (32-wide
    feature tiles in fp32 gradients: 64 x 64 and wider fp32 accumulators spill registers on sm_90,
    tests/kernels/test_triton_compile.py)."""
    fp32 = dtype == torch.float32
    bk = 32 if fp32 else 64
    br = min(128, max(16, triton.next_power_of_2(r_max)))
    mean_rows = triton.cdiv(max(n_rows, 1), max(n_adapters, 1))
    bm = min(64, max(16, triton.next_power_of_2(mean_rows)))
    return dict(bm=bm, bn=64, bk=min(br, 64), bj=bk, br=br, bp=32 if fp32 else 64, bm_gram=bk, warps=4, stages=3)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class Grouping:
    """Rows grouped by adapter, on the device (no host sync): ``order`` (int32 row numbers, adapter
    by adapter, rows of -1 last and in no segment), per adapter ``seg_start`` / ``seg_count`` (into
    ``order``), and the tile map of ``BLOCK_M``-row tiles (``tile_adapter`` -1 past the last tile)."""

    def __init__(self, index: torch.Tensor, n_adapters: int, block_m: int):
        device = index.device
        N = index.numel()
        key = torch.where(index >= 0, index, n_adapters)  # rows of -1 sort last
        self.order = torch.argsort(key, stable=True).to(torch.int32)
        counts = torch.bincount(key, minlength=n_adapters + 1)[:n_adapters]
        self.seg_count = counts.to(torch.int32)
        starts = torch.cumsum(counts, 0) - counts
        self.seg_start = starts.to(torch.int32)
        tiles = (counts + block_m - 1) // block_m
        tile_end = torch.cumsum(tiles, 0)
        n_tiles = triton.cdiv(N, block_m) + n_adapters  # >= sum(tiles): a static grid
        t = torch.arange(n_tiles, device=device)
        a = torch.searchsorted(tile_end, t, right=True)
        a_c = a.clamp(max=n_adapters - 1)
        first = starts[a_c] + (t - (tile_end[a_c] - tiles[a_c])) * block_m
        self.tile_adapter = torch.where(a < n_adapters, a_c, -1).to(torch.int32)
        self.tile_start = first.to(torch.int32)
        self.tile_end = (starts[a_c] + counts[a_c]).to(torch.int32)
        self.n_tiles = n_tiles


def _shrink(out, g, f, f_strides, ranks, grouping, cfg):
    """out (N, r_max) fp32, zeroed: out[rows of a, :ranks[a]] = g[rows] @ f_a, f_a viewed as (J, r)."""
    J = g.shape[1]
    _seg_shrink_kernel[(grouping.n_tiles, triton.cdiv(out.shape[1], cfg["br"]))](
        g,
        f,
        out,
        ranks,
        grouping.order,
        grouping.tile_adapter,
        grouping.tile_start,
        grouping.tile_end,
        J,
        g.stride(0),
        g.stride(1),
        *f_strides,
        out.stride(0),
        out.stride(1),
        PRECISION=_precision(g.dtype),
        BLOCK_M=cfg["bm"],
        BLOCK_J=cfg["bj"],
        BLOCK_R=cfg["br"],
        num_warps=cfg["warps"],
        num_stages=cfg["stages"],
    )


def _expand(y, t, v, f, f_strides, ranks, grouping, cfg):
    """y[rows of a] += (t[rows, :ranks[a]] ⊙ v_a) @ f_a, f_a viewed as (r, y.shape[1])."""
    N = y.shape[1]
    _seg_expand_kernel[(grouping.n_tiles, triton.cdiv(N, cfg["bn"]))](
        y,
        t,
        v,
        f,
        ranks,
        grouping.order,
        grouping.tile_adapter,
        grouping.tile_start,
        grouping.tile_end,
        N,
        y.stride(0),
        y.stride(1),
        t.stride(0),
        t.stride(1),
        v.stride(0),
        *f_strides,
        PRECISION=_precision(y.dtype),
        BLOCK_M=cfg["bm"],
        BLOCK_N=cfg["bn"],
        BLOCK_K=cfg["bk"],
        num_warps=cfg["warps"],
        num_stages=cfg["stages"],
    )


def _gram(out, out_strides, g, h, v, ranks, grouping, cfg):
    """out (n, P, r) via out_strides, a zeroed fp32 buffer: out_a = g[rows of a]ᵀ @ (h[rows of a] ⊙ v_a)."""
    M, P = g.shape
    n, R = v.shape
    bp, br, bm = cfg["bp"], cfg["br"], cfg["bm_gram"]
    tiles = triton.cdiv(P, bp) * triton.cdiv(R, br)
    # Enough programs for the GPU even when one adapter holds most rows; no split below 8 row slices.
    split = max(1, min(triton.cdiv(2 * sm_count(g.device), tiles), M // (8 * bm)))
    _seg_gram_kernel[(triton.cdiv(P, bp), triton.cdiv(R, br), n * split)](
        g,
        h,
        v,
        out,
        ranks,
        grouping.order,
        grouping.seg_start,
        grouping.seg_count,
        P,
        g.stride(0),
        g.stride(1),
        h.stride(0),
        h.stride(1),
        v.stride(0),
        *out_strides,
        SPLIT=split,
        ATOMIC=split > 1,
        PRECISION=_precision(g.dtype),
        BLOCK_P=bp,
        BLOCK_R=br,
        BLOCK_M=bm,
        num_warps=cfg["warps"],
        num_stages=cfg["stages"],
    )


def _ranks(ranks: Optional[torch.Tensor], n: int, r_max: int, device) -> torch.Tensor:
    if ranks is None:
        return torch.full((n,), r_max, dtype=torch.int32, device=device)
    return ranks.to(device=device, dtype=torch.int32)


def forward(x, weight, A, B, index, scales, ranks=None, bias=None, keep_u=True):
    """``(y, u)``: ``y (..., out)`` in ``x.dtype`` (the base GEMM by torch, the adapters' terms added
    here), ``u (N, r_max)`` fp32 (zeros on rows of -1 and on each adapter's padding; always returned:
    the expand kernel reads it, so ``keep_u`` changes nothing here)."""
    out_f, in_f = weight.shape
    n, r_max = A.shape[0], A.shape[1]
    x2 = x.reshape(-1, in_f)
    N = x2.shape[0]
    y = torch.nn.functional.linear(x2, weight, bias)
    u = torch.zeros(N, r_max, dtype=torch.float32, device=x.device)
    if N > 0:
        cfg = launch_config(x.dtype, r_max, N, n, x.device)
        grouping = Grouping(index.reshape(-1), n, cfg["bm"])
        r32 = _ranks(ranks, n, r_max, x.device)
        if in_f > 0:
            _shrink(u, x2, A, (A.stride(0), A.stride(2), A.stride(1)), r32, grouping, cfg)
        if out_f > 0:
            v = adapter_scales(scales, ranks, r_max, torch.float32, x.device)
            _expand(y, u, v, B, (B.stride(0), B.stride(2), B.stride(1)), r32, grouping, cfg)
    return y.reshape(*x.shape[:-1], out_f), u


def backward(dy, x, weight, A, B, index, scales, ranks, u, needs):
    """``[dx, dweight, dA, dB, dbias]`` for the inputs flagged in ``needs`` (None otherwise)."""
    need_x, need_w, need_a, need_b, need_bias = needs
    out_f, in_f = weight.shape
    n, r_max = A.shape[0], A.shape[1]
    dy2 = dy.reshape(-1, out_f)
    N = dy2.shape[0]
    x2 = None if x is None else x.reshape(-1, in_f)
    cfg = launch_config(dy.dtype, r_max, N, n, dy.device)
    grouping = Grouping(index.reshape(-1), n, cfg["bm"]) if N > 0 else None
    r32 = _ranks(ranks, n, r_max, dy.device)
    v = adapter_scales(scales, ranks, r_max, torch.float32, dy.device)
    grads: list[Optional[torch.Tensor]] = [None] * 5
    g = None
    if (need_x or need_a) and N > 0:
        g = torch.zeros(N, r_max, dtype=torch.float32, device=dy.device)
        if out_f > 0:
            _shrink(g, dy2, B, B.stride(), r32, grouping, cfg)
    if need_x:
        dx = dy2 @ weight
        if N > 0 and in_f > 0:
            _expand(dx, g, v, A, A.stride(), r32, grouping, cfg)
        grads[0] = dx.reshape(dy.shape[:-1] + (in_f,))
    if need_w:
        grads[1] = dy2.T @ x2
    if need_a:
        dA = torch.zeros(A.shape, dtype=torch.float32, device=A.device)
        if N > 0 and in_f > 0:
            _gram(dA, (dA.stride(0), dA.stride(2), dA.stride(1)), x2, g, v, r32, grouping, cfg)
        grads[2] = dA.to(A.dtype)
    if need_b:
        dB = torch.zeros(B.shape, dtype=torch.float32, device=B.device)
        if N > 0 and out_f > 0:
            _gram(dB, dB.stride(), dy2, u, v, r32, grouping, cfg)
        grads[3] = dB.to(B.dtype)
    if need_bias:
        grads[4] = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
    return grads
