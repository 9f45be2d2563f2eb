"""Quantized residual at init on SmolLM2-135M: is NF4(W_res) + full-precision adapters closer to the
original model than NF4(W) (QLoRA's starting point)?

For the embedded SmolLM2-135M-Instruct (fp32, every q/k/v/o/gate/up/down projection of its 30
blocks adapted) it prints a markdown table of held-out perplexity (the built-in ``heldout`` texts;
calibration on the built-in ``builtin`` texts) for: the original; NF4(W) (LoRA init, B = 0, so the
adapter adds nothing); NF4(W_res) + adapters for PiSSA, CorDA-IPA and CorDA-KPA at each rank, with
``quantize_iters`` 0 and ``--iters``; and the relative covariance-weighted quantization error
``‖(W − Q − s·B·A)·C‖_F / ‖W·C‖_F`` (C the raw input covariance) averaged per layer kind; and the
weight bytes of the quantized model against the full one.

Run: ``python bench/studies/quantized_residual.py [--ranks 32,8,128] [--iters 1] [--iters-ranks 32] [--json out.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import time

import torch

import corda_kernels as ck
from corda_kernels.integrations import evaluation, loading
from corda_kernels.ops.quantized import QuantizedWeight

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def weight_bytes(model) -> int:
    """Bytes of parameters and weight buffers (a tied embedding / head counted once)."""
    seen, total = set(), 0
    for module in model.modules():
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t is None or t.data_ptr() in seen:
                continue
            if t.is_floating_point() or isinstance(module, QuantizedWeight):
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def weighted_errors(model, originals, cal) -> dict:
    """Per layer kind: mean of ‖(W − W'·deq − s·B·A)·C‖ / ‖W·C‖ over the layers of that kind."""
    per_kind: dict = {k: [] for k in KINDS}
    for name, layer in model.named_modules():
        if not isinstance(layer, ck.LowRankLinear):
            continue
        W, C, WC = originals[name]
        base = layer.weight.float()  # dequantized (fp32 base: exact)
        E = W - base - layer.delta_weight()
        per_kind[name.rsplit(".", 1)[1]].append(float((E @ C).norm() / WC))
    return {k: sum(v) / len(v) for k, v in per_kind.items() if v}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="8,32,128")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--iters-ranks", help="ranks refined with --iters (default: all)")
    parser.add_argument("--eval-samples", type=int, default=40, help="held-out texts (40 built in)")
    parser.add_argument("--fmt", default="nf4", choices=["nf4", "int8"])
    parser.add_argument("--methods", default="pissa,corda-ipa,corda-kpa")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--cache-dir", default="/tmp/quantized_residual_cache")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    t_start = time.time()
    print(f"start: {uptime()}", flush=True)
    model, tok = loading.load_model(None, None)
    calib = loading.token_batches(tok, loading.load_texts("builtin")[: args.samples], args.seq_len, 8)
    heldout = loading.token_batches(tok, loading.load_texts("heldout")[: args.eval_samples], args.seq_len, 8)
    targets = list(KINDS)
    cal = ck.calibrate(model, calib, target_modules=targets, progress=False)
    originals = {}
    for n, m in model.named_modules():
        if n.endswith(KINDS):
            C = cal.covariance(n, "cpu").float()
            W = m.weight.detach().float().clone()
            originals[n] = (W, C, float((W @ C).norm()))
    rows = []

    def run(label, method, rank, iters, **kw):
        t0 = time.time()
        m = copy.deepcopy(model)
        ck.apply(
            m,
            method,
            rank=rank,
            target_modules=targets,
            quantize=args.fmt,
            quantize_iters=iters,
            progress=False,
            cache_dir=args.cache_dir,
            **kw,
        )
        ppl = evaluation.perplexity(m, heldout)
        err = weighted_errors(m, originals, cal)
        rows.append(
            dict(
                config=label, rank=rank, iters=iters, ppl=ppl, bytes=weight_bytes(m), err=err, seconds=time.time() - t0
            )
        )
        print(json.dumps(rows[-1]), flush=True)
        del m

    full_ppl = evaluation.perplexity(model, heldout)
    rows.append(dict(config="original (fp32)", rank=0, iters=0, ppl=full_ppl, bytes=weight_bytes(model), err={}))
    print(json.dumps(rows[-1]), flush=True)
    run(f"{args.fmt.upper()}(W) (QLoRA init)", "lora", 8, 0)
    refine = {int(r) for r in (args.iters_ranks or args.ranks).split(",")}
    for rank in [int(r) for r in args.ranks.split(",")]:
        for spec in args.methods.split(","):
            method, _, mode = spec.partition("-")
            kw = {"covariances": cal, "mode": mode} if method == "corda" else {}
            for iters in sorted({0, args.iters if rank in refine else 0}):
                run(f"{args.fmt.upper()}(W_res) + {spec}", method, rank, iters, **kw)
    print(f"end: {uptime()} ({time.time() - t_start:.0f} s)", flush=True)

    print("\n| config | r | quantize_iters | held-out ppl | weight MB | " + " | ".join(KINDS) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in KINDS) + " |")
    for row in rows:
        errs = " | ".join(f"{row['err'][k]:.4f}" if k in row["err"] else "-" for k in KINDS)
        r = row["rank"] or "-"
        print(f"| {row['config']} | {r} | {row['iters']} | {row['ppl']:.3f} | {row['bytes'] / 2**20:.1f} | {errs} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "uptime": uptime()}, fh, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
