"""Fused low-rank linear: forward + backward time of ``LowRankLinear`` against same-run anchors.

Each group is one layer shape ``(out, in)``, token count ``N`` and rank ``r``; one timed step is
``y = layer(x); y.backward(dy)`` with ``x`` requiring grad (what a transformer layer does in
training). Anchors, timed in the same group:

- ``anchor:linear``: the frozen linear alone, ``x·Wᵀ`` forward + ``dx`` (the floor: the adapter can
  only add to it),
- ``anchor:peft``: PEFT 0.21's ``lora.Linear`` around an ``nn.Linear`` (A and B trainable),
- ``anchor:peft-compile``: the same under ``torch.compile``.

Ours: ``lora`` (A, B trainable), ``asymmetric`` (A frozen: x is not saved), ``partial50``
(Partial-LoRA on a random 50% of the rows and of the columns), and on GPU ``lora-torch`` (the torch
composition forced with ``CORDA_KERNELS_BACKEND=torch``, to keep the backend preference honest).
``flops`` is the base GEMMs' ``4·N·in·out`` for every implementation (a common yardstick); the peak
memory of a step is in each benchmark's ``extra_info`` on GPU.

GPU grid: bf16, shapes 4096×4096 / 11008×4096 / 4096×11008, N in {4096, 16384}, r in {16, 64,
128} (several minutes, mostly PEFT compiles; subset with ``-k``); with ``CORDA_BENCH_CHECK=1`` the GPU
check's set (4096×4096 and 4096×11008, N 8192, r 16 / 128, no compiled PEFT). CPU: two small fp32 groups.
Run: ``python -m pytest bench/speed/bench_lowrank.py --benchmark-enable``.
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
    OURS = ("lora", "asymmetric", "partial50", "lora-torch") if ON_GPU else ("lora", "asymmetric", "partial50")
elif ON_GPU and bench_check():  # bench/gpu/run.sh: the target shapes, few rounds, no compiled PEFT
    DTYPE, ROUNDS = torch.bfloat16, 5
    GROUPS = [(shape, 8192, r) for shape in [(4096, 4096), (4096, 11008)] for r in (16, 128)]
    OURS = ("lora", "asymmetric", "partial50", "lora-torch")
elif ON_GPU:
    DTYPE, ROUNDS = torch.bfloat16, 20
    GROUPS = [
        (shape, n, r)
        for shape in [(4096, 4096), (11008, 4096), (4096, 11008)]
        for n in (4096, 16384)
        for r in (16, 64, 128)
    ]
    OURS = ("lora", "asymmetric", "partial50", "lora-torch")
else:
    DTYPE, ROUNDS = torch.float32, 5
    GROUPS = [((256, 512), 1024, 16), ((512, 512), 2048, 32)]
    OURS = ("lora", "asymmetric", "partial50")
ANCHORS = (
    ("anchor:linear", "anchor:peft")
    if ON_GPU and bench_check()
    else ("anchor:linear", "anchor:peft", "anchor:peft-compile")
)
IMPLS = ANCHORS + tuple(f"ours:{v}" for v in OURS)


def _randn(*shape, scale=1.0, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=DTYPE)


def _peft_layer(weight: torch.Tensor, r: int) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    out_f, in_f = weight.shape
    base = nn.Linear(in_f, out_f, bias=False, device=weight.device, dtype=weight.dtype)
    base.weight = nn.Parameter(weight, requires_grad=False)
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, init_lora_weights=False, target_modules=["base"])
    layer = LoraLinear(base, "default", config=config, r=r, lora_alpha=r, init_lora_weights=False)
    return layer.to(device=weight.device, dtype=weight.dtype)


def _ours(weight: torch.Tensor, r: int, variant: str, device) -> LowRankLinear:
    out_f, in_f = weight.shape
    rows = cols = None
    if variant == "partial50":
        g = torch.Generator().manual_seed(1)
        rows = torch.randperm(out_f, generator=g)[: out_f // 2].to(device)
        cols = torch.randperm(in_f, generator=g)[: in_f // 2].to(device)
    n_rows = out_f if rows is None else rows.numel()
    n_cols = in_f if cols is None else cols.numel()
    A = _randn(r, n_cols, scale=n_cols**-0.5, device=device, seed=2)
    B = _randn(n_rows, r, scale=0.01, device=device, seed=3)
    trainable = ("B",) if variant == "asymmetric" else ("A", "B")
    return LowRankLinear(weight, A, B, row_index=rows, col_index=cols, trainable=trainable)


def _build(impl: str, weight: torch.Tensor, r: int, device, monkeypatch):
    """(forward fn, trainable tensors) of one implementation."""
    if impl == "anchor:linear":
        return (lambda x: F.linear(x, weight)), []
    if impl.startswith("anchor:peft"):
        layer = _peft_layer(weight, r)
        fn = torch.compile(layer) if impl.endswith("compile") else layer
        return fn, [p for p in layer.parameters() if p.requires_grad]
    variant = impl.split(":", 1)[1]
    if variant == "lora-torch":
        monkeypatch.setenv("CORDA_KERNELS_BACKEND", "torch")
        variant = "lora"
    layer = _ours(weight, r, variant, device)
    return layer, [p for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,n,r", GROUPS, ids=[f"{o}x{i}-N{n}-r{r}" for (o, i), n, r in GROUPS])
def test_lowrank_fwd_bwd(bench_backward, bench_device, monkeypatch, shape, n, r, impl):
    out_f, in_f = shape
    weight = _randn(out_f, in_f, scale=in_f**-0.5, device=bench_device, seed=0)
    fn, params = _build(impl, weight, r, bench_device, monkeypatch)
    x = _randn(n, in_f, device=bench_device, seed=4).requires_grad_()
    dy = _randn(n, out_f, device=bench_device, seed=5)
    group = f"lowrank {out_f}x{in_f} N={n} r={r} {str(DTYPE).replace('torch.', '')}"
    bench_backward(fn, x, dy, params, ROUNDS, peak=True, group=group, impl=impl, flops=4.0 * n * in_f * out_f)
