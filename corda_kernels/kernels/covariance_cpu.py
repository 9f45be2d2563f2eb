"""CPU covariance update: chunked, upcast per chunk, BLAS on the upper triangle only.

Rows are processed ``chunk_rows`` at a time, so the fp32 copy of ``x`` never exceeds one chunk
(about ``CHUNK_BYTES``). Masked-out rows are dropped per chunk with ``index_select``. For wide
``d`` the Gram matrix is built column block by column block: block ``j`` adds
``X[:, :j0]ᵀ X[:, j0:j1]`` into ``cov[:j0, j0:j1]`` (all above the diagonal) and the diagonal block
through a small ``(b, b)`` temporary, so BLAS does about half the FLOPs of the full square. Narrow
``d`` uses one GEMM into a temporary (blocking does not pay there; see bench/bench_covariance.py).
"""

from __future__ import annotations

from typing import Optional

import torch

CHUNK_BYTES = 64 << 20
# Column-block width and the width from which blocking beats one full GEMM (measured on 2 cores).
BLOCK = 512
BLOCKED_FROM = 1024


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
