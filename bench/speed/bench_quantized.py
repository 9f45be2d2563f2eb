"""Low-rank linear over a quantized frozen base: forward + dx/dA/dB time against same-run anchors.

Each group is one projection shape ``(out, in)`` (SmolLM2-135M's on a CPU, LLaMA-2-7B's on a GPU) with
``N`` tokens and rank ``r``; one timed step is ``y = f(x); y.backward(dy)`` (A, B trainable, x
requiring grad). Implementations:

- ``anchor:dequant-matmul``: bitsandbytes' own dequantization of the stored NF4 / int8 weight
  (``dequantize_4bit`` / ``int8_vectorwise_dequant``) every call, then ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` in torch,
- ``anchor:full``: the same adapter over the full-precision weight (``LowRankLinear``, the floor),
- ``ours:nf4`` / ``ours:int8``: ``LowRankLinear`` with the base quantized (the CPU path dequantizes
  per call through the reference, then runs the fused torch composition; on CUDA the Triton GEMM
  dequantizes tiles in its K loop).

Run: ``python -m pytest bench/speed/bench_quantized.py --benchmark-enable`` (CPU: fp32).
"""

from __future__ import annotations

import pytest
import torch

from corda_kernels.nn import LowRankLinear
from corda_kernels.testing import bench_check, bench_small

bnb = pytest.importorskip("bitsandbytes")

ON_GPU = torch.cuda.is_available()
DTYPE, ROUNDS = (torch.bfloat16, 20) if ON_GPU else (torch.float32, 5)
GROUPS = [((576, 576), 512, 32), ((1536, 576), 512, 32), ((576, 1536), 512, 32)]
if ON_GPU:  # LLaMA-2-7B projection shapes (bench/gpu/run.sh: few rounds)
    GROUPS = [((4096, 4096), 8192, 16), ((4096, 11008), 8192, 16)]
    ROUNDS = 5 if bench_check() else ROUNDS
IMPLS = ("anchor:full", "anchor:dequant-matmul", "ours:nf4", "ours:int8")
FORMAT = {"ours:nf4": "nf4", "ours:int8": "int8"}
if bench_small():  # CI: every implementation once at a tiny shape (CORDA_BENCH_SMALL=1)
    DTYPE, ROUNDS = torch.float32, 2
    GROUPS = [((64, 128), 16, 4)]


def _randn(*shape, scale=1.0, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=DTYPE)


def _dequant_matmul(weight, A, B):
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")

    def fn(x):
        W = bnbf.dequantize_4bit(packed, state)
        return x @ W.T + (x @ A.T) @ B.T

    return fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,n,r", GROUPS, ids=[f"{o}x{i}-N{n}-r{r}" for (o, i), n, r in GROUPS])
def test_quantized_fwd_bwd(bench_backward, bench_device, shape, n, r, impl):
    out_f, in_f = shape
    weight = _randn(out_f, in_f, scale=in_f**-0.5, device=bench_device, seed=0)
    A = _randn(r, in_f, scale=in_f**-0.5, device=bench_device, seed=2).requires_grad_()
    B = _randn(out_f, r, scale=0.01, device=bench_device, seed=3).requires_grad_()
    if impl == "anchor:dequant-matmul":
        fn = _dequant_matmul(weight, A, B)
    else:
        fn = LowRankLinear(weight, A.detach(), B.detach())
        if impl in FORMAT:
            fn.quantize_base(FORMAT[impl])
    params = [A, B] if impl == "anchor:dequant-matmul" else [fn.A, fn.B]
    x = _randn(n, in_f, device=bench_device, seed=4).requires_grad_()
    dy = _randn(n, out_f, device=bench_device, seed=5)
    group = f"quantized {out_f}x{in_f} N={n} r={r} {str(DTYPE).replace('torch.', '')}"
    bench_backward(fn, x, dy, params, ROUNDS, group=group, impl=impl, flops=4.0 * n * in_f * out_f)
