"""CorDA end to end against PEFT in the same run: calibrate + decompose + adapt, both modes.

Ours: ``calibrate`` (any batch size, padding excluded, q/k/v and gate/up sharing a covariance)
then ``apply(method="corda")``. Anchor: PEFT 0.21's ``preprocess_corda`` (batch size 1, one
covariance per module, full SVD of every layer) then ``get_peft_model``. Same random Llama, same
calibration tokens, same rank. Each run starts from a fresh copy of the model. Our calibration stops
each forward after the last target layer (no final norm / lm_head: with LLaMA's 32000-token
vocabulary that is over half of this small model's FLOPs); PEFT runs the whole model. Besides time, the
table records each side's output agreement right after initialization (max |Δlogits| against the
original model): ours must be no worse. Run: ``python -m pytest bench/speed/bench_corda_e2e.py --benchmark-enable``.
"""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import corda_kernels as ck  # noqa: E402
from corda_kernels.testing import bench_small  # noqa: E402

RANK = 16
SAMPLES, SEQ = 128, 128  # CorDA uses hundreds of calibration samples (256 in the paper)
SMALL = bench_small()  # CI: a tiny model and 16 short samples (CORDA_BENCH_SMALL=1)
if SMALL:
    RANK, SAMPLES, SEQ = 4, 16, 16


# LlamaConfig sizes: CI's tiny stand-in, LLaMA-2-7B block shapes (2 blocks) on GPU, a 4-block
# 512-wide model with LLaMA's vocabulary on CPU.
_SIZES = {
    "small": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=256),
    "cuda": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32),
    "cpu": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
}
_MAX_POSITIONS = {"small": 64, "cuda": 2048, "cpu": 512}


def _model(device):
    torch.manual_seed(0)
    size = "small" if SMALL else ("cuda" if device.type == "cuda" else "cpu")
    config = LlamaConfig(**{"vocab_size": 32000, **_SIZES[size]}, max_position_embeddings=_MAX_POSITIONS[size])
    return LlamaForCausalLM(config).to(device).eval()


def _samples(vocab, device):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (SAMPLES, SEQ), generator=g).to(device)


def _ours(model, ids, mode):
    batches = [
        {"input_ids": ids[i : i + 8], "attention_mask": torch.ones_like(ids[i : i + 8])} for i in range(0, len(ids), 8)
    ]
    cal = ck.calibrate(model, batches, progress=False)
    return ck.apply(model, "corda", mode=mode, rank=RANK, covariances=cal, progress=False)


def _peft(model, ids, mode):
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    config = LoraConfig(
        r=RANK,
        lora_alpha=RANK,
        target_modules=targets,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method={"ipa": "ipm", "kpa": "kpm"}[mode]),
    )

    @torch.no_grad()
    def run_model():
        for row in ids:
            model(input_ids=row[None])

    preprocess_corda(model, config, run_model=run_model)
    return get_peft_model(model, config)


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
@pytest.mark.parametrize("impl", ["ours", "anchor:peft"])
def test_corda_end_to_end(benchmark, bench_device, bench_tag, bench_sync, mode, impl):
    base = _model(bench_device)
    ids = _samples(base.config.vocab_size, bench_device)
    with torch.no_grad():
        reference = base(ids[:4]).logits
    run = _ours if impl == "ours" else _peft
    adapted = {}

    def setup():
        return (copy.deepcopy(base), ids, mode), {}

    def target(model, ids, mode):
        adapted["model"] = run(model, ids, mode)
        bench_sync()

    bench_tag(group=f"corda-{mode} e2e {bench_device.type} r={RANK}", impl=impl)
    benchmark.pedantic(target, setup=setup, rounds=2, warmup_rounds=1)
    with torch.no_grad():
        delta = float((adapted["model"](ids[:4]).logits - reference).abs().max())
    benchmark.extra_info["max_abs_logit_delta"] = delta
    assert delta < 1e-3 if bench_device.type == "cpu" else delta < 5e-2
