"""Triton covariance update: ``cov[tile_i, tile_j] += X[:, tile_i]ᵀ X[:, tile_j]`` for j >= i.

One program per output tile on or above the diagonal (a host-built list of tile pairs), looping
over the tokens in ``BLOCK_K`` slices: it reads ``x`` in its own dtype (bf16/fp16/fp32, any
strides, two leading dims), multiplies on tensor cores with fp32 accumulation and adds the tile
into ``cov`` in the same pass. Masked-out tokens are excluded through the load mask, so their
bytes are never read and no compacted copy is made. When there are too few tiles to fill the GPU
the token range is split across a second grid axis and tiles are added with fp32 atomics.

Shapes: ``x`` is viewed as ``(B, S, d)`` (token ``k`` is ``x[k // S, k % S]``), ``token_mask`` as a
contiguous ``(B * S,)`` uint8, ``cov`` is ``(d, d)`` fp32.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ..._backend import triton_interpreted
from . import sm_count


@triton.jit
def _covariance_kernel(
    cov_ptr,
    x_ptr,
    mask_ptr,
    pairs_ptr,
    n_tokens,
    seq_len,
    d,
    stride_xb,
    stride_xs,
    stride_xd,
    stride_c0,
    stride_c1,
    tokens_per_split,
    HAS_MASK: tl.constexpr,
    UPPER_ONLY: tl.constexpr,
    ATOMIC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    tile_i = tl.load(pairs_ptr + 2 * pid)
    tile_j = tl.load(pairs_ptr + 2 * pid + 1)
    offs_i = tile_i * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tile_j * BLOCK_D + tl.arange(0, BLOCK_D)
    col_i_ok = offs_i < d
    col_j_ok = offs_j < d
    # int64 address arithmetic: B * S * stride can exceed 2**31 elements for long calibrations.
    cols_i = offs_i.to(tl.int64) * stride_xd
    cols_j = offs_j.to(tl.int64) * stride_xd

    k_begin = split * tokens_per_split
    k_end = tl.minimum(n_tokens, k_begin + tokens_per_split)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        row_ok = offs_k < k_end
        if HAS_MASK:
            row_ok = row_ok & (tl.load(mask_ptr + offs_k, mask=row_ok, other=0) != 0)
        rows = (offs_k // seq_len).to(tl.int64) * stride_xb + (offs_k % seq_len).to(tl.int64) * stride_xs
        a = tl.load(x_ptr + rows[:, None] + cols_i[None, :], mask=row_ok[:, None] & col_i_ok[None, :], other=0.0)
        b = tl.load(x_ptr + rows[:, None] + cols_j[None, :], mask=row_ok[:, None] & col_j_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION, out_dtype=tl.float32)

    out_ok = col_i_ok[:, None] & col_j_ok[None, :]
    if UPPER_ONLY:
        out_ok = out_ok & (offs_i[:, None] <= offs_j[None, :])
    c_ptrs = cov_ptr + offs_i[:, None].to(tl.int64) * stride_c0 + offs_j[None, :].to(tl.int64) * stride_c1
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=out_ok)
    else:
        c = tl.load(c_ptrs, mask=out_ok, other=0.0)
        tl.store(c_ptrs, c + acc, mask=out_ok)


@functools.lru_cache(maxsize=64)
def _tile_pairs(n_tiles: int, upper_only: bool, device: torch.device) -> torch.Tensor:
    """(n_pairs, 2) int32 tile coordinates, row-major over the upper triangle (or full square)."""
    pairs = [(i, j) for i in range(n_tiles) for j in range(i if upper_only else 0, n_tiles)]
    return torch.tensor(pairs, dtype=torch.int32, device=device).contiguous()


def launch_config(d: int, n_tokens: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tile sizes, warps/stages and split factor for one call on ``device`` (the interpreter gets
    small tiles because it executes every lane in numpy)."""
    if triton_interpreted() or device.type != "cuda":
        return _with_split(dict(block_d=16, block_k=16, num_warps=1, num_stages=1), d, n_tokens, 4)
    return gpu_config(d, n_tokens, dtype, sm_count(device))


def gpu_config(d: int, n_tokens: int, dtype: torch.dtype, n_sms: int) -> dict:
    """The CUDA launch configuration: a Hopper/Ampere-safe heuristic (128x128 tiles, K slices of 64
    for 16-bit and 32 for fp32, 8 warps, 3 stages), the token range split when the tiles alone
    would leave SMs idle."""
    block_d = 128 if d > 64 else 64
    block_k = 32 if dtype == torch.float32 else 64
    return _with_split(dict(block_d=block_d, block_k=block_k, num_warps=8, num_stages=3), d, n_tokens, n_sms)


def _with_split(cfg: dict, d: int, n_tokens: int, n_sms: int) -> dict:
    n_tiles = triton.cdiv(d, cfg["block_d"])
    n_pairs = n_tiles * (n_tiles + 1) // 2
    want = 2 * n_sms
    split = 1
    if n_pairs < want:
        split = max(1, min(triton.cdiv(want, n_pairs), n_tokens // (8 * cfg["block_k"])))
    return dict(cfg, split=split)


def _as_batched(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as (B, S, d) without copying when its strides allow it."""
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def covariance_update(
    cov: torch.Tensor,
    x: torch.Tensor,
    token_mask: Optional[torch.Tensor],
    upper_only: bool,
) -> None:
    x3 = _as_batched(x)
    B, S, d = x3.shape
    n_tokens = B * S
    if n_tokens == 0 or d == 0:
        return
    cfg = launch_config(d, n_tokens, x.dtype, x.device)
    n_tiles = triton.cdiv(d, cfg["block_d"])
    pairs = _tile_pairs(n_tiles, upper_only, x.device)
    split = cfg["split"]
    tokens_per_split = triton.cdiv(n_tokens, split)
    mask = token_mask.reshape(-1).contiguous().view(torch.uint8) if token_mask is not None else pairs
    grid = (pairs.shape[0], split)
    _covariance_kernel[grid](
        cov,
        x3,
        mask,
        pairs,
        n_tokens,
        S,
        d,
        x3.stride(0),
        x3.stride(1),
        x3.stride(2),
        cov.stride(0),
        cov.stride(1),
        tokens_per_split,
        HAS_MASK=token_mask is not None,
        UPPER_ONLY=upper_only,
        ATOMIC=split > 1,
        PRECISION="ieee",
        BLOCK_D=cfg["block_d"],
        BLOCK_K=cfg["block_k"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
