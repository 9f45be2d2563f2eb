"""How the torch path of the segmented many-adapter op should find each row's adapter, on a CPU.

Three ways to compute the adapters' term ``y[m] += s_a (x[m]·A_aᵀ)·B_aᵀ`` of a mixed batch (random
adapter per row, -1 rows included), after the base GEMM ``x·Wᵀ``:

- ``grouped``: rows grouped by adapter (one stable ``argsort`` + ``bincount``), each adapter's two
  skinny GEMMs on its gathered rows, ``index_add_`` back (what ``kernels/torch/segmented.py`` does),
- ``gather``: BGMV style, every row's factors gathered (``A[index]``, ``(N, r, in)``) and two batched
  matrix-vector products, no Python loop,
- ``padded``: rows grouped, every group padded to the largest one, two ``bmm`` over ``(n, max, in)``.

Prints milliseconds (the best of several repeats, one thread: the CPU may be shared; the base GEMM
alone for scale). Run: ``python bench/studies/segmented_grouping.py [--threads 1]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F


def grouped(x, W, A, B, v, idx):
    y = F.linear(x, W)
    n = A.shape[0]
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx + 1, minlength=n + 1).tolist()
    start = counts[0]
    for a in range(n):
        c = counts[a + 1]
        if c:
            rows = order[start : start + c]
            t = F.linear(x.index_select(0, rows), A[a]) * v[a]
            y.index_add_(0, rows, t @ B[a].T)
        start += c
    return y


def gather(x, W, A, B, v, idx):
    y = F.linear(x, W)
    rows = (idx >= 0).nonzero().squeeze(1)
    a = idx[rows]
    u = torch.bmm(A.index_select(0, a), x.index_select(0, rows)[:, :, None])[:, :, 0] * v.index_select(0, a)
    y.index_add_(0, rows, torch.bmm(B.index_select(0, a), u[:, :, None])[:, :, 0])
    return y


def padded(x, W, A, B, v, idx):
    y = F.linear(x, W)
    n, _, d = A.shape
    order = torch.argsort(idx, stable=True)
    counts = torch.bincount(idx + 1, minlength=n + 1)
    host = counts.tolist()
    order = order[host[0] :]
    width = max(host[1:])
    a = idx[order]
    pos = torch.arange(order.numel()) - (torch.cumsum(counts[1:], 0) - counts[1:])[a]
    slot = a * width + pos
    xp = x.new_zeros(n * width, d).index_copy_(0, slot, x.index_select(0, order)).view(n, width, d)
    u = torch.bmm(xp, A.transpose(1, 2)) * v[:, None, :]
    low = torch.bmm(u, B.transpose(1, 2)).view(n * width, -1)
    y.index_add_(0, order, low.index_select(0, slot))
    return y


def best_ms(fn, *args, repeats=7) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--d", type=int, default=1024, help="in = out features")
    p.add_argument("--rank", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, r = args.d, args.rank
    print(f"d={d} r={r} fp32, {args.threads} thread(s); ms, best of 7")
    print("| adapters | rows | base GEMM | grouped | gather | padded |")
    print("| --- | --- | --- | --- | --- | --- |")
    cases = [(4, 8), (4, 256), (4, 1024), (16, 64), (16, 256), (16, 1024), (64, 8), (64, 64), (64, 256), (64, 1024)]
    for n, N in cases:
        x, W = torch.randn(N, d), torch.randn(d, d) / d**0.5
        A, B, v = torch.randn(n, r, d) / d**0.5, torch.randn(n, d, r), torch.rand(n, r)
        idx = torch.randint(-1, n, (N,))
        want = grouped(x, W, A, B, v, idx)
        cells = []
        for fn in (grouped, gather, padded):
            if fn is gather and N * r * d > 2**25:  # (N, r, d) gathered factors: skip above 128 MiB
                cells.append("-")
                continue
            torch.testing.assert_close(fn(x, W, A, B, v, idx), want, rtol=1e-4, atol=1e-3)
            cells.append(f"{best_ms(fn, x, W, A, B, v, idx):.2f}")
        base = best_ms(F.linear, x, W)
        print(f"| {n} | {N} | {base:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
