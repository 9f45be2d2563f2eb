"""Several named corda_kernels adapters on one base, a mixed batch: one forward under
:func:`corda_kernels.adapter_rows` (each layer one segmented call) against a loop over the adapters
(``set_adapter``, then a forward of that adapter's sequences; the way to serve them without per-row
routing).

Each group is one number of adapters ``n`` (LoRA, ranks spread evenly over 8-64, added with
``apply(..., adapter_name=)``; ``B`` drawn at random so every term is non-zero) on a 2-layer Llama of
hidden size 512 (fp32, intermediate 1376, 8 heads), ``S`` sequences of ``L`` tokens, every sequence
naming one adapter (each adapter the same number of sequences, in shuffled order), no-grad, eval
mode. Implementations: ``anchor:loop`` and ``ours:rows``.

Run: ``python -m pytest bench/speed/bench_adapter_rows.py --benchmark-enable``; ``CORDA_BENCH_SMALL=1``
a tiny case.
"""

from __future__ import annotations

import pytest
import torch

import corda_kernels as ck
from corda_kernels.testing import bench_small, tiny_llama

ROUNDS, HIDDEN, INTERMEDIATE, SEQS, SEQ_LEN, ADAPTERS, RANKS = 5, 512, 1376, 64, 16, (4, 16), (8, 64)
if bench_small():
    ROUNDS, HIDDEN, INTERMEDIATE, SEQS, SEQ_LEN, ADAPTERS, RANKS = 2, 64, 96, 8, 4, (4,), (2, 8)
IMPLS = ("anchor:loop", "ours:rows")


def _model(n: int):
    lo, hi = RANKS
    model = tiny_llama(hidden=HIDDEN, layers=2, intermediate=INTERMEDIATE, heads=8, kv_heads=8, vocab=256).eval()
    for a in range(n):
        ck.apply(
            model,
            "lora",
            rank=lo + (hi - lo) * a // max(n - 1, 1),
            alpha=16,
            seed=a,
            progress=False,
            adapter_name=f"a{a}",
        )
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, ck.LowRankLinear):
                for name in layer.adapter_names:
                    layer.adapter(name).B.normal_(std=0.02)
    return model


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", ADAPTERS)
def test_adapter_rows_forward(benchmark, bench_tag, n, impl):
    torch.manual_seed(n)
    model = _model(n)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (SEQS, SEQ_LEN), generator=g)
    order = torch.randperm(SEQS, generator=g) % n
    names = [f"a{int(a)}" for a in order]
    lo, hi = RANKS
    bench_tag(group=f"adapter rows llama h={HIDDEN} 2 layers adapters={n} r={lo}-{hi} N={SEQS * SEQ_LEN}", impl=impl)

    def rows():
        with torch.no_grad(), ck.adapter_rows(model, names):
            return model(input_ids=ids).logits

    def loop():
        out = None
        with torch.no_grad():
            for a in range(n):
                picked = (order == a).nonzero().squeeze(1)
                ck.set_adapter(model, f"a{a}")
                logits = model(input_ids=ids[picked]).logits
                out = logits.new_empty(SEQS, *logits.shape[1:]) if out is None else out
                out[picked] = logits
        return out

    torch.testing.assert_close(rows(), loop(), rtol=1e-4, atol=1e-4)
    benchmark.pedantic(rows if impl == "ours:rows" else loop, rounds=ROUNDS, warmup_rounds=1)
