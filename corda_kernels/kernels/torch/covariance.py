"""CPU covariance update: chunked, upcast per chunk, BLAS on the upper triangle only.

Rows are processed ``chunk_rows`` at a time, so the fp32 copy of ``x`` never exceeds one chunk
(about ``CHUNK_BYTES``). Masked-out rows are dropped per chunk with ``index_select``. From
``d >= BLOCKED_FROM`` the Gram matrix is built in column blocks of width ``b = block_width(d)``
(``min(BLOCK, d / MIN_BLOCKS)``, a multiple of 16): block ``j`` adds ``X[:, :j0]ᵀ X[:, j0:j1]`` into
``cov[:j0, j0:j1]`` (all above the diagonal, one GEMM per block), and the diagonal blocks are done
together, one batched GEMM into a ``(d / b, b, b)`` temporary whose upper triangles are added through
a strided view of ``cov``. BLAS does about ``(1 + b / d) / 2`` of the FLOPs of the full square.
Narrower ``d`` uses one GEMM into a temporary and adds its upper triangle. The diagonal blocks are
batched because every torch call is an OpenMP fork/join, costly on a busy 2-core machine. torch has
no bf16 x bf16 -> fp32 GEMM on the CPU, so bf16 inputs are upcast per chunk. Measurements behind
the constants: ``bench/results/covariance_cpu_tuning.md``.
"""

from __future__ import annotations

from typing import Optional

import torch

# fp32 rows upcast per chunk: bounds the extra memory (16-256 MiB measured equal).
CHUNK_BYTES = 64 << 20
# Triangle column blocks: width min(BLOCK, d / MIN_BLOCKS rounded up to 16), from d >= BLOCKED_FROM
# (a quarter of d won at d <= 576, 256 at d >= 1536; below 256 one GEMM + triu is as fast).
BLOCK = 256
MIN_BLOCKS = 4
BLOCKED_FROM = 256


def block_width(d: int) -> int:
    """Column-block width used for ``d`` features."""
    quarter = -(-d // MIN_BLOCKS)
    return max(1, min(BLOCK, -(-quarter // 16) * 16))


def _accumulate_rows(cov: torch.Tensor, rows: torch.Tensor, upper_only: bool) -> None:
    d = rows.shape[1]
    if not upper_only:
        cov.addmm_(rows.t(), rows)
        return
    if d < BLOCKED_FROM:
        cov.add_(torch.mm(rows.t(), rows).triu_())
        return
    b = block_width(d)
    # Off-diagonal panels, straight into cov: cov[:j0, j0:j1] += X[:, :j0]ᵀ X[:, j0:j1] (rows < j0 <= cols).
    for j0 in range(b, d, b):
        j1 = min(d, j0 + b)
        cov[:j0, j0:j1].addmm_(rows[:, :j0].t(), rows[:, j0:j1])
    # Diagonal blocks: the full ones in one batched GEMM, one triu and one add through a strided view
    # of cov's diagonal blocks (per-block calls cost a fork/join each), then the narrower last block.
    full = d // b
    if full:
        xb = rows[:, : full * b].unflatten(1, (full, b)).transpose(0, 1)  # (full, n, b) view
        s0, s1 = cov.stride()
        diag = cov.as_strided((full, b, b), (b * (s0 + s1), s0, s1), cov.storage_offset())
        diag.add_(torch.bmm(xb.transpose(1, 2), xb).triu_())
    if full * b < d:
        t0 = full * b
        cols = rows[:, t0:]
        cov[t0:, t0:].add_(torch.mm(cols.t(), cols).triu_())


def covariance_update(cov: torch.Tensor, x: torch.Tensor, token_mask: Optional[torch.Tensor], upper_only: bool) -> None:
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    mask = None if token_mask is None else token_mask.reshape(-1)
    chunk = max(256, CHUNK_BYTES // (4 * max(d, 1)))
    for start in range(0, flat.shape[0], chunk):
        rows = flat[start : start + chunk]
        if mask is not None:
            keep = mask[start : start + chunk]
            if not bool(keep.all()):
                rows = rows.index_select(0, keep.nonzero().squeeze(1))
        if rows.shape[0] == 0:
            continue
        _accumulate_rows(cov, rows.to(cov.dtype), upper_only)
