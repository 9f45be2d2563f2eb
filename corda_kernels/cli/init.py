"""``corda-kernels init``: load a model (default: the embedded SmolLM2-135M), calibrate on text,
decompose, check that the adapted model reproduces the original logits, write the PEFT adapter and
the residual base model (with its tokenizer), and print a report (time and peak memory per stage,
energy per layer, the output check). Output is written atomically into --out.

Output check: the adapted model's logits against the original's computed one precision up (fp64
for fp32, fp32 for 16-bit). The adapted model repeats the original's arithmetic (its own error,
``e0``, measured on the same tokens), adds the rounding of the stored residual ``W' = fl(W - s·B·A)``
(one rounding per weight, the same order as ``e0``) and the low-rank path's arithmetic and sum
(again of order ``e0``): tolerance ``3·e0 + 8·u·L`` with ``u`` the dtype's unit roundoff and ``L``
the largest |logit|, the last term a few roundings at the logit scale so that the bound does not
collapse when few tokens are checked. Wrong factors (a wrong component, scale or sign) move the
logits by orders of magnitude more.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections import defaultdict

import torch

from .._measure import measure, release_free_memory
from ..adapt import apply
from ..calibration import calibrate
from ..export import adapters, save_peft_adapter, save_residual_model
from ..integrations import hf, loading
from ..memory import input_groups, quantized_bytes
from .arguments import add_common_arguments, add_method_arguments, add_quantize_arguments, positive_float, targets
from .checks import adapt_config, check_room, method_options, validate
from .output import output_dir, provenance

HIGHER = {"fp32": torch.float64, "bf16": torch.float32, "fp16": torch.float32}
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}


def check_tolerance(original_error: float, logit_scale: float, dtype: str) -> float:
    """The output check's bound on max |adapted - reference| (module docstring)."""
    return 3 * original_error + 8 * UNIT_ROUNDOFF[dtype] * logit_scale


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    add_method_arguments(parser)
    parser.add_argument("--alpha", type=positive_float, help="LoRA alpha (default: rank, scaling 1)")
    parser.add_argument(
        "--normalization", default="token_mean", choices=["token_mean", "peft"], help="covariance normalization"
    )
    add_quantize_arguments(parser)
    parser.add_argument("--no-residual", action="store_true", help="do not save the residual base model")
    parser.add_argument(
        "--autocast-adapter-dtype",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on a bf16/fp16 model keep the trainable factors in fp32 (default; --no-... keeps the model dtype)",
    )


@torch.no_grad()
def _final_hidden(model, batches, device):
    """What the output head reads, per batch (the final hidden states, on the CPU). The check keeps
    these instead of the logits and applies the head when comparing, one text at a time: on SmolLM2
    (hidden 576, vocabulary 49,152) the logits of the check batches held through calibrate and
    decompose were 85x larger (2.8 GB in fp64 at the default options)."""
    body = model.base_model
    return [
        body(**hf.without_cache(model, {k: v.to(device) for k, v in b.items()})).last_hidden_state.cpu()
        for b in batches
    ]


def _max_delta(a, b, batches, head: torch.nn.Module) -> float:
    """max |logits(a) - logits(b)| over the non-padding tokens (``b=None``: max |logits(a)|); logits =
    the head applied in the hidden states' dtype (as the model computes them), compared in fp64."""
    weight, bias = head.weight, getattr(head, "bias", None)

    def logits(h):
        h = h.to(weight.device)
        return torch.nn.functional.linear(h, weight.to(h.dtype), None if bias is None else bias.to(h.dtype)).double()

    worst = 0.0
    with torch.no_grad():
        for x, y, m in zip(a, [None] * len(a) if b is None else b, batches):
            for row, keep in enumerate(m["attention_mask"].bool()):
                other = 0.0 if y is None else logits(y[row][keep])
                worst = max(worst, float((logits(x[row][keep]) - other).abs().max()))
    return worst


@torch.no_grad()
def _reference_hidden(model, batches, device, dtype: str):
    """The original model's final hidden states one precision up (a temporary copy of the model)."""
    higher = copy.deepcopy(model).to(HIGHER[dtype])
    try:
        return _final_hidden(higher, batches, device)
    finally:
        del higher


