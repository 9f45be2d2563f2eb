"""Fused DoRA: forward + backward time of a DoRA ``LowRankLinear`` against same-run anchors.

Each group is one layer shape ``(out, in)``, token count ``N`` and rank ``r``; one timed step is
``y = layer(x); y.backward(dy)`` with ``x`` requiring grad and ``A``, ``B`` (and the magnitude)
trainable. Anchors, timed in the same group:

- ``anchor:linear``: the frozen linear alone, ``x·Wᵀ`` forward + ``dx`` (the floor),
- ``anchor:lora``: our LoRA step (``LowRankLinear`` without magnitude): the issue's target is
  ours:dora <= 1.15x this,
- ``anchor:peft-dora``: PEFT 0.21's ``lora.Linear`` with ``use_dora=True`` (it forms ``W + s·B·A``,
  out × in, every forward to take the row norms): the target is >= 1.8x faster at 4096², 256 tokens.

Ours: ``dora`` (``LowRankLinear.enable_dora()``: the fused DoRA op, ``‖W_o‖²`` cached). ``flops`` is
the base GEMMs' ``4·N·in·out`` for every implementation; the peak memory of a step is in each
benchmark's ``extra_info`` on GPU.

CPU grid (fp32): 2048² with N 256 / 1024, 4096² with N 256 / 1024, 4096×11008 with N 256, r 16 and 64
(``-k`` for a subset; threads as torch has them: ``OMP_NUM_THREADS`` / ``torch.set_num_threads``).
GPU grid: bf16, 4096² and 4096×11008, N 4096 / 16384, r 16 / 128 (not run yet).
Run: ``python -m pytest bench/speed/bench_dora.py --benchmark-enable``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from corda_kernels.nn import LowRankLinear
from corda_kernels.testing import bench_check, bench_small

ON_GPU = torch.cuda.is_available()
if bench_small():  # CI: every implementation once at a tiny shape (CORDA_BENCH_SMALL=1)
    DTYPE, ROUNDS = torch.float32, 2
    GROUPS = [((32, 48), 64, 4)]
elif ON_GPU and bench_check():
    DTYPE, ROUNDS = torch.bfloat16, 5
    GROUPS = [(shape, 8192, r) for shape in [(4096, 4096), (4096, 11008)] for r in (16, 128)]
elif ON_GPU:
    DTYPE, ROUNDS = torch.bfloat16, 20
    GROUPS = [(shape, n, r) for shape in [(4096, 4096), (4096, 11008)] for n in (4096, 16384) for r in (16, 128)]
else:
    DTYPE, ROUNDS = torch.float32, 3
    GROUPS = [
        (shape, n, r)
        for shape, ns in [((2048, 2048), (256, 1024)), ((4096, 4096), (256, 1024)), ((4096, 11008), (256,))]
        for n in ns
        for r in (16, 64)
    ]
IMPLS = ("anchor:linear", "anchor:lora", "anchor:peft-dora", "ours:dora")


def _randn(*shape, scale=1.0, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=DTYPE)


def _factors(weight, r, device):
    out_f, in_f = weight.shape
    A = _randn(r, in_f, scale=in_f**-0.5, device=device, seed=2)
    B = _randn(out_f, r, scale=0.01, device=device, seed=3)
    return A, B


def _peft_dora(weight: torch.Tensor, r: int, A, B) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    out_f, in_f = weight.shape
    base = nn.Linear(in_f, out_f, bias=False, device=weight.device, dtype=weight.dtype)
    base.weight = nn.Parameter(weight, requires_grad=False)
    config = LoraConfig(r=r, lora_alpha=r, use_dora=True, init_lora_weights=False, target_modules=["base"])
    layer = LoraLinear(base, "default", config=config, r=r, lora_alpha=r, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer.to(device=weight.device, dtype=weight.dtype)


def _build(impl: str, weight: torch.Tensor, r: int, device):
    """(forward fn, trainable tensors) of one implementation."""
    if impl == "anchor:linear":
        return (lambda x: F.linear(x, weight)), []
    A, B = _factors(weight, r, device)
    if impl == "anchor:peft-dora":
        layer = _peft_dora(weight, r, A, B)
    else:
        layer = LowRankLinear(weight, A, B)
        if impl == "ours:dora":
            layer.enable_dora()
    return layer, [p for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,n,r", GROUPS, ids=[f"{o}x{i}-N{n}-r{r}" for (o, i), n, r in GROUPS])
def test_dora_fwd_bwd(bench_backward, bench_device, shape, n, r, impl):
    out_f, in_f = shape
    weight = _randn(out_f, in_f, scale=in_f**-0.5, device=bench_device, seed=0)
    fn, params = _build(impl, weight, r, bench_device)
    x = _randn(n, in_f, device=bench_device, seed=4).requires_grad_()
    dy = _randn(n, out_f, device=bench_device, seed=5)
    group = f"dora {out_f}x{in_f} N={n} r={r} {str(DTYPE).replace('torch.', '')}"
    bench_backward(fn, x, dy, params, ROUNDS, peak=True, group=group, impl=impl, flops=4.0 * n * in_f * out_f)
