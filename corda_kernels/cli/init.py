"""``corda-kernels init``: load a model (default: the embedded SmolLM2-135M), calibrate on text,
decompose, check that the adapted model reproduces the original logits, write the PEFT adapter and
the residual base model, and print a report (time and peak memory per stage, energy per layer,
the output check)."""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections import defaultdict

import torch

from .._measure import measure
from ..adapt import apply
from ..calibration import calibrate
from ..export import adapters, save_peft_adapter, save_residual_model
from ..integrations import loading
from ._common import add_common_arguments, add_quantize_arguments, targets, text_batches

# Output check right after init: the adapted model's max |Δlogits| against the original computed
# one precision up (fp64 for fp32, fp32 for 16-bit) must be at most max(FLOOR, 2 x the original's
# own error in its dtype): the flash-attention rule. The original's fp32 rounding alone is ~1e-4 on
# SmolLM2's logits (|logit| up to ~46), so a fixed 1e-4 would test rounding, not the adapters.
FLOOR = {"fp32": 1e-4, "bf16": 0.25, "fp16": 0.05}
HIGHER = {"fp32": torch.float64, "bf16": torch.float32, "fp16": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    add_quantize_arguments(parser)
    parser.add_argument("--method", default="corda", help="corda, pissa or milora")
    parser.add_argument("--mode", default="ipa", choices=["ipa", "kpa"], help="CorDA mode")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default: rank, scaling 1)")
    parser.add_argument("--normalization", default="token_mean", choices=["token_mean", "peft"])
    parser.add_argument("--no-residual", action="store_true", help="do not save the residual base model")


@torch.no_grad()
def _logits(model, batches, device):
    return [model(**{k: v.to(device) for k, v in b.items()}).logits.double().cpu() for b in batches]


def _max_delta(a, b, batches) -> float:
    """max |a - b| over the non-padding tokens."""
    return max(float((x - y)[m["attention_mask"].bool()].abs().max()) for x, y, m in zip(a, b, batches))


@torch.no_grad()
def _reference_logits(model, batches, device, dtype: str):
    """The original model's logits one precision up (a temporary copy of the model)."""
    higher = copy.deepcopy(model).to(HIGHER[dtype])
    try:
        return _logits(higher, batches, device)
    finally:
        del higher


def _energy_summary(model) -> dict[str, dict]:
    per_kind = defaultdict(list)
    per_layer = {}
    for name, layer in adapters(model).items():
        energy = layer.init_stats.get("energy")
        if energy is not None:
            per_layer[name] = energy
            per_kind[name.rsplit(".", 1)[-1]].append(energy)
    kinds = {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "layers": len(v)} for k, v in per_kind.items()}
    return {"per_layer": per_layer, "per_kind": kinds}


def run(args) -> int:
    stages = []
    with measure("load") as st:
        model, tokenizer = loading.load_model(args.model, args.gguf_file, args.dtype, args.device)
    stages.append(st)
    batches = text_batches(args, tokenizer)
    check_batches = batches[:2]
    before = _logits(model, check_batches, args.device)
    truth = _reference_logits(model, check_batches, args.device, args.dtype)
    floor_error = _max_delta(before, truth, check_batches)
    covariances = None
    if args.method == "corda":
        with measure("calibrate") as st:
            covariances = calibrate(
                model, batches, targets(args.targets), normalization=args.normalization, progress=not args.no_progress
            )
        stages.append(st)
    options = {"mode": args.mode} if args.method == "corda" else {}
    with measure("decompose") as st:
        apply(
            model,
            args.method,
            rank=args.rank,
            alpha=args.alpha,
            covariances=covariances,
            target_modules=None if covariances is not None else targets(args.targets),
            seed=args.seed,
            progress=not args.no_progress,
            quantize=args.quantize,
            quantize_iters=args.quantize_iters,
            **options,
        )
    stages.append(st)
    after = _logits(model, check_batches, args.device)
    delta = _max_delta(after, before, check_batches)
    error = _max_delta(after, truth, check_batches)
    tolerance = max(FLOOR[args.dtype], 2 * floor_error)
    ok = error <= tolerance or args.quantize is not None  # quantizing changes the logits by design: reported only
    with measure("export") as st:
        save_peft_adapter(model, os.path.join(args.out, "adapter"), base_model_name_or_path=args.model)
        if not args.no_residual:
            save_residual_model(model, os.path.join(args.out, "residual_model"))
        if covariances is not None:
            covariances.save(os.path.join(args.out, "covariances"))
    stages.append(st)

    energy = _energy_summary(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    label = f"{args.method}" + (f"-{args.mode}" if args.method == "corda" else "")
    print(
        f"\ncorda-kernels init: {label}, rank {args.rank}, {len(energy['per_layer'])} layers, "
        f"{len(batches)} batches, device {args.device}, {args.dtype}"
    )
    print("\nstage          time        memory")
    for stage in stages:
        print("  " + stage.line())
    print("\nadapter energy (fraction of ||W·C||² or ||W||² held by the adapter), per layer kind:")
    for kind, s in sorted(energy["per_kind"].items()):
        print(f"  {kind:<12} mean {s['mean']:.4f}  min {s['min']:.4f}  max {s['max']:.4f}  ({s['layers']} layers)")
    print(f"\ntrainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    verdict = ("OK" if ok else "FAILED") if args.quantize is None else f"not checked ({args.quantize} residual)"
    tokens = sum(int(b["attention_mask"].sum()) for b in check_batches)
    higher = str(HIGHER[args.dtype]).replace("torch.float", "fp")
    print(
        f"output check on {tokens} tokens: max |Δlogits| adapted vs original {delta:.2e}; against the original in "
        f"{higher}: adapted {error:.2e}, original {args.dtype} itself {floor_error:.2e} -> tolerance "
        f"max({FLOOR[args.dtype]:g}, 2 x {floor_error:.2e}) = {tolerance:.2e}: {verdict}"
    )
    print(
        f"wrote {args.out}/adapter (PEFT LoRA for the residual base)"
        + ("" if args.no_residual else f", {args.out}/residual_model")
        + (", covariances" if covariances else "")
    )
    report = {
        "method": label,
        "rank": args.rank,
        "max_abs_logit_delta": delta,
        "error_vs_higher_precision": error,
        "original_error_vs_higher_precision": floor_error,
        "tolerance": tolerance,
        "check_ok": ok,
        "stages": [vars(s) for s in stages],
        "energy": energy,
        "trainable": trainable,
        "total": total,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return 0 if ok else 1
