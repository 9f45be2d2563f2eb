"""covariance_update against same-run anchors, per backend.

Anchors (timed in the same run, see bench/speed/conftest.py):
  * ``anchor:peft``: PEFT/CorDA's way, ``cov += x.float().t() @ x.float()`` (upcast copy, full square);
  * ``anchor:torch-bf16-mm`` (GPU only): torch's 16-bit GEMM with an fp32 result,
    ``cov += torch.mm(x.t(), x, out_dtype=torch.float32)`` (``(x.t() @ x).float()`` where that
    overload is missing).
With a token mask both anchors first select the kept rows (``x[mask]``), as a caller would.

Ours: ``corda_kernels.covariance_update`` with each backend forced through CORDA_KERNELS_BACKEND and
``check_finite=False`` (the kernels alone), plus ``ours:auto(checked)``: the default call, backend
chosen by the dispatcher and the NaN/Inf check on.

TFLOP/s count only the triangle's FLOPs, n·d·(d+1), for every implementation (the useful work).

Shapes: on a GPU d in {4096, 11008} x tokens in {2k, 8k, 16k}, bf16, and a masked case per d (with
``CORDA_BENCH_CHECK=1``, the GPU check's set: d {4096, 11008} x {8k, 16k} tokens, masked and not); on the
CPU small shapes (d 576-2048, 2k tokens, fp32 and bf16, one masked case) that finish in about a
minute. Run: ``python -m pytest bench/speed/bench_covariance.py --benchmark-enable``.
"""

from __future__ import annotations

import functools

import pytest
import torch

import corda_kernels as ck
from corda_kernels import _backend
from corda_kernels.testing import bench_check, bench_small

ON_GPU = torch.cuda.is_available()

if bench_small():  # CI: every case once at tiny sizes (CORDA_BENCH_SMALL=1)
    SHAPES = [(64, 2048, torch.float32, False), (64, 2048, torch.bfloat16, True)]
    BACKENDS = ["triton", "cuda", "reference"] if ON_GPU else ["torch", "reference"]
    ROUNDS, WARMUP = 2, 1
elif ON_GPU and bench_check():  # bench/gpu/run.sh: the target shapes, few rounds
    SHAPES = [(d, n, torch.bfloat16, masked) for d in (4096, 11008) for n in (8192, 16384) for masked in (False, True)]
    BACKENDS = ["triton", "cuda", "reference"]
    ROUNDS, WARMUP = 5, 1
elif ON_GPU:
    SHAPES = [(d, n, torch.bfloat16, False) for d in (4096, 11008) for n in (2048, 8192, 16384)]
    SHAPES += [(d, 8192, torch.bfloat16, True) for d in (4096, 11008)]
    BACKENDS = ["triton", "cuda", "reference"]
    ROUNDS, WARMUP = 20, 2
else:
    SHAPES = [(d, 2048, dt, False) for d in (576, 1536, 2048) for dt in (torch.float32, torch.bfloat16)]
    SHAPES += [(1536, 2048, torch.bfloat16, True)]
    BACKENDS = ["torch", "reference"]
    ROUNDS, WARMUP = 5, 1

IMPLS = ["anchor:peft"] + (["anchor:torch-bf16-mm"] if ON_GPU else []) + [f"ours:{b}" for b in BACKENDS]
IMPLS += ["ours:auto(checked)"]


def _case_id(shape) -> str:
    d, n, dtype, masked = shape
    return f"d{d}-n{n}-{str(dtype).replace('torch.', '')}{'-masked' if masked else ''}"


@functools.cache
def _has_mm_out_dtype(device: str) -> bool:
    a = torch.ones(2, 2, device=device, dtype=torch.bfloat16)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def _inputs(shape, device):
    d, n, dtype, masked = shape
    g = torch.Generator(device=device).manual_seed(0)
    if not masked:
        return torch.randn(n, d, device=device, generator=g).to(dtype), None
    # (batch, 1024, d) with right padding: each sequence keeps a random 50-100% prefix.
    seq = 1024
    x = torch.randn(n // seq, seq, d, device=device, generator=g).to(dtype)
    lengths = torch.randint(seq // 2, seq + 1, (n // seq, 1), device=device, generator=g)
    mask = torch.arange(seq, device=device)[None, :] < lengths
    return x, mask


def _selected(x, mask):
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=_case_id)
def test_covariance(benchmark, bench_device, bench_tag, bench_sync, monkeypatch, shape, impl):
    d, n, dtype, masked = shape
    x, mask = _inputs(shape, bench_device)
    cov = torch.zeros(d, d, device=bench_device)
    kept = n if mask is None else int(mask.sum())

    if impl == "anchor:peft":

        def fn():
            xf = _selected(x, mask).float()
            cov.add_(xf.t() @ xf)

    elif impl == "anchor:torch-bf16-mm":
        if _has_mm_out_dtype(bench_device.type):

            def fn():
                rows = _selected(x, mask)
                cov.add_(torch.mm(rows.t(), rows, out_dtype=torch.float32))

        else:

            def fn():
                rows = _selected(x, mask)
                cov.add_((rows.t() @ rows).float())

    else:
        backend = impl.split(":", 1)[1]
        checked = backend == "auto(checked)"
        backend = "auto" if checked else backend
        if backend == "cuda" and not _backend.extension_has_cuda():
            pytest.skip("the cuda backend needs corda_kernels._C built with CUDA")
        monkeypatch.setenv(_backend.ENV_BACKEND, backend)

        def fn():
            ck.covariance_update(cov, x, mask, check_finite=checked)

    def run():
        fn()
        bench_sync()

    bench_tag(
        group=f"cov d={d} n={n} {str(dtype).replace('torch.', '')}{' masked' if masked else ''}",
        impl=impl,
        flops=float(kept) * d * (d + 1),
    )
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
