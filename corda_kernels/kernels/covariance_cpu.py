"""CPU covariance update: chunked, upcast per chunk, BLAS on the upper triangle only.

Rows are processed ``chunk_rows`` at a time, so the fp32 copy of ``x`` never exceeds one chunk
(about ``CHUNK_BYTES``). Masked-out rows are dropped per chunk with ``index_select``. From
``d >= BLOCKED_FROM`` the Gram matrix is built column block by column block: block ``j`` adds
``X[:, :j0]ᵀ X[:, j0:j1]`` into ``cov[:j0, j0:j1]`` (all above the diagonal) and the diagonal block
through a small ``(b, b)`` temporary, so BLAS does about ``(1 + BLOCK / d) / 2`` of the FLOPs of the
full square. Narrower ``d`` uses one GEMM into a temporary and adds its upper triangle.

How the constants were chosen (2026-11-22, AMD EPYC (Zen 4, AVX-512), 2 cores, torch 2.13.0+cpu with
MKL; the 2 cores were shared with other jobs, load average 5-9, so wall-clock times swung by 2-10x
from minute to minute). The robust figure is the CPU time of the calling thread with
``torch.set_num_threads(1)`` (``time.thread_time``: time spent descheduled is not counted), best of
3-9 runs, variants interleaved. ms per call, and the ratio against PEFT's fp32 path
``cov.addmm_(x.float().t(), x.float())`` (full square, one GEMM):

=====  ======  =====  =======  ========  ===============  ===============
d      tokens  dtype  PEFT     tmp+triu  blocked b=256    blocked b=512
=====  ======  =====  =======  ========  ===============  ===============
576    2048    fp32   13.6     14.1      11.1 (1.22x)     13.4 (1.02x)
576    2048    bf16   13.8     14.5      11.5 (1.20x)     16.3 (0.87x)
576    8192    fp32   55.1     55.9      43.4 (1.27x)     51.2 (1.06x)
576    8192    bf16   57.9     57.3      45.1 (1.29x)     60.2 (0.92x)
1536   2048    fp32   100.5    103.2     65.9 (1.53x)     70.3 (1.43x)
1536   2048    bf16   103.1    104.9     67.6 (1.53x)     72.4 (1.42x)
1536   8192    fp32   410.3    413.6     258.8 (1.59x)    277.8 (1.48x)
1536   8192    bf16   436.7    435.1     277.0 (1.58x)    297.9 (1.47x)
2048   2048    fp32   183.8    188.6     114.6 (1.60x)    123.6 (1.49x)
2048   2048    bf16   186.5    189.6     117.9 (1.58x)    125.0 (1.49x)
2048   8192    fp32   760.3    756.3     447.2 (1.70x)    474.7 (1.60x)
2048   8192    bf16   786.8    794.4     502.5 (1.57x)    519.3 (1.52x)
4096   2048    fp32   731.0    784.8     444.5 (1.64x)    443.9 (1.65x)
4096   2048    bf16   741.0    784.6     449.8 (1.65x)    454.9 (1.63x)
4096   8192    fp32   2888.0   --        1778.2 (1.62x)   --
4096   8192    bf16   2980.0   --        1797.7 (1.66x)   --
=====  ======  =====  =======  ========  ===============  ===============

- ``tmp+triu`` (one GEMM into a temporary, then ``cov += triu(tmp)``) costs 0-7% more than PEFT's
  in-place GEMM; it is the path only below ``BLOCKED_FROM``. Blocking with b=256 wins from d=384
  (2 blocks: 1.07-1.15x at d=384, 1.14-1.23x at d=512) up; b=128 gains another 5-10% at d<=576 but
  loses 10% at d=4096; b=1024 gives 1.21-1.53x at d>=1536; b=256 ties b=384/512 at d=4096.
- ``CHUNK_BYTES`` of 16, 30, 64 or 256 MiB: within 5% of each other (d 2048/4096, 2k/8k tokens,
  fp32/bf16), so 64 MiB stays as the memory bound.
- With 2 threads on the loaded machine, each torch call is an OpenMP fork/join that can wait a
  scheduler quantum; the blocked path makes ~4 calls per block and measured anywhere from 0.13x to
  1.41x of PEFT's single GEMM depending on the moment (one run: 0.13-0.46x at d 576/1536, 1.08-1.41x
  at d=2048 with 8k tokens and at d=4096; a run minutes later: 0.77-1.29x at d 576/1536). On an
  idle machine the fork/join costs microseconds and the single-thread ratios above apply. (Running
  the blocks inside one ``at::parallel_for`` in C++ was tried and dropped: MKL called from inside
  the parallel region spent 10-20x the CPU time of the same GEMMs called serially.)
"""

from __future__ import annotations

from typing import Optional

import torch

# fp32 rows upcast per chunk (bounds the extra memory; 16-256 MiB measured equal).
CHUNK_BYTES = 64 << 20
# Column-block width of the triangle, and the width from which blocking beats one GEMM (see above).
BLOCK = 256
BLOCKED_FROM = 384


def _accumulate_rows(cov: torch.Tensor, rows: torch.Tensor, upper_only: bool) -> None:
    d = rows.shape[1]
    if not upper_only:
        cov.addmm_(rows.t(), rows)
        return
    if d < BLOCKED_FROM:
        cov.add_(torch.mm(rows.t(), rows).triu_())
        return
    for j0 in range(0, d, BLOCK):
        j1 = min(d, j0 + BLOCK)
        cols = rows[:, j0:j1]
        if j0 > 0:
            cov[:j0, j0:j1].addmm_(rows[:, :j0].t(), cols)
        cov[j0:j1, j0:j1].add_(torch.mm(cols.t(), cols).triu_())


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
