"""The ``corda-kernels`` command.

``corda-kernels init``: load a model (default: the embedded SmolLM2-135M), calibrate on text,
decompose, check that the adapted model reproduces the original logits, write the PEFT adapter and
the residual base model, and print a report (time and peak memory per stage, energy per layer,
the output check).

``corda-kernels report``: the CorDA paper's central evidence on your model and data: held-out
perplexity after discarding the smallest r components with plain SVD, ASVD and CO-SVD (table
and PNG plot).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

import torch

from ._measure import measure
from .integrations import loading

# Output check right after init: the adapted model's max |Δlogits| against the original computed
# one precision up (fp64 for fp32, fp32 for 16-bit) must be at most max(FLOOR, 2 x the original's
# own error in its dtype): the flash-attention rule. The original's fp32 rounding alone is ~1e-4 on
# SmolLM2's logits (|logit| up to ~46), so a fixed 1e-4 would test rounding, not the adapters.
FLOOR = {"fp32": 1e-4, "bf16": 0.25, "fp16": 0.05}
HIGHER = {"fp32": torch.float64, "bf16": torch.float32, "fp16": torch.float32}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local path (default: embedded SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--gguf-file", help="GGUF file inside --model to load")
    parser.add_argument("--calib", default="builtin", help="'builtin', or a .jsonl ({'text': ...}) / text file")
    parser.add_argument("--samples", type=int, default=64, help="calibration texts to use")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration text (truncation)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(loading.DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--targets", help="comma-separated layer names (suffix match) or a regex")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="corda-out", help="output directory")
    parser.add_argument("--no-progress", action="store_true")


def _targets(spec):
    if spec is None:
        return None
    return spec.split(",") if "," in spec or spec.isidentifier() else spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corda-kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="calibrate, decompose, check and export adapters")
    _common(init)
    init.add_argument("--method", default="corda", help="corda, pissa or milora")
    init.add_argument("--mode", default="ipa", choices=["ipa", "kpa"], help="CorDA mode")
    init.add_argument("--rank", type=int, default=8)
    init.add_argument("--alpha", type=float, help="LoRA alpha (default: rank, scaling 1)")
    init.add_argument("--normalization", default="token_mean", choices=["token_mean", "peft"])
    init.add_argument("--no-residual", action="store_true", help="do not save the residual base model")
    report = sub.add_parser("report", help="perplexity after discarding the smallest r components (SVD/ASVD/CO-SVD)")
    _common(report)
    report.add_argument("--discard", default="0,16,64,128", help="comma-separated numbers of smallest components")
    report.add_argument("--eval", default="heldout", help="held-out text: 'heldout' (built-in) or a file")
    report.add_argument("--eval-samples", type=int, default=32)
    estimate = sub.add_parser("estimate", help="peak memory of an init run, estimated beforehand (reads no weights)")
    _common(estimate)
    estimate.add_argument("--method", default="corda", help="corda, pissa or milora")
    estimate.add_argument("--mode", default="ipa", choices=["ipa", "kpa"], help="CorDA mode")
    estimate.add_argument("--rank", type=int, default=8)
    estimate.add_argument("--blockwise", action="store_true", help="block-wise calibration (apply_blockwise)")
    estimate.add_argument("--offload", choices=["cpu"], help="block-wise: hidden-state cache; else: covariances")
    estimate.add_argument("--storage", default="full", choices=["full", "packed"], help="finalized covariances")
    return parser


def _batches(args, tokenizer, spec=None, samples=None):
    texts = loading.load_texts(spec or args.calib)[: samples or args.samples]
    return loading.token_batches(tokenizer, texts, args.seq_len, args.batch_size)


@torch.no_grad()
def _logits(model, batches, device):
    return [model(**{k: v.to(device) for k, v in b.items()}).logits.double().cpu() for b in batches]


def _max_delta(a, b, batches) -> float:
    """max |a - b| over the non-padding tokens."""
    return max(float((x - y)[m["attention_mask"].bool()].abs().max()) for x, y, m in zip(a, b, batches))


@torch.no_grad()
def _reference_logits(model, batches, device, dtype: str):
    """The original model's logits one precision up (a temporary copy of the model)."""
    import copy

    higher = copy.deepcopy(model).to(HIGHER[dtype])
    try:
        return _logits(higher, batches, device)
    finally:
        del higher


def _energy_summary(model) -> dict[str, dict]:
    from .export import adapters

    per_kind = defaultdict(list)
    per_layer = {}
    for name, layer in adapters(model).items():
        energy = layer.init_stats.get("energy")
        if energy is not None:
            per_layer[name] = energy
            per_kind[name.rsplit(".", 1)[-1]].append(energy)
    kinds = {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "layers": len(v)} for k, v in per_kind.items()}
    return {"per_layer": per_layer, "per_kind": kinds}