def output_check(model, before, truth, batches, device, dtype: str, head: torch.nn.Module) -> dict:
    """The adapted ``model``'s logits on ``batches`` against the original's (``before``, in
    ``dtype``) and the reference one precision up (``truth``); all given as final hidden states."""
    after = _final_hidden(model, batches, device)
    original_error = _max_delta(before, truth, batches, head)
    logit_scale = _max_delta(truth, None, batches, head)
    error = _max_delta(after, truth, batches, head)
    tolerance = check_tolerance(original_error, logit_scale, dtype)
    return {
        "max_abs_logit_delta": _max_delta(after, before, batches, head),
        "error_vs_higher_precision": error,
        "original_error_vs_higher_precision": original_error,
        "logit_scale": logit_scale,
        "tolerance": tolerance,
        "check_ok": error <= tolerance,
    }


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


def _safetensors_bytes(tensors: dict[str, tuple[int, int]]) -> int:
    """A safetensors file of ``name -> (elements, bytes per element)``: the data and its JSON header."""
    return sum(n * size for n, size in tensors.values()) + sum(len(k) + 96 for k in tensors) + 64


def _tokenizer_bytes(tokenizer) -> int:
    """What ``tokenizer.save_pretrained`` writes, about: twice its ``tokenizer.json`` (fast tokenizers;
    room for vocabulary files beside it) or 64 bytes per token, plus its small JSON files."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return 2 * len(backend.to_str().encode()) + (16 << 10)
    try:
        return 64 * len(tokenizer) + (16 << 10)
    except TypeError:
        return 16 << 10


def output_bytes(model, args, tokenizer=None) -> int:
    """About what ``init`` writes into ``--out`` (a little above it; :func:`.checks.room_needed` adds
    the margin): the PEFT adapter (fp32 dense factors, DoRA magnitudes), the residual model unless ``--no-residual``
    (every tensor of the state dict; quantized targets as their codes and statistics), the tokenizer
    beside it, the covariances (one fp32 ``(d, d)`` per distinct input, found by calibration's 2-token
    probe) and the report (per-layer energies)."""
    found = hf.find_targets(model, targets(args.targets))
    shapes = {n: hf.in_out_features(m) for n, m in found.items()}
    names = "".join(found)
    factors = {
        f"base_model.model.{n}.lora_{k}.weight": (args.rank * (i if k == "A" else o), 4)
        for n, (i, o) in shapes.items()
        for k in "AB"
    }
    if getattr(args, "dora", False):
        factors.update({f"base_model.model.{n}.lora_magnitude_vector.weight": (o, 4) for n, (i, o) in shapes.items()})
    total = _safetensors_bytes(factors) + 2 * len(names) + (4 << 10)  # adapter_config.json (names), corda_kernels.json
    if not args.no_residual:
        state = {k: (t.numel(), t.element_size()) for k, t in model.state_dict().items()}
        if args.quantize is not None:
            for name, (i, o) in shapes.items():
                state[f"{name}.weight"] = (quantized_bytes(o, i, args.quantize) + (2 << 10), 1)  # + bitsandbytes' state
        total += _safetensors_bytes(state) + len(names) + (8 << 10)  # config (skip list), generation config
        total += _tokenizer_bytes(tokenizer)
    if args.method == "corda":
        groups = input_groups(model, found) or {n: n for n in found}
        dims = {g: shapes[n][0] for n, g in groups.items()}
        total += _safetensors_bytes({g: (d * d, 4) for g, d in dims.items()}) + 2 * len(names) + (4 << 10)
    return total + 96 * len(found) + (8 << 10)  # report.json: energies per layer, provenance


def run(args) -> int:
    texts = validate(args)
    model_source = provenance(args, args.model, args.gguf_file)
    with output_dir(args.out, args.overwrite) as tmp:
        return _run(args, texts, tmp, model_source)


def _run(args, texts, tmp, model_source) -> int:
    stages = []
    with measure("load") as st:
        model, tokenizer = loading.load_model(args.model, args.gguf_file, args.dtype, args.device)
    stages.append(st)
    check_room(tmp, output_bytes(model, args, tokenizer), "output (residual model, adapter, covariances)")
    batches = loading.token_batches(tokenizer, texts, args.seq_len, args.batch_size)
    options = method_options(args, tokenizer)
    check_batches = batches[:2]
    head = model.get_output_embeddings()  # not a target: the same before and after
    before = _final_hidden(model, check_batches, args.device)
    truth = _reference_hidden(model, check_batches, args.device, args.dtype)
    release_free_memory()  # the fp64 copy's pages, kept by the allocator, would count in every stage below
    covariances = None
    if args.method == "corda":
        with measure("calibrate") as st:
            covariances = calibrate(
                model, batches, targets(args.targets), normalization=args.normalization, progress=not args.no_progress
            )
        stages.append(st)
    config = adapt_config(args, options)
    with measure("decompose") as st:
        apply(model, config, covariances=covariances, progress=not args.no_progress)
    stages.append(st)
    check = output_check(model, before, truth, check_batches, args.device, args.dtype, head)
    if args.quantize is not None:  # quantizing changes the logits by design: reported, not enforced
        check["check_ok"], check["enforced"] = True, False
    with measure("export") as st:
        # The adapter applies to the residual base written beside it (its weights differ from the original's).
        residual = None if args.no_residual else os.path.abspath(os.path.join(args.out, "residual_model"))
        save_peft_adapter(model, os.path.join(tmp, "adapter"), residual_model=residual)
        if not args.no_residual:
            save_residual_model(model, os.path.join(tmp, "residual_model"))
            tokenizer.save_pretrained(os.path.join(tmp, "residual_model"))
        if covariances is not None:
            covariances.save(os.path.join(tmp, "covariances"))
    stages.append(st)

    energy = _energy_summary(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    label = f"{args.method}" + (f"-{args.mode}" if args.method == "corda" else "")
    print(
        f"\ncorda-kernels init: {label}, rank {args.rank}, {len(energy['per_layer']) or len(adapters(model))} layers, "
        f"{len(batches)} batches, device {args.device}, {args.dtype}"
    )
    print(f"\n  {'stage':<17} {'time':>10}   memory")
    for stage in stages:
        print("  " + stage.line())
    if energy["per_kind"]:
        print("\nadapter energy (fraction of ||W·C||² or ||W||² held by the adapter), per layer kind:")
    for kind, s in sorted(energy["per_kind"].items()):
        print(f"  {kind:<12} mean {s['mean']:.4f}  min {s['min']:.4f}  max {s['max']:.4f}  ({s['layers']} layers)")
    print(f"\ntrainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    verdict = (
        ("OK" if check["check_ok"] else "FAILED")
        if args.quantize is None
        else f"not checked ({args.quantize} residual)"
    )
    tokens = sum(int(b["attention_mask"].sum()) for b in check_batches)
    higher = str(HIGHER[args.dtype]).replace("torch.float", "fp")
    print(
        f"output check on {tokens} tokens: max |Δlogits| adapted vs original {check['max_abs_logit_delta']:.2e}; "
        f"against the original in {higher}: adapted {check['error_vs_higher_precision']:.2e}, original "
        f"{args.dtype} itself e0 = {check['original_error_vs_higher_precision']:.2e}, max |logit| L = "
        f"{check['logit_scale']:.1f} -> tolerance 3·e0 + 8·u·L = {check['tolerance']:.2e}: " + verdict
    )
    report = {
        "method": label,
        "rank": args.rank,
        **check,
        "stages": [vars(s) for s in stages],
        "energy": energy,
        "trainable": trainable,
        "total": total,
        "provenance": model_source,
        "config": config.to_dict(),
    }
    with open(os.path.join(tmp, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    print(
        f"wrote {args.out}/adapter (PEFT LoRA for the residual base)"
        + ("" if args.no_residual else f", {args.out}/residual_model (with the tokenizer)")
        + (", covariances" if covariances else "")
        + ", report.json"
    )
    return 0 if check["check_ok"] else 1
