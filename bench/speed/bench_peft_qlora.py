"""patch_peft on QLoRA layers: a patched PEFT bitsandbytes LoRA layer against PEFT's own forward.

Each group is one base shape ``(out, in)`` (square: 1024² and 4096² on a CPU), ``N`` tokens, a
rank-16 adapter, a bitsandbytes format (``nf4``: ``Linear4bit``, NF4, block 64, double quantization;
``int8``: ``Linear8bitLt``, ``has_fp16_weights=False``) and a mode: ``fwd`` (a no-grad forward) or
``train`` (``y = f(x); y.backward(dy)`` with ``x`` and the LoRA factors requiring grad: a QLoRA
training step's layer work). Both layers are PEFT's ``peft.tuners.lora.bnb.Linear4bit`` /
``Linear8bitLt`` over the same bitsandbytes base, in training mode without dropout (bitsandbytes'
CPU int8 path then dequantizes and multiplies, and its NF4 layer does not repack the weight for its
CPU inference kernel). Implementations:

- ``anchor:peft``: PEFT's forward (bitsandbytes' ``matmul_4bit`` / ``matmul`` for the base, then
  ``lora_B(lora_A(x))``),
- ``ours:patched``: the same layer after :func:`corda_kernels.integrations.peft_patch.patch_layer`
  (one call of the fused op, the base read from bitsandbytes' storage).

``flops`` is the base GEMM's (``2·N·in·out`` forward, ``4·N·in·out`` forward + backward).
Run: ``python -m pytest bench/speed/bench_peft_qlora.py --benchmark-enable`` (CPU: fp32);
``CORDA_BENCH_SMALL=1`` a tiny shape.
"""

from __future__ import annotations

import pytest
import torch

from corda_kernels.integrations.peft_patch import patch_layer
from corda_kernels.testing import bench_small

bnb = pytest.importorskip("bitsandbytes")
peft_bnb = pytest.importorskip("peft.tuners.lora.bnb")

DTYPE, ROUNDS, RANK, TOKENS, SHAPES = torch.float32, 11, 16, 256, ((1024, 1024), (4096, 4096))
if bench_small():
    ROUNDS, TOKENS, SHAPES = 2, 16, ((64, 128),)
FORMATS = ("nf4", "int8")
MODES = ("fwd", "train")
IMPLS = ("anchor:peft", "ours:patched")


def _layer(fmt: str, shape, seed: int = 0):
    """PEFT's bitsandbytes LoRA layer over a freshly quantized base (CPU)."""
    out_f, in_f = shape
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_f, in_f, generator=g) * in_f**-0.5
    if fmt == "nf4":
        base = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=DTYPE, quant_type="nf4")
        base.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
        cls = peft_bnb.Linear4bit
    else:
        base = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
        base.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        cls = peft_bnb.Linear8bitLt
    base = base.to("cpu")  # bitsandbytes quantizes on the move to a device
    from peft import LoraConfig

    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, init_lora_weights=False)
    layer = cls(base, "default", config, r=RANK, lora_alpha=2 * RANK)
    return layer.train()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
@pytest.mark.parametrize("fmt", FORMATS)
def test_peft_qlora_layer(benchmark, bench_tag, bench_backward, fmt, shape, mode, impl):
    layer = _layer(fmt, shape)
    if impl == "ours:patched":
        assert patch_layer(layer, "bench") is None
    out_f, in_f = shape
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, in_f, generator=g)
    group = f"qlora {fmt} {out_f}x{in_f} N={TOKENS} r={RANK} {mode}"
    if mode == "fwd":
        bench_tag(group=group, impl=impl, flops=2.0 * TOKENS * in_f * out_f)

        def forward():
            with torch.no_grad():
                layer(x)

        benchmark.pedantic(forward, rounds=ROUNDS, warmup_rounds=1)
        return
    x.requires_grad_()
    dy = torch.randn(TOKENS, out_f, generator=g)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    bench_backward(layer, x, dy, params, ROUNDS, group=group, impl=impl, flops=4.0 * TOKENS * in_f * out_f)