def cmd_init(args) -> int:
    from . import apply, calibrate
    from .export import save_peft_adapter, save_residual_model

    stages = []
    with measure("load") as st:
        model, tokenizer = loading.load_model(args.model, args.gguf_file, args.dtype, args.device)
    stages.append(st)
    batches = _batches(args, tokenizer)
    check_batches = batches[:2]
    before = _logits(model, check_batches, args.device)
    truth = _reference_logits(model, check_batches, args.device, args.dtype)
    floor_error = _max_delta(before, truth, check_batches)
    covariances = None
    if args.method == "corda":
        with measure("calibrate") as st:
            covariances = calibrate(model, batches, _targets(args.targets), normalization=args.normalization,
                                    progress=not args.no_progress)
        stages.append(st)
    options = {"mode": args.mode} if args.method == "corda" else {}
    with measure("decompose") as st:
        apply(model, args.method, rank=args.rank, alpha=args.alpha, covariances=covariances,
              target_modules=None if covariances is not None else _targets(args.targets), seed=args.seed,
              progress=not args.no_progress, **options)
    stages.append(st)
    after = _logits(model, check_batches, args.device)
    delta = _max_delta(after, before, check_batches)
    error = _max_delta(after, truth, check_batches)
    tolerance = max(FLOOR[args.dtype], 2 * floor_error)
    ok = error <= tolerance
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
    print(f"\ncorda-kernels init: {label}, rank {args.rank}, {len(energy['per_layer'])} layers, "
          f"{len(batches)} batches, device {args.device}, {args.dtype}")
    print("\nstage          time        memory")
    for stage in stages:
        print("  " + stage.line())
    print("\nadapter energy (fraction of ||W·C||² or ||W||² held by the adapter), per layer kind:")
    for kind, s in sorted(energy["per_kind"].items()):
        print(f"  {kind:<12} mean {s['mean']:.4f}  min {s['min']:.4f}  max {s['max']:.4f}  ({s['layers']} layers)")
    print(f"\ntrainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    verdict = "OK" if ok else "FAILED"
    tokens = sum(int(b["attention_mask"].sum()) for b in check_batches)
    higher = str(HIGHER[args.dtype]).replace("torch.float", "fp")
    print(f"output check on {tokens} tokens: max |Δlogits| adapted vs original {delta:.2e}; against the original in "
          f"{higher}: adapted {error:.2e}, original {args.dtype} itself {floor_error:.2e} -> tolerance "
          f"max({FLOOR[args.dtype]:g}, 2 x {floor_error:.2e}) = {tolerance:.2e}: {verdict}")
    print(f"wrote {args.out}/adapter (PEFT LoRA for the residual base)"
          + ("" if args.no_residual else f", {args.out}/residual_model") + (", covariances" if covariances else ""))
    report = {"method": label, "rank": args.rank, "max_abs_logit_delta": delta, "error_vs_higher_precision": error,
              "original_error_vs_higher_precision": floor_error, "tolerance": tolerance, "check_ok": ok,
              "stages": [vars(s) for s in stages], "energy": energy, "trainable": trainable, "total": total}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    return 0 if ok else 1


def cmd_report(args) -> int:
    from .report import discard_report

    model, tokenizer = loading.load_model(args.model, args.gguf_file, args.dtype, args.device)
    calib = _batches(args, tokenizer)
    held = _batches(args, tokenizer, args.eval, args.eval_samples)
    discards = [int(r) for r in args.discard.split(",")]
    table = discard_report(model, calib, held, discards, target_modules=_targets(args.targets), seed=args.seed,
                           out_dir=args.out, progress=not args.no_progress)
    print(table)
    return 0


def cmd_estimate(args) -> int:
    from .memory import estimate_memory, meta_model

    model = meta_model(args.model, args.gguf_file, args.dtype)
    texts = loading.load_texts(args.calib)[: args.samples]
    batch_size = min(args.batch_size, len(texts))
    options = {"mode": args.mode} if args.method == "corda" else {}
    n_batches = -(-len(texts) // batch_size)
    estimate = estimate_memory(model, batch_size=batch_size, seq_len=args.seq_len, n_batches=n_batches,
                               method=args.method, rank=args.rank, blockwise=args.blockwise, offload=args.offload,
                               storage=args.storage, target_modules=_targets(args.targets), device=args.device,
                               **options)  # fmt: skip
    print(estimate.summary())
    print(f"(sequences counted at --seq-len {args.seq_len} tokens: an upper bound when the texts are shorter)")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"init": cmd_init, "report": cmd_report, "estimate": cmd_estimate}[args.command](args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"corda-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
