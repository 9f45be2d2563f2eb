"""Decomposition benchmarks: our batched ops against per-matrix torch anchors, in the same run.

Groups (one per shape / rank / op):

- ``rsvd``: :func:`randomized_svd` on the whole batch vs, per matrix, ``torch.linalg.svd`` + crop
  (PEFT's way) and ``torch.svd_lowrank`` with the same sketch width and iteration count.
- ``co_svd ipa`` / ``co_svd kpa``: :func:`co_svd` on the batch (one shared covariance, as for
  q/k/v) vs PEFT's per-layer computation (damping with an explicit inverse, full fp32 SVD of
  ``W C_d``, ``V = (Vh C_d^{-1})^T``, crop).

CPU: a batch of 8 SmolLM2-135M shapes; GPU: LLaMA-2-7B shapes. Run:
``python -m pytest bench/speed/bench_decompose.py --benchmark-enable``.
"""

from __future__ import annotations

import pytest
import torch

from corda_kernels.linalg import DEFAULT_N_ITER, co_svd, default_oversample, randomized_svd
from corda_kernels.testing import bench_check, bench_small

if bench_small():  # CI: every case once at a tiny size (CORDA_BENCH_SMALL=1)
    CASES = [(2, 48, 32, 4)]
elif torch.cuda.is_available() and bench_check():  # bench/gpu/run.sh: the batched 4096² case
    CASES = [(4, 4096, 4096, 128)]
elif torch.cuda.is_available():
    CASES = [(4, 4096, 4096, 128), (4, 11008, 4096, 128)]
else:
    CASES = [(8, 576, 576, 16), (8, 1536, 576, 64)]
IDS = [f"{b}x{m}x{n}-r{r}" for b, m, n, r in CASES]


def _inputs(batch, m, n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(batch, m, n, generator=g) / n**0.5).to(device)
    X = torch.randn(4 * n, n, generator=g)
    X[:, :4] *= 30  # outlier channels, as in real activations
    C = (X.T @ X / X.shape[0]).to(device)
    return W, C


def _run(benchmark, device, sync, fn):
    def call():
        out = fn()
        sync()
        return out

    benchmark.pedantic(call, rounds=2 if device.type == "cpu" else 3, warmup_rounds=1, iterations=1)


def _peft_corda(W, C, rank, top):
    """PEFT's collect_eigens_for_layer + crop for one layer (damp 0.01; it passes on these inputs)."""
    n = C.shape[0]
    fixed = C + torch.eye(n, device=C.device) * C.diagonal().mean() * 0.01
    inv = torch.linalg.inv(fixed)
    torch.dist(fixed @ inv, torch.eye(n, device=C.device))
    U, S, Vh = torch.linalg.svd(W @ fixed, full_matrices=False)
    V = (Vh @ inv).T
    sl = slice(None, rank) if top else slice(-rank, None)
    return U[:, sl], S[sl], V[:, sl]


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("impl", ["ours", "anchor:linalg.svd", "anchor:svd_lowrank"])
def test_randomized_svd(benchmark, bench_device, bench_tag, bench_sync, case, impl):
    batch, m, n, r = case
    W, _ = _inputs(batch, m, n, bench_device)
    width, q = r + default_oversample(r), DEFAULT_N_ITER
    bench_tag(group=f"rsvd {batch}x{m}x{n} r={r}", impl=impl, flops=2 * batch * m * n * width * (2 * q + 2))
    if impl == "ours":
        _run(benchmark, bench_device, bench_sync, lambda: randomized_svd(W, r))
    elif impl == "anchor:linalg.svd":
        _run(benchmark, bench_device, bench_sync, lambda: [torch.linalg.svd(w, full_matrices=False)[1][:r] for w in W])
    else:
        _run(benchmark, bench_device, bench_sync, lambda: [torch.svd_lowrank(w, q=width, niter=q) for w in W])


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["ipa", "kpa"])
@pytest.mark.parametrize("impl", ["ours", "anchor:peft"])
def test_co_svd(benchmark, bench_device, bench_tag, bench_sync, case, mode, impl):
    batch, m, n, r = case
    W, C = _inputs(batch, m, n, bench_device)
    bench_tag(group=f"co_svd {mode} {batch}x{m}x{n} r={r}", impl=impl)
    if impl == "ours":
        _run(benchmark, bench_device, bench_sync, lambda: co_svd(W, C, r, mode=mode))
    else:
        _run(benchmark, bench_device, bench_sync, lambda: [_peft_corda(w, C, r, mode == "ipa") for w in W])
