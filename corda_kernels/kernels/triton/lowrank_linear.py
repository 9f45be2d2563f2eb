"""Triton kernels of the fused low-rank linear op: three tile kernels serve forward and backward.

Notation as in :mod:`corda_kernels.kernels.reference.lowrank_linear` (``s`` = scale, ``d`` = diag).

- ``_project_kernel``: ``U[m, :] = (1/(1-p)) Σ_j keep(m, j) G[m, idx[j]] F[j, :]``, a skinny
  ``(N, r)`` GEMM that gathers the columns of ``G`` by index inside its loads. Forward:
  ``u = drop(x_c) · Aᵀ``; backward: ``g = dy_r · B``. One program per ``(BLOCK_M, BLOCK_R)`` tile.
- ``_fused_gemm_kernel``: ``C = X · Wt (+ bias) + scatter_n(lowrank)``, where, for output column
  ``n`` whose inverse-map entry ``j = inv[n]`` is not -1, ``lowrank[m, n] = Σ_k (T[m, k] s d_k)
  F[j, k]`` (times ``keep(m, j)/(1-p)`` when dropout applies there). The low-rank term runs as
  ``ceil(r / BLOCK_K)`` extra K-iterations on the accumulator before the main K loop (masked there
  when dropout applies, so one accumulator serves both), so no ``(N, d_out)`` intermediate and no
  separate scale/add pass exist. Forward: ``y = x · Wᵀ + b + scatter_rows((u ⊙ s d) · B_rᵀ)``
  with ``inv`` mapping output features to rows of ``B``; backward:
  ``dx = dy · W + scatter_cols(keep ⊙ ((g ⊙ s d) · A_c))/(1-p)`` with ``inv`` mapping input
  features to columns of ``A``. Output tiles are visited in L2-friendly groups of ``GROUP_M``;
  on CUDA the tile shape is autotuned per (out, in, r, flags), not per token count.
- ``_gram_kernel``: ``C[p, :] = c Σ_m keep(m, p) G[m, idx[p]] (H[m, :] ⊙ v)``, a reduction over
  tokens, split over a third grid axis with fp32 atomics when the grid would be too small.
  ``dB = dy_rᵀ (u ⊙ s d)`` and ``dAᵀ = drop(x_c)ᵀ (g ⊙ s d)``.

``u`` and ``g`` are fp32 ``(N, r)``; ``T ⊙ s d`` is rounded to the input dtype right before its
``tl.dot`` (as a same-dtype torch composition rounds it). fp32 factors on 16-bit inputs are read
as stored and rounded to the input dtype at the ``tl.dot`` inputs (the reference's rounding rule:
no cast pass), ``s d`` stays fp32, and ``dA`` / ``dB`` come back in each factor's dtype from the
fp32 accumulators. Every ``tl.dot`` accumulates in fp32;
fp32 inputs use ``input_precision="ieee"``. The dropout mask is the hash of
:func:`~corda_kernels.kernels.reference.lowrank_linear.dropout_keep` in uint32 arithmetic, so the
backward regenerates it instead of saving it. dweight (a plain GEMM) is left to torch/cuBLAS.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..._backend import triton_interpreted
from ..reference.dequantize import INT8_INV_SCALE as _INT8_INV_SCALE
from ..reference.dequantize import NESTED_BLOCK as _NESTED_BLOCK
from ..reference.dequantize import NF4_BLOCK as _NF4_BLOCK
from ..reference.lowrank_linear import DROPOUT_BITS, Options, diag_scale, dropout_threshold
from . import sm_count

NF4_BLOCK = tl.constexpr(_NF4_BLOCK)
NESTED_BLOCK = tl.constexpr(_NESTED_BLOCK)
INT8_INV_SCALE = tl.constexpr(_INT8_INV_SCALE)


@triton.jit
def _mix32(h):
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x1B873593
    return h ^ (h >> 16)


@triton.jit
def _row_hash(seed_ptr, offs_m):
    return _mix32(_mix32(tl.load(seed_ptr).to(tl.uint32)) ^ offs_m.to(tl.uint32))


@triton.jit
def _keep(row_h, offs_j, threshold, DROP_SHIFT: tl.constexpr):
    """The (len(row_h), len(offs_j)) dropout keep-mask of hashed tokens row_h, compact columns offs_j."""
    h = _mix32(row_h[:, None] ^ _mix32(offs_j.to(tl.uint32))[None, :])
    return (h >> DROP_SHIFT).to(tl.int32) >= threshold


@triton.jit
def _dequant_tile(w_ptr, q1_ptr, q2_ptr, code_ptr, code2_ptr, q_offset, q_cols, flat, ok, QUANT: tl.constexpr):
    """fp32 weight elements at flat row-major indices ``flat`` of a quantized weight (QUANT 1: NF4,
    2: int8), as :mod:`corda_kernels.kernels.reference.dequantize` specifies them bit for bit."""
    if QUANT == 1:
        byte = tl.load(w_ptr + flat // 2, mask=ok, other=0).to(tl.int32)
        nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
        block = flat // NF4_BLOCK
        absmax_q = tl.load(q1_ptr + block, mask=ok, other=0).to(tl.int32)
        absmax = tl.load(code2_ptr + absmax_q) * tl.load(q2_ptr + block // NESTED_BLOCK, mask=ok, other=0.0)
        absmax = absmax + q_offset
        return tl.load(code_ptr + nibble) * absmax
    else:
        cb = tl.load(w_ptr + flat, mask=ok, other=0).to(tl.float32)
        return cb * tl.load(q1_ptr + flat // q_cols, mask=ok, other=0.0) * INT8_INV_SCALE


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)``: this program's output tile, ordered in groups of ``GROUP_M`` tile rows so
    that consecutive programs share input tiles in L2 (Triton's matmul tutorial ordering)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _project_kernel(
    g_ptr,
    idx_ptr,
    f_ptr,
    u_ptr,
    seed_ptr,
    M,
    J,
    R,
    stride_gm,
    stride_gk,
    stride_fj,
    stride_fr,
    stride_um,
    stride_ur,
    threshold,
    inv_keep,
    HAS_INDEX: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DROP_SHIFT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_ok = offs_m < M
    r_ok = offs_r < R
    rows = offs_m.to(tl.int64) * stride_gm
    if HAS_DROPOUT:
        row_h = _row_hash(seed_ptr, offs_m)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < J
        if HAS_INDEX:
            cols = tl.load(idx_ptr + offs_j, mask=j_ok, other=0)
        else:
            cols = offs_j
        g = tl.load(
            g_ptr + rows[:, None] + cols.to(tl.int64)[None, :] * stride_gk,
            mask=m_ok[:, None] & j_ok[None, :],
            other=0.0,
        )
        if HAS_DROPOUT:
            g = tl.where(_keep(row_h, offs_j, threshold, DROP_SHIFT), g, tl.zeros_like(g))
        f = tl.load(
            f_ptr + offs_j.to(tl.int64)[:, None] * stride_fj + offs_r[None, :] * stride_fr,
            mask=j_ok[:, None] & r_ok[None, :],
            other=0.0,
        ).to(g_ptr.dtype.element_ty)
        acc = tl.dot(g, f, acc, input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_DROPOUT:
        acc = acc * inv_keep
    u_ptrs = u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r[None, :] * stride_ur
    tl.store(u_ptrs, acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _fused_gemm_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    t_ptr,
    v_ptr,
    f_ptr,
    inv_ptr,
    seed_ptr,
    out_ptr,
    M,
    N,
    K,
    R,
    stride_xm,
    stride_xk,
    stride_wk,
    stride_wn,
    stride_tm,
    stride_tr,
    stride_fj,
    stride_fr,
    stride_om,
    stride_on,
    threshold,
    inv_keep,
    q1_ptr,
    q2_ptr,
    code_ptr,
    code2_ptr,
    q_offset,
    q_cols,
    HAS_BIAS: tl.constexpr,
    HAS_INV: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DROP_SHIFT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    QUANT: tl.constexpr = 0,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    # Low-rank term first: ceil(r / BLOCK_K) K-iterations over r, the factor's rows gathered through
    # inv; with dropout it is masked here, before the base GEMM accumulates onto it, so one
    # accumulator serves both (a second one spills registers on Hopper).
    if HAS_INV:
        j = tl.load(inv_ptr + offs_n, mask=n_ok, other=-1)
        f_ok = n_ok & (j >= 0)
        j = tl.maximum(j, 0)
    else:
        j = offs_n
        f_ok = n_ok
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_rows = t_ptr + offs_m.to(tl.int64)[:, None] * stride_tm
    f_cols = f_ptr + j.to(tl.int64)[None, :] * stride_fj
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < R
        v = tl.load(v_ptr + offs_k, mask=k_ok, other=0.0)
        t = tl.load(t_rows + offs_k[None, :] * stride_tr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        t = (t * v[None, :]).to(x_ptr.dtype.element_ty)
        f = tl.load(f_cols + offs_k[:, None] * stride_fr, mask=k_ok[:, None] & f_ok[None, :], other=0.0)
        f = f.to(x_ptr.dtype.element_ty)
        acc = tl.dot(t, f, acc, input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_DROPOUT:
        keep = _keep(_row_hash(seed_ptr, offs_m), j, threshold, DROP_SHIFT) & f_ok[None, :]
        acc = tl.where(keep, acc * inv_keep, 0.0)

    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if QUANT == 0:
            b = tl.load(
                w_cols + offs_k.to(tl.int64)[:, None] * stride_wk, mask=k_ok[:, None] & n_ok[None, :], other=0.0
            )
        else:
            flat = offs_k.to(tl.int64)[:, None] * stride_wk + offs_n.to(tl.int64)[None, :] * stride_wn
            b = _dequant_tile(
                w_ptr, q1_ptr, q2_ptr, code_ptr, code2_ptr, q_offset, q_cols, flat, k_ok[:, None] & n_ok[None, :], QUANT
            ).to(x_ptr.dtype.element_ty)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gram_kernel(
    g_ptr,
    idx_ptr,
    h_ptr,
    v_ptr,
    seed_ptr,
    c_ptr,
    M,
    P,
    R,
    tokens_per_split,
    stride_gm,
    stride_gk,
    stride_hm,
    stride_hr,
    stride_cp,
    stride_cr,
    threshold,
    out_scale,
    HAS_INDEX: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DROP_SHIFT: tl.constexpr,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    p_ok = offs_p < P
    r_ok = offs_r < R
    if HAS_INDEX:
        cols = tl.load(idx_ptr + offs_p, mask=p_ok, other=0)
    else:
        cols = offs_p
    g_cols = g_ptr + cols.to(tl.int64)[None, :] * stride_gk
    v = tl.load(v_ptr + offs_r, mask=r_ok, other=0.0)
    m_begin = tl.program_id(2) * tokens_per_split
    m_end = tl.minimum(M, m_begin + tokens_per_split)
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        g = tl.load(g_cols + offs_m.to(tl.int64)[:, None] * stride_gm, mask=m_ok[:, None] & p_ok[None, :], other=0.0)
        if HAS_DROPOUT:
            g = tl.where(_keep(_row_hash(seed_ptr, offs_m), offs_p, threshold, DROP_SHIFT), g, tl.zeros_like(g))
        h = tl.load(
            h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_r[None, :] * stride_hr,
            mask=m_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        h = (h * v[None, :]).to(g_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(g), h, acc, input_precision=PRECISION, out_dtype=tl.float32)
    acc = acc * out_scale
    c_ptrs = c_ptr + offs_p.to(tl.int64)[:, None] * stride_cp + offs_r[None, :] * stride_cr
    c_ok = p_ok[:, None] & r_ok[None, :]
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=c_ok)
    else:
        tl.store(c_ptrs, acc, mask=c_ok)


def launch_config(dtype: torch.dtype, r: int, device: torch.device) -> dict:
    """Fixed tile sizes: the skinny kernels on every device, the fused GEMM in the interpreter (16-wide
    tiles: it executes every lane in numpy); on CUDA see :func:`gpu_config`."""
    if triton_interpreted() or device.type != "cuda":
        return dict(bm=16, bn=16, bk=16, br=16, warps=1, stages=1, group_m=2)
    return gpu_config(dtype, r)


def gpu_config(dtype: torch.dtype, r: int) -> dict:
    """CUDA: K slices of 64 (16-bit) / 32 (fp32), r padded to a power of two (at most 128 per
    program), 64-wide token / feature tiles for the skinny kernels (the projection narrows its token
    tile until the grid fills the GPU). No ``bn``: the fused GEMM is autotuned (:data:`_GEMM_CONFIGS`)."""
    bk = 32 if dtype == torch.float32 else 64
    br = min(128, max(16, triton.next_power_of_2(r)))
    return dict(bm=64, bk=bk, br=br, warps=4, stages=3)


# Fused-GEMM candidates on CUDA: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); 16-bit inputs try the
# BLOCK_K = 64 ones, fp32 the BLOCK_K = 32 ones (the others overflow shared memory). The 64 x 64
# tiles are the ones that do not spill registers on sm_80 with dropout and a column index (Partial-LoRA
# dx); tests/kernels/test_triton_compile.py checks that every launch keeps a spill-free candidate. The token
# count is not in the key, so a new sequence length does not re-tune.
_GEMM_CONFIGS = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 8, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
]


# The dequantizing GEMM on CUDA: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); 2 stages keep the
# pipelined code/scale loads within sm_80's shared memory.
_QUANT_GEMM_CONFIG = (64, 64, 64, 4, 2)


def _configs_for_dtype(configs, named_args, **kwargs):
    block_k = 32 if named_args["x_ptr"].dtype == torch.float32 else 64
    return [c for c in configs if c.kwargs["BLOCK_K"] == block_k]


_fused_gemm_tuned = triton.autotune(
    [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=st)
        for m, n, k, w, st in _GEMM_CONFIGS
    ],
    key=["N", "K", "R", "HAS_BIAS", "HAS_INV", "HAS_DROPOUT", "QUANT"],
    prune_configs_by={"early_config_prune": _configs_for_dtype},
)(_fused_gemm_kernel)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _dropout_args(seed: Optional[torch.Tensor], dropout: float, dummy: torch.Tensor):
    if seed is None or dropout == 0.0:
        return dummy, False, 0, 1.0
    return seed, True, dropout_threshold(dropout), 1.0 / (1.0 - dropout)


def inverse_map(index: Optional[torch.Tensor], size: int) -> Optional[torch.Tensor]:
    """int32 ``(size,)`` map from a feature to its position in ``index``, or -1 (None: identity)."""
    if index is None:
        return None
    inv = torch.full((size,), -1, dtype=torch.int32, device=index.device)
    return inv.index_copy_(0, index, torch.arange(index.numel(), dtype=torch.int32, device=index.device))


def _project(out, g, index, n_idx, f, f_strides, seed, dropout, cfg):
    """out (M, R) fp32 = drop(g[:, index]) @ f, f viewed as (n_idx, R) through f_strides."""
    M, R = out.shape
    seed_arg, has_drop, threshold, inv_keep = _dropout_args(seed, dropout, out)
    bm, r_blocks = cfg["bm"], triton.cdiv(R, cfg["br"])
    while bm > 16 and triton.cdiv(M, bm) * r_blocks < sm_count(g.device):
        bm //= 2
    _project_kernel[(triton.cdiv(M, bm), r_blocks)](
        g,
        index if index is not None else out,
        f,
        out,
        seed_arg,
        M,
        n_idx,
        R,
        g.stride(0),
        g.stride(1),
        f_strides[0],
        f_strides[1],
        out.stride(0),
        out.stride(1),
        threshold,
        inv_keep,
        HAS_INDEX=index is not None,
        HAS_DROPOUT=has_drop,
        DROP_SHIFT=32 - DROPOUT_BITS,
        PRECISION=_precision(g.dtype),
        BLOCK_M=bm,
        BLOCK_J=cfg["bk"],
        BLOCK_R=cfg["br"],
        num_warps=cfg["warps"],
        num_stages=cfg["stages"],
    )


def _weight_operand(weight, transposed: bool):
    """``(w, (stride_wk, stride_wn), quant)`` for the fused GEMM's ``Wt`` operand: ``W`` itself
    (forward, ``transposed``) or ``W`` read as ``(out, in)`` (dx). A quantized weight (an object
    with ``fmt``, like :class:`~corda_kernels.ops.quantized.QuantizedWeight`) passes its codes as
    ``w``, logical row-major strides, and ``quant = (QUANT, q1, q2, code, code2, offset, in)``."""
    fmt = getattr(weight, "fmt", None)
    if fmt is None:
        strides = (weight.stride(1), weight.stride(0)) if transposed else weight.stride()
        return weight, strides, None
    in_f = weight.shape[1]
    strides = (1, in_f) if transposed else (in_f, 1)
    if fmt == "int8":
        return weight.CB, strides, (2, weight.SCB, weight.SCB, weight.SCB, weight.SCB, 0.0, in_f)
    quant = (1, weight.absmax_q, weight.nested_absmax, weight.code, weight.nested_code, float(weight.offset), in_f)
    return weight.packed, strides, quant


def _fused_gemm(out, x, w_strides, w, bias, t, v, f, f_strides, inv, seed, dropout, cfg, quant=None):
    """out (M, N) = x (M, K) @ Wt (K, N) + bias + lowrank (see the module docstring); ``quant``
    (from :func:`_weight_operand`) makes ``Wt`` tiles dequantize inside the K loop."""
    M, N = out.shape
    K = x.shape[1]
    seed_arg, has_drop, threshold, inv_keep = _dropout_args(seed, dropout, out)
    q_mode, q1, q2, code, code2, q_offset, q_cols = quant if quant is not None else (0, out, out, out, out, 0.0, 1)
    args = (
        x,
        w,
        bias if bias is not None else out,
        t,
        v,
        f,
        inv if inv is not None else out,
        seed_arg,
        out,
        M,
        N,
        K,
        t.shape[1],
        x.stride(0),
        x.stride(1),
        w_strides[0],
        w_strides[1],
        t.stride(0),
        t.stride(1),
        f_strides[0],
        f_strides[1],
        out.stride(0),
        out.stride(1),
        threshold,
        inv_keep,
        q1,
        q2,
        code,
        code2,
        q_offset,
        q_cols,
    )
    flags = dict(
        HAS_BIAS=bias is not None,
        HAS_INV=inv is not None,
        HAS_DROPOUT=has_drop,
        DROP_SHIFT=32 - DROPOUT_BITS,
        PRECISION=_precision(x.dtype),
    )
    if q_mode:  # no FMA contraction: the dequantized weight matches the reference bit for bit
        flags.update(QUANT=q_mode, enable_fp_fusion=False)
        if "bn" not in cfg:  # CUDA: one fixed, 2-stage tile (not tuned yet: no GPU measured it)
            bm, bn, bk, warps, stages = _QUANT_GEMM_CONFIG
            cfg = dict(bm=bm, bn=bn, bk=bk if x.dtype != torch.float32 else 32, warps=warps, stages=stages, group_m=8)
    if "bn" not in cfg:  # CUDA: autotuned tiles

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        _fused_gemm_tuned[grid](*args, **flags)
        return
    grid = (triton.cdiv(M, cfg["bm"]) * triton.cdiv(N, cfg["bn"]),)
    _fused_gemm_kernel[grid](
        *args,
        **flags,
        BLOCK_M=cfg["bm"],
        BLOCK_N=cfg["bn"],
        BLOCK_K=cfg["bk"],
        GROUP_M=cfg["group_m"],
        num_warps=cfg["warps"],
        num_stages=cfg["stages"],
    )


def _gram(out, out_strides, g, index, h, v, seed, dropout, cfg):
    """out (P, R), a zeroed fp32 buffer viewed through out_strides, = drop(g[:, index])ᵀ @ (h ⊙ v)."""
    M = g.shape[0]
    P, R = index.numel() if index is not None else g.shape[1], h.shape[1]
    seed_arg, has_drop, threshold, inv_keep = _dropout_args(seed, dropout, h)
    bp = bm = cfg["bm"]
    tiles = triton.cdiv(P, bp) * triton.cdiv(R, cfg["br"])
    split = max(1, min(triton.cdiv(2 * sm_count(g.device), tiles), M // (8 * bm)))
    per_split = triton.cdiv(M, split)
    _gram_kernel[(triton.cdiv(P, bp), triton.cdiv(R, cfg["br"]), split)](
        g,
        index if index is not None else h,
        h,
        v,
        seed_arg,
        out,
        M,
        P,
        R,
        per_split,
        g.stride(0),
        g.stride(1),
        h.stride(0),
        h.stride(1),
        out_strides[0],
        out_strides[1],
        threshold,
        inv_keep,
        HAS_INDEX=index is not None,
        HAS_DROPOUT=has_drop,
        DROP_SHIFT=32 - DROPOUT_BITS,
        ATOMIC=split > 1,
        PRECISION=_precision(g.dtype),
        BLOCK_P=bp,
        BLOCK_R=cfg["br"],
        BLOCK_M=bm,
        num_warps=cfg["warps"],
        num_stages=cfg["stages"],
    )


def forward(x, weight, A, B, opts: Options):
    """``(y, u)``: ``y`` ``(..., out)`` in ``x.dtype``, ``u = drop(x_c) · Aᵀ`` ``(N, r)`` fp32.
    ``weight`` dense, or quantized codes (an object with ``fmt``: dequantized inside the GEMM)."""
    scale, bias, row_index, col_index, diag, dropout, seed = opts
    out_f, in_f = weight.shape
    r = A.shape[0]
    x2 = x.reshape(-1, in_f)
    N = x2.shape[0]
    u = torch.empty(N, r, dtype=torch.float32, device=x.device)
    y = torch.empty(N, out_f, dtype=x.dtype, device=x.device)
    if N > 0:
        cfg = launch_config(x.dtype, r, x.device)
        _project(u, x2, col_index, A.shape[1], A, (A.stride(1), A.stride(0)), seed, dropout, cfg)
        if out_f > 0:
            v = diag_scale(diag, scale, r, torch.float32, x.device)
            inv = inverse_map(row_index, out_f)
            w, w_strides, quant = _weight_operand(weight, transposed=True)
            _fused_gemm(y, x2, w_strides, w, bias, u, v, B, B.stride(), inv, None, 0.0, cfg, quant)
    return y.reshape(*x.shape[:-1], out_f), u


def backward(dy, x, weight, A, B, u, opts: Options, needs):
    """``[dx, dweight, dA, dB, ddiag, dbias]`` for the inputs flagged in ``needs`` (None otherwise)."""
    scale, _, row_index, col_index, diag, dropout, seed = opts
    need_x, need_w, need_a, need_b, need_d, need_bias = needs
    out_f, in_f = weight.shape
    r = A.shape[0]
    dy2 = dy.reshape(-1, out_f)
    N = dy2.shape[0]
    cfg = launch_config(dy.dtype, r, dy.device)
    v = diag_scale(diag, scale, r, torch.float32, dy.device)
    grads: list[Optional[torch.Tensor]] = [None] * 6
    g = None
    if need_x or need_a or need_d:
        g = torch.empty(N, r, dtype=torch.float32, device=dy.device)
        if N > 0:
            _project(g, dy2, row_index, B.shape[0], B, B.stride(), None, 0.0, cfg)
    if need_x:
        dx = torch.empty(N, in_f, dtype=dy.dtype, device=dy.device)
        if N > 0 and in_f > 0:
            inv = inverse_map(col_index, in_f)
            f_strides = (A.stride(1), A.stride(0))
            w, w_strides, quant = _weight_operand(weight, transposed=False)
            _fused_gemm(dx, dy2, w_strides, w, None, g, v, A, f_strides, inv, seed, dropout, cfg, quant)
        grads[0] = dx.reshape(dy.shape[:-1] + (in_f,))
    x2 = None if x is None else x.reshape(-1, in_f)
    if need_w:
        grads[1] = dy2.T @ x2
    if need_a:
        dA = torch.zeros(A.shape, dtype=torch.float32, device=A.device)
        if N > 0 and A.shape[1] > 0:
            _gram(dA, (dA.stride(1), dA.stride(0)), x2, col_index, g, v, seed, dropout, cfg)
        grads[2] = dA.to(A.dtype)
    if need_b:
        dB = torch.zeros(B.shape, dtype=torch.float32, device=B.device)
        if N > 0 and B.shape[0] > 0:
            _gram(dB, dB.stride(), dy2, row_index, u, v, None, 0.0, cfg)
        grads[3] = dB.to(B.dtype)
    if need_d:
        grads[4] = (scale * (g * u).sum(0)).to(diag.dtype)
    if need_bias:
        grads[5] = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
    return grads
