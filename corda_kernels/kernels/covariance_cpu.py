"""CPU covariance update: chunked, upcast per chunk, BLAS on the upper triangle only.

Rows are processed ``chunk_rows`` at a time, so the fp32 copy of ``x`` never exceeds one chunk
(about ``CHUNK_BYTES``). Masked-out rows are dropped per chunk with ``index_select``. From
``d >= BLOCKED_FROM`` the Gram matrix is built in column blocks of width ``b = block_width(d)``
(``min(BLOCK, d / MIN_BLOCKS)``, a multiple of 16): block ``j`` adds ``X[:, :j0]ᵀ X[:, j0:j1]`` into
``cov[:j0, j0:j1]`` (all above the diagonal, one GEMM per block), and the diagonal blocks are done
together, one batched GEMM into a ``(d / b, b, b)`` temporary whose upper triangles are added through
a strided view of ``cov``. BLAS does about ``(1 + b / d) / 2`` of the FLOPs of the full square.
Narrower ``d`` uses one GEMM into a temporary and adds its upper triangle.

Measurements (2026-11-22, AMD EPYC (Zen 4, AVX-512), 2 cores, torch 2.13.0+cpu with MKL). The two
cores were shared with other jobs (load average 4-9), so wall-clock times swung by 2-10x from minute
to minute; constants were chosen on the CPU time of the calling thread with
``torch.set_num_threads(1)`` (``time.thread_time``: time spent descheduled is not counted), best of
3 runs, implementations interleaved. ms per call and the ratio against PEFT's fp32 path
``cov.addmm_(x.float().t(), x.float())`` (the full square in one GEMM):

=====  ======  =====  =======  ===============  ===============
d      tokens  dtype  PEFT     GEMM+triu        this module
=====  ======  =====  =======  ===============  ===============
576    2048    fp32   13.3     13.7 (0.98x)     9.8 (1.36x)
576    2048    bf16   13.5     14.0 (0.97x)     9.9 (1.37x)
576    8192    fp32   53.0     53.5 (0.99x)     38.7 (1.37x)
576    8192    bf16   53.9     54.4 (0.99x)     39.4 (1.37x)
1536   2048    fp32   95.9     100.7 (0.95x)    63.0 (1.52x)
1536   2048    bf16   97.6     99.4 (0.98x)     63.2 (1.55x)
1536   8192    fp32   388.1    401.9 (0.97x)    247.5 (1.57x)
1536   8192    bf16   415.4    414.6 (1.00x)    270.0 (1.54x)
2048   2048    fp32   180.1    189.0 (0.95x)    110.7 (1.63x)
2048   2048    bf16   182.9    189.0 (0.97x)    113.0 (1.62x)
2048   8192    fp32   712.8    723.2 (0.99x)    435.7 (1.64x)
2048   8192    bf16   742.3    748.9 (0.99x)    466.0 (1.59x)
4096   2048    fp32   697.4    741.4 (0.94x)    409.5 (1.70x)
4096   2048    bf16   713.8    765.7 (0.93x)    426.0 (1.68x)
4096   8192    fp32   2786.9   2805.7 (0.99x)   1634.9 (1.70x)
4096   8192    bf16   2879.8   2926.4 (0.98x)   1704.1 (1.69x)
=====  ======  =====  =======  ===============  ===============

How the constants came out of it (same method, other variants):

- Block width: with per-block diagonal GEMMs, b=256 gave 1.20-1.29x at d=576 and 1.53-1.70x at
  d>=1536; b=128 was 5-10% better at d<=576 but 10% worse at d=4096; b=512 0.87-1.65x; b=1024
  1.21-1.53x at d>=1536. With the batched diagonal: a quarter of d beat b=256 at d<=576 (d=576:
  1.38x vs 1.24x; d=384: 1.40x vs 1.17x; d=256: 1.34x vs 0.98x) and b=256 beat a quarter at
  d>=1536 (d=4096: 1.72x vs 1.50x), hence ``min(256, d / 4)``; ``BLOCKED_FROM = 256`` is the
  smallest width measured (below it one GEMM into a temporary, 0-3% behind PEFT).
- Batching the diagonal blocks is for the 2-thread case: every torch call is an OpenMP fork/join,
  and on the loaded machine each one could wait a scheduler quantum (~10 ms). The per-block version
  (~4 calls per block) measured 0.19-0.53x of PEFT's single call at d 576-2048 (2k tokens, wall
  clock, 2 threads) where the batched one measured 0.30x, 1.10x and 1.36x in the same run. At small d
  (<= 576) on a loaded machine any path that leaves the lower triangle alone (>= 2 calls) can lose
  to PEFT's one call: GEMM+triu measured 0.28-0.85x there. On an idle machine a fork/join costs
  microseconds and the single-thread ratios above apply.
- The same grid with 2 threads, wall clock on the loaded machine (best of 5), this module vs PEFT:
  d=576 0.26-0.86x, d=1536 0.93-1.40x, d=2048 1.18-1.52x, d=4096 1.31-1.96x (GEMM+triu: 0.33-1.21x).
- ``CHUNK_BYTES`` of 16, 30, 64 or 256 MiB: within 5% of each other (d 2048/4096, 2k/8k tokens,
  fp32/bf16), so 64 MiB stays as the memory bound.
- Tried and dropped: running the blocks inside one ``at::parallel_for`` in C++ (one fork/join in
  all) -- MKL called from inside the parallel region spent 10-20x the CPU time of the same GEMMs
  called serially. torch 2.13 has no bf16 x bf16 -> fp32 GEMM on the CPU (``mm(..., out_dtype=)``
  is CUDA-only), so bf16 inputs are upcast per chunk.
"""

from __future__ import annotations

from typing import Optional

import torch

# fp32 rows upcast per chunk (bounds the extra memory; 16-256 MiB measured equal).
CHUNK_BYTES = 64 << 20
# Triangle column blocks: width min(BLOCK, d / MIN_BLOCKS rounded up to 16), from d >= BLOCKED_FROM.
BLOCK = 256
MIN_BLOCKS = 4
BLOCKED_FROM = 256


def block_width(d: int) -> int:
    """Column-block width used for ``d`` features (see the module docstring for the measurements)."""
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


def covariance_update(
    cov: torch.Tensor, x: torch.Tensor, token_mask: Optional[torch.Tensor], upper_only: bool
) -> None:
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
