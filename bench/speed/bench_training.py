"""Training-path costs: a patched PEFT model against PEFT's own forward, and fp32 factors on a
16-bit base against same-dtype factors.

Groups (one timed call each; ratios against the anchor timed in the same run):

- ``peft-patch <case> <fwd|step>``: ``anchor:peft`` is PEFT 0.21's unpatched LoRA model,
  ``ours:patched`` the same model after :func:`corda_kernels.patch_peft`. Cases: ``mlp`` (three
  64×64 ``nn.Linear`` with ReLUs, 8 tokens: per-call overhead dominates) and ``linear1000`` (one
  1000×1000 ``nn.Linear``, 256 tokens); r = 8. ``fwd`` is a no-grad forward, ``step`` a forward,
  backward and SGD step.
- ``factor-dtype <out>x<in> N r <dtype>``: ``LowRankLinear`` forward + backward on a 16-bit
  weight with ``anchor:same-dtype`` factors (``autocast_adapter_dtype=False``) and ``ours:fp32``
  factors (the default). The target is no measurable slowdown.

CPU: fp32 PEFT cases and bf16 factor-dtype groups; GPU: the same shapes plus a 4096×4096 bf16 group.
Run: ``python -m pytest bench/speed/bench_training.py --benchmark-enable``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from corda_kernels.integrations.peft_patch import patch_peft
from corda_kernels.nn import LowRankLinear
from corda_kernels.testing import bench_small

ON_GPU = torch.cuda.is_available()
ROUNDS = 30 if ON_GPU else 200
PEFT_CASES = {"mlp": ((64, 64, 64), 8), "linear1000": ((1000,), 256)}
FACTOR_GROUPS = [((512, 512), 512, 16, torch.bfloat16)]
if ON_GPU:
    FACTOR_GROUPS += [((4096, 4096), 8192, 64, torch.bfloat16), ((4096, 4096), 8192, 64, torch.float16)]
if bench_small():  # CI: every implementation once at a tiny shape (CORDA_BENCH_SMALL=1)
    ROUNDS = 2
    PEFT_CASES = {"mlp": ((16, 16), 4), "linear1000": ((32,), 8)}
    FACTOR_GROUPS = [((32, 48), 16, 4, torch.bfloat16)]


def _peft_model(case: str, device):
    from peft import LoraConfig, get_peft_model

    widths, _ = PEFT_CASES[case]
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, w in enumerate(widths):
        layers += [nn.Linear(w if case == "mlp" else w, w)] + ([nn.ReLU()] if i < len(widths) - 1 else [])
    model = nn.Sequential(*layers).to(device)
    targets = [str(i) for i, m in enumerate(model) if isinstance(m, nn.Linear)]
    return get_peft_model(model, LoraConfig(r=8, target_modules=targets, init_lora_weights=False))


@pytest.mark.parametrize("impl", ["anchor:peft", "ours:patched"])
@pytest.mark.parametrize("kind", ["fwd", "step"])
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_patched_peft(benchmark, bench_device, bench_tag, bench_sync, case, kind, impl):
    model = _peft_model(case, bench_device)
    if impl == "ours:patched":
        patch_peft(model)
    widths, n = PEFT_CASES[case]
    x = torch.randn(n, widths[0], device=bench_device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4)

    def fwd():
        with torch.no_grad():
            model(x)
        bench_sync()

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).sum().backward()
        opt.step()
        bench_sync()

    fn = fwd if kind == "fwd" else step
    for _ in range(3):
        fn()
    bench_tag(group=f"peft-patch {case} {kind}", impl=impl)
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=2)


@pytest.mark.parametrize("impl", ["anchor:same-dtype", "ours:fp32"])
@pytest.mark.parametrize(
    "shape,n,r,dtype", FACTOR_GROUPS, ids=[f"{o}x{i}-N{n}-r{r}-{d}" for (o, i), n, r, d in FACTOR_GROUPS]
)
def test_factor_dtype(bench_backward, bench_device, shape, n, r, dtype, impl):
    out_f, in_f = shape
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_f, in_f, generator=g) * in_f**-0.5).to(bench_device, dtype)
    A = torch.randn(r, in_f, generator=g) * in_f**-0.5
    B = torch.randn(out_f, r, generator=g) * 0.01
    layer = LowRankLinear(weight, A, B, autocast_adapter_dtype=impl == "ours:fp32").to(bench_device)
    x = torch.randn(n, in_f, generator=g).to(bench_device, dtype).requires_grad_()
    dy = torch.randn(n, out_f, generator=g).to(bench_device, dtype)
    group = f"factor-dtype {out_f}x{in_f} N={n} r={r} {str(dtype)[6:]}"
    rounds = max(ROUNDS // 10, 2 if bench_small() else 10)
    bench_backward(layer, x, dy, [layer.A, layer.B], rounds, group=group, impl=impl)
