"""Segmented many-adapter low-rank op: mixed batches (one adapter per sequence) against same-run anchors.

Each group is one base shape ``(out, in)``, ``S`` sequences of ``L`` tokens (``N = S·L``), ``n``
adapters of ranks spread evenly over 8-64 (scale 16 / r, like ``lora_alpha = 16``), every sequence
using one adapter (each adapter the same number of sequences, in shuffled order), and a mode:
``fwd`` (a no-grad forward: serving) or ``fwd+bwd`` (``y = f(x); y.backward(dy)`` with ``x`` and
every adapter factor requiring grad, the base frozen: multi-adapter training). Implementations:

- ``ours:<backend>``: :func:`corda_kernels.lowrank_linear_segmented` on the stacked factors
  (zero-padded to rank 64, with ``ranks``; packed once, outside the timed region) with that
  backend forced (CPU: ``torch``, ``reference``; GPU: ``triton``, ``torch``),
- ``anchor:loop``: a Python loop of our single-adapter op (:func:`corda_kernels.lowrank_linear`)
  over the adapter groups, each group's rows gathered, run and written back (the groups' row
  indices computed once outside the timed region, which favours the anchor),
- ``anchor:peft``: PEFT 0.21's mixed-batch forward (``adapter_names=``, one name per sequence) of one
  LoRA ``Linear`` layer holding the ``n`` adapters (eval mode, which ``adapter_names`` requires; its
  LoRA weights made trainable for ``fwd+bwd``), weights equal to ours.

``flops`` is the base GEMMs' (``2·N·in·out`` forward, ``4·N·in·out`` forward + backward) for every
implementation (a common yardstick, as in bench_lowrank.py).

Shapes: CPU fp32, 512 x 512, 64 sequences x 16 tokens, 4 / 16 / 64 adapters (about a minute);
``CORDA_BENCH_SMALL=1`` a tiny one; GPU bf16, 4096 x 4096, 64 sequences x 128 tokens (8k tokens)
(``CORDA_BENCH_CHECK=1``: the GPU check's ``segmented`` stage, 5 rounds). Run:
``python -m pytest bench/speed/bench_segmented.py --benchmark-enable``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import corda_kernels as ck
from corda_kernels.ops.segmented import pack_adapters
from corda_kernels.testing import bench_check, bench_small

ON_GPU = torch.cuda.is_available()
if bench_small():  # CI: every implementation once at a tiny shape (CORDA_BENCH_SMALL=1)
    DTYPE, ROUNDS, SHAPE, SEQS, SEQ_LEN, ADAPTERS, RANKS = torch.float32, 2, (32, 48), 8, 4, (4,), (2, 8)
elif ON_GPU:  # the GPU check's shapes (bench/gpu/run.sh: CORDA_BENCH_CHECK=1, few rounds)
    DTYPE, SHAPE, SEQS, SEQ_LEN, ADAPTERS, RANKS = torch.bfloat16, (4096, 4096), 64, 128, (4, 16, 64), (8, 64)
    ROUNDS = 5 if bench_check() else 20
else:
    DTYPE, ROUNDS, SHAPE, SEQS, SEQ_LEN, ADAPTERS, RANKS = torch.float32, 5, (512, 512), 64, 16, (4, 16, 64), (8, 64)
BACKENDS = ("triton", "torch") if ON_GPU else ("torch", "reference")
IMPLS = ("anchor:loop", "anchor:peft") + tuple(f"ours:{b}" for b in BACKENDS)
MODES = ("fwd", "fwd+bwd")
LORA_ALPHA = 16


def _ranks(n: int) -> list[int]:
    lo, hi = RANKS
    return [lo + (hi - lo) * a // max(n - 1, 1) for a in range(n)]


def _case(n: int, device):
    """Base weight, per-adapter factors (lists), scales, per-sequence index, x, dy."""
    g = torch.Generator().manual_seed(n)
    out_f, in_f = SHAPE

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=DTYPE)

    weight = randn(out_f, in_f, scale=in_f**-0.5)
    ranks = _ranks(n)
    As = [randn(r, in_f, scale=in_f**-0.5) for r in ranks]
    Bs = [randn(out_f, r, scale=0.01) for r in ranks]
    scales = [LORA_ALPHA / r for r in ranks]
    index = (torch.arange(SEQS) % n)[torch.randperm(SEQS, generator=g)].to(device)
    x = randn(SEQS, SEQ_LEN, in_f)
    dy = randn(SEQS, SEQ_LEN, out_f)
    return weight, As, Bs, scales, index, x, dy


def _peft_layer(weight, As, Bs):
    """One PEFT LoRA Linear holding the adapters ``a0``.. with our factors; eval mode."""
    from peft import LoraConfig, get_peft_model

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False)

        def forward(self, x):
            return self.proj(x)

    base = One().to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        base.proj.weight.copy_(weight)

    def config(r):
        return LoraConfig(r=r, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["proj"])

    model = get_peft_model(base, config(As[0].shape[0]), adapter_name="a0")
    for a in range(1, len(As)):
        model.add_adapter(f"a{a}", config(As[a].shape[0]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        for a, (A, B) in enumerate(zip(As, Bs)):
            layer.lora_A[f"a{a}"].weight.copy_(A)
            layer.lora_B[f"a{a}"].weight.copy_(B)
    layer.to(device=weight.device, dtype=weight.dtype).eval()
    return layer


def _build(impl, weight, As, Bs, scales, index, train: bool, monkeypatch):
    """(fn(x) -> y, trainable tensors) of one implementation."""
    if impl == "anchor:peft":
        layer = _peft_layer(weight, As, Bs)
        names = [f"a{a}" for a in index.tolist()]
        params = [p for n, p in layer.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(train)
        return (lambda x: layer(x, adapter_names=names)), params
    if impl == "anchor:loop":
        As = [A.clone().requires_grad_(train) for A in As]
        Bs = [B.clone().requires_grad_(train) for B in Bs]
        groups = [(a, (index == a).nonzero().squeeze(1)) for a in range(len(As))]

        def loop(x):
            y = x.new_empty(*x.shape[:-1], weight.shape[0])
            for a, rows in groups:
                y[rows] = ck.lowrank_linear(x[rows], weight, As[a], Bs[a], scale=scales[a])
            return y

        return loop, As + Bs
    monkeypatch.setenv("CORDA_KERNELS_BACKEND", impl.split(":", 1)[1])
    A, B, ranks = pack_adapters(As, Bs)
    A, B = A.requires_grad_(train), B.requires_grad_(train)
    scales_t = torch.tensor(scales, device=weight.device)

    def ours(x):
        return ck.lowrank_linear_segmented(x, weight, A, B, index, scales=scales_t, ranks=ranks)

    return ours, [A, B]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", ADAPTERS, ids=[f"adapters{n}" for n in ADAPTERS])
def test_segmented(benchmark, bench_tag, bench_backward, bench_sync, bench_device, monkeypatch, n, mode, impl):
    if impl == "anchor:peft":
        pytest.importorskip("peft")
    weight, As, Bs, scales, index, x, dy = _case(n, bench_device)
    train = mode == "fwd+bwd"
    fn, params = _build(impl, weight, As, Bs, scales, index, train, monkeypatch)
    out_f, in_f = SHAPE
    tokens = SEQS * SEQ_LEN
    lo, hi = RANKS
    group = f"segmented {out_f}x{in_f} N={tokens} adapters={n} r={lo}-{hi} {str(DTYPE).replace('torch.', '')} {mode}"
    if train:
        x.requires_grad_()
        bench_backward(fn, x, dy, params, ROUNDS, group=group, impl=impl, flops=4.0 * tokens * in_f * out_f)
        return

    def run():
        with torch.no_grad():
            fn(x)
        bench_sync()

    bench_tag(group=group, impl=impl, flops=2.0 * tokens * in_f * out_f)
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
