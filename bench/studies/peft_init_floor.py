"""Floors of the patched PEFT initializations: how fast any implementation of each could be here.

Measures, in one process, one thread, each step from a fresh copy of the model (the cases and
sizes of ``bench/speed/bench_peft_init.py``: r 16, q/k/v/o/gate/up/down, CorDA's 16 x 64 tokens):

- ``inject``: PEFT's ``get_peft_model`` with ``init_lora_weights=True`` (random A, zero B), the work
  every initialization pays besides its own linear algebra;
- ``read``: one fp32 product ``W @ X`` (``X``: ``in x r``) per target weight, the least work of any
  top-r method that reads each weight once;
- ``forwards``: CorDA's calibration forwards with no hooks (both sides run them);
- ``fp64 W·C + QR``: per target, the fp64 product ``W · C_d`` and the R factor of its tall side, the
  two O(m·n²) fp64 steps of an fp64-accurate bottom-r (knowledge-preserved CorDA; the values do not
  change the time, so ``C_d`` is a random SPD matrix);
- PEFT's own ``"pissa"``, ``"corda"`` ipm and kpm (``preprocess_corda`` + ``get_peft_model``) and the
  same under ``corda_kernels.peft_patched()``;
- with ``--krylov``: for the weights of the first, middle and last block, the block Krylov basis
  width at which :mod:`corda_kernels.linalg.top_svd`'s acceptance test (each top-r triplet with an
  fp32 SVD's backward error) first passes, with no width limit, its time, and the gaps
  ``σ_r / σ_{r+1}``, ``σ_{3r} / σ_r``: what an fp32-accurate top-r costs on these spectra.

It prints each time and the ratio ``PEFT / floor``: the most any implementation that keeps the
floor's steps could gain over PEFT here. Run::

    OMP_NUM_THREADS=1 python bench/studies/peft_init_floor.py [--model smollm2|llama] [--skip-corda] [--krylov]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SAMPLES, SEQ = 16, 64


def model(name: str):
    if name == "smollm2":
        from corda_kernels.integrations.loading import default_model_location, load_model

        return load_model(*default_model_location())[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    size = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8)
    return LlamaForCausalLM(LlamaConfig(vocab_size=2048, max_position_embeddings=256, **size)).eval()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def krylov_width(name: str, W: torch.Tensor) -> None:
    from corda_kernels.linalg import top_svd

    T = W.mT if W.shape[0] < W.shape[1] else W
    k, block = T.shape[1], max(RANK, top_svd.MIN_BLOCK)
    found = None
    for limit in range(3 * block, k + 1, block):  # the smallest width limit that accepts
        top_svd.MAX_BASIS_FRACTION = k / limit
        start = time.perf_counter()
        accepted = top_svd._krylov_basis(T.float(), RANK, block, top_svd.DEFAULT_TOL, 0) is not None
        if accepted:
            found = (limit, time.perf_counter() - start)
            break
    top_svd.MAX_BASIS_FRACTION = 4
    s = torch.linalg.svdvals(W.double())
    start = time.perf_counter()
    top_svd.gram_top_triplets(W.float(), RANK)
    exact = time.perf_counter() - start
    width = f"{found[0]:4d} of {k} columns, {found[1] * 1e3:6.1f} ms" if found else f"none up to {k} columns"
    print(
        f"  {name:<12} {tuple(W.shape)} Krylov accepted at {width}; exact Gram path {exact * 1e3:5.1f} ms; "
        f"s_r/s_r+1 {(s[RANK - 1] / s[RANK]).item():.4f}, s_3r/s_r {(s[3 * RANK - 1] / s[RANK - 1]).item():.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("smollm2", "llama"), default="smollm2")
    parser.add_argument("--skip-corda", action="store_true", help="leave out PEFT's CorDA runs (minutes)")
    parser.add_argument("--krylov", action="store_true", help="only the Krylov widths of three blocks' weights")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    import corda_kernels as ck
    from corda_kernels.linalg._products import times_fp64

    base = model(args.model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(base.config.vocab_size, 2048), (SAMPLES, SEQ), generator=g)
    weights = [m.weight.detach() for n, m in base.named_modules() if n.split(".")[-1] in TARGETS]
    if args.krylov:
        blocks = len(weights) // len(TARGETS)
        for block in sorted({0, blocks // 2, blocks - 1}):
            for name, W in zip(TARGETS, weights[block * len(TARGETS) : (block + 1) * len(TARGETS)]):
                krylov_width(f"{block}.{name}", W)
        return

    def config(init, method=None):
        extra = dict(corda_config=CordaConfig(corda_method=method)) if method else {}
        return LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=init, **extra)

    def run_model(m):
        @torch.no_grad()
        def run():
            for row in ids:
                m(input_ids=row[None])

        return run

    def build(init, method=None, patched=False):
        m = copy.deepcopy(base)

        def go():
            if method:
                preprocess_corda(m, config(init, method), run_model=run_model(m))
            get_peft_model(m, config(init, method))

        if patched:
            with ck.peft_patched():
                return timed(go)
        return timed(go)

    def read():
        for W in weights:
            W @ torch.ones(W.shape[1], RANK)

    def fp64_steps():
        spd = {}
        for W in weights:
            n = W.shape[1]
            if n not in spd:
                X = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
                spd[n] = X @ X.mT / n + torch.eye(n, dtype=torch.float64)
            WC = times_fp64(W.double(), spd[n])
            torch.linalg.qr(WC.mT if WC.shape[0] < WC.shape[1] else WC, mode="r")

    build(True)  # warm-up: imports, first calls
    t = {}
    t["inject"] = build(True)
    t["read"] = timed(read)
    t["pissa PEFT"] = build("pissa")
    t["pissa patched"] = build("pissa", patched=True)
    if not args.skip_corda:
        m = copy.deepcopy(base)
        t["forwards"] = timed(run_model(m))
        del m
        t["fp64 W·C + QR"] = timed(fp64_steps)
        for method in ("ipm", "kpm"):
            t[f"corda {method} PEFT"] = build("corda", method)
            t[f"corda {method} patched"] = build("corda", method, patched=True)

    print(f"{args.model}: {len(weights)} targets, r {RANK}, torch threads {torch.get_num_threads()}")
    for key, value in t.items():
        print(f"  {key:<22} {value:8.3f} s")
    floors = {"pissa": t["inject"] + t["read"]}
    if not args.skip_corda:
        floors["corda ipm"] = t["forwards"] + t["inject"]
        floors["corda kpm"] = t["forwards"] + t["inject"] + t["fp64 W·C + QR"]
    for case, floor in floors.items():
        peft, ours = t[f"{case} PEFT"], t[f"{case} patched"]
        print(
            f"  {case:<10} floor {floor:7.3f} s: PEFT / floor {peft / floor:6.2f}x, PEFT / patched {peft / ours:5.2f}x"
        )


if __name__ == "__main__":
    main()
