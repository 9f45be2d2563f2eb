"""Triton kernels of the fused DoRA op (math: :mod:`corda_kernels.kernels.reference.dora`).

- ``_norm_kernel``: one pass over ``W``'s rows: ``P = W·Aᵀ`` ``(out, r)`` and, unless cached,
  ``‖W_o‖²`` from the same tiles of ``W`` (fp32 accumulators). The ``(r, r)`` rest of the closed form
  and the cancellation guard run in torch (:func:`~corda_kernels.kernels.reference.dora.combine_norm`).
- ``_dora_gemm_kernel``: ``y = (x·Wᵀ + (u ⊙ s)·Bᵀ) ⊙ f + bias``: the low-rank term as extra
  K-iterations on the accumulator (as the low-rank op's fused GEMM), then the scale ``f = m/n`` and the
  bias as the epilogue; the unscaled ``z`` is stored from the same accumulator when the magnitude needs
  a gradient. ``u = x·Aᵀ`` comes from the low-rank op's projection kernel.
- Backward: ``dy ⊙ f`` (one elementwise pass), then the low-rank op's Triton backward kernels, and
  ``dm = Σ dy ⊙ z / n`` in torch.

Every ``tl.dot`` accumulates in fp32 (``input_precision="ieee"`` for fp32); fp32 factors on 16-bit
inputs are rounded to the input dtype at the ``tl.dot`` inputs (the reference's rounding rule).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference.dora import DoraOptions, combine_norm, factor
from ..reference.lowrank_linear import Options
from . import lowrank_linear as lowrank
from .lowrank_linear import grouped_tile


@triton.jit
def _norm_kernel(
    w_ptr,
    a_ptr,
    p_ptr,
    sq_ptr,
    OUT,
    K,
    R,
    stride_wo,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_po,
    stride_pr,
    WANT_SQ: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    o_ok = offs_o < OUT
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
    sq = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        w = tl.load(
            w_ptr + offs_o.to(tl.int64)[:, None] * stride_wo + offs_k[None, :] * stride_wk,
            mask=o_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=k_ok[:, None] & r_ok[None, :],
            other=0.0,
        ).to(w_ptr.dtype.element_ty)
        acc = tl.dot(w, a, acc, input_precision=PRECISION, out_dtype=tl.float32)
        if WANT_SQ:
            wf = w.to(tl.float32)
            sq += tl.sum(wf * wf, axis=1)
    tl.store(
        p_ptr + offs_o.to(tl.int64)[:, None] * stride_po + offs_r[None, :] * stride_pr,
        acc,
        mask=o_ok[:, None] & r_ok[None, :],
    )
    if WANT_SQ:
        if tl.program_id(1) == 0:
            tl.store(sq_ptr + offs_o, sq, mask=o_ok)


@triton.jit
def _dora_gemm_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    u_ptr,
    b_ptr,
    f_ptr,
    y_ptr,
    z_ptr,
    M,
    N,
    K,
    R,
    scale,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_um,
    stride_ur,
    stride_bn,
    stride_br,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    STORE_Z: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):  # the low-rank term: (u ⊙ s) rounded to the input dtype, times Bᵀ
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < R
        t = tl.load(
            u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_k[None, :] * stride_ur,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        t = (t * scale).to(x_ptr.dtype.element_ty)
        b = tl.load(
            b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_br,
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        ).to(x_ptr.dtype.element_ty)
        acc = tl.dot(t, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(
            x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=tl.float32)
    out_offs = offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    ok = m_ok[:, None] & n_ok[None, :]
    if STORE_Z:
        tl.store(z_ptr + out_offs, acc.to(z_ptr.dtype.element_ty), mask=ok)
    # the epilogue: DoRA's magnitude scale and the bias
    acc = acc * tl.load(f_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def _cfg(dtype: torch.dtype, r: int, device: torch.device) -> dict:
    cfg = lowrank.launch_config(dtype, r, device)
    if "bn" not in cfg:  # CUDA: one fixed tile (not tuned yet: no GPU run has measured this kernel)
        cfg = dict(cfg, bm=64, bn=64, group_m=8)
    return cfg


def weight_norm(weight, A, B, scale, weight_sq, compute_dtype) -> torch.Tensor:
    """``n`` (out,) fp32: ``P`` (and ``‖W_o‖²`` when not cached) from one pass over ``W``."""
    out_f, in_f = weight.shape
    r = A.shape[0]
    cfg = _cfg(weight.dtype, r, weight.device)
    P = torch.empty(out_f, r, dtype=torch.float32, device=weight.device)
    sq = torch.zeros(out_f, dtype=torch.float32, device=weight.device) if weight_sq is None else weight_sq
    if out_f > 0:
        _norm_kernel[(triton.cdiv(out_f, cfg["bm"]), triton.cdiv(r, cfg["br"]))](
            weight,
            A,
            P,
            sq,
            out_f,
            in_f,
            r,
            weight.stride(0),
            weight.stride(1),
            A.stride(0),
            A.stride(1),
            P.stride(0),
            P.stride(1),
            WANT_SQ=weight_sq is None,
            PRECISION=lowrank._precision(weight.dtype),
            BLOCK_O=cfg["bm"],
            BLOCK_K=cfg["bk"],
            BLOCK_R=cfg["br"],
            num_warps=cfg["warps"],
            num_stages=cfg["stages"],
        )
    return combine_norm(weight, A, B, scale, sq.float(), P, compute_dtype)


def forward(x, weight, A, B, magnitude, opts: DoraOptions, keep_z: bool = True):
    """``(y, z, u, n)`` as the reference's (``z`` None unless ``keep_z``)."""
    scale, bias, weight_sq = opts
    out_f, in_f = weight.shape
    r = A.shape[0]
    x2 = x.reshape(-1, in_f)
    N = x2.shape[0]
    n = weight_norm(weight, A, B, scale, weight_sq, x.dtype)
    f = factor(magnitude, n).contiguous()
    u = torch.empty(N, r, dtype=torch.float32, device=x.device)
    y = torch.empty(N, out_f, dtype=x.dtype, device=x.device)
    z = torch.empty(N, out_f, dtype=x.dtype, device=x.device) if keep_z else None
    if N > 0:
        cfg = _cfg(x.dtype, r, x.device)
        lowrank._project(u, x2, None, in_f, A, (A.stride(1), A.stride(0)), None, 0.0, cfg)
        if out_f > 0:
            grid = (triton.cdiv(N, cfg["bm"]) * triton.cdiv(out_f, cfg["bn"]),)
            _dora_gemm_kernel[grid](
                x2,
                weight,
                bias if bias is not None else y,
                u,
                B,
                f,
                y,
                z if z is not None else y,
                N,
                out_f,
                in_f,
                r,
                float(scale),
                x2.stride(0),
                x2.stride(1),
                weight.stride(0),
                weight.stride(1),
                u.stride(0),
                u.stride(1),
                B.stride(0),
                B.stride(1),
                y.stride(0),
                y.stride(1),
                HAS_BIAS=bias is not None,
                STORE_Z=z is not None,
                PRECISION=lowrank._precision(x.dtype),
                BLOCK_M=cfg["bm"],
                BLOCK_N=cfg["bn"],
                BLOCK_K=cfg["bk"],
                GROUP_M=cfg["group_m"],
                num_warps=cfg["warps"],
                num_stages=cfg["stages"],
            )
    return y.reshape(*x.shape[:-1], out_f), z, u, n


def backward(dy, x, weight, A, B, magnitude, z, u, n, opts: DoraOptions, needs):
    """``[dx, dA, dB, dmagnitude, dbias]`` for the inputs flagged in ``needs`` (None otherwise)."""
    need_x, need_a, need_b, need_m, need_bias = needs
    out_f = weight.shape[0]
    dy2 = dy.contiguous().reshape(-1, out_f)
    f = factor(magnitude, n)
    grads: list[Optional[torch.Tensor]] = [None] * 5
    if need_x or need_a or need_b:
        dyf = (dy2 * f).to(dy.dtype)
        low = lowrank.backward(
            dyf, x, weight, A, B, u, Options(opts.scale), (need_x, False, need_a, need_b, False, False)
        )
        if need_x:
            grads[0] = low[0].reshape(dy.shape[:-1] + (weight.shape[1],))
        grads[1], grads[2] = low[2], low[3]
    if need_m:
        dm = (dy2.float() * z.float()).sum(0)
        grads[3] = (dm * factor(torch.ones_like(n), n)).to(magnitude.dtype)
    if need_bias:
        grads[4] = dy2.sum(0, dtype=torch.float32).to(dy.dtype)
    return grads
