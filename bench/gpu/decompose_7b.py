"""All target weights of a LLaMA-2-7B-shaped model decomposed by CorDA, against PEFT's per-layer math.

Issue #3's GPU figure: the 224 targets (32 blocks x q, k, v, o, gate, up, down) of a random-weight
Llama with LLaMA-2-7B's shapes (hidden 4096, intermediate 11008, 32 heads, bf16) and synthetic
input covariances, ``corda_kernels.apply(method="corda")`` timed end to end (decomposition of every
layer, batched by shape, plus forming the residuals and swapping the modules in), for ``ipa`` and
``kpa``. Target: ipa under 60 s on an H100.

Weights: by default each projection gets the singular-value profile SmolLM2-135M's projection of the
same kind measured (``--spectrum smollm2``; see ``llama7b.shape_spectra``): random Gaussian weights have
flat spectra, on which the randomized SVD's per-component check sends every layer to the exact SVD,
which real weights do not need (``--spectrum random`` times exactly that).

Synthetic covariances: one per distinct input of a block (q/k/v share one, gate/up share one, o and
down one each: 128 in all, 20.9 GiB in fp32), each accumulated with ``covariance_update`` from
``2 d`` bf16 Gaussian tokens whose first 8 channels are scaled by 30 (outlier channels, as in real
activations), so each is full rank.

Anchor, in the same run: PEFT 0.21's ``collect_eigens_for_layer`` (damping with an explicit inverse,
full fp32 SVD of ``W·C_d``, ``V = (Vh C_d⁻¹)ᵀ``, U and V moved to the CPU) on the layers of
``--peft-blocks`` blocks, extrapolated to all blocks (every block has the same shapes); it is the
bulk of ``preprocess_corda``'s work after calibration and comes before ``get_peft_model`` forms
its residuals.

Output check: max |Δlogits| on 2 x 64 tokens between the model before and after ``apply``.

Run: ``python bench/gpu/decompose_7b.py`` (GPU: a few minutes, ~45 GiB of GPU memory). On a CPU
it runs a small stand-in (``--blocks 2 --hidden 256 --intermediate 688 --heads 4``) unless sizes are
given. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import torch
from llama7b import add_model_arguments, build_model, parse_model_arguments, write_json

import corda_kernels as ck
from corda_kernels.calibration import Calibration

OUTLIERS, OUTLIER_SCALE = 8, 30.0
BLOCK_INPUTS = {  # group (first layer) -> the layers sharing that input
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


_T0 = time.perf_counter()


def log(message: str) -> None:
    """A phase line on stderr with the seconds since start (a run cut short shows where it was)."""
    print(f"[{time.perf_counter() - _T0:7.1f} s] {message}", file=sys.stderr, flush=True)


def synthetic_calibration(model, device) -> Calibration:
    """One full-rank covariance per distinct block input, accumulated with our covariance op."""
    g = torch.Generator(device=device).manual_seed(1)
    covariances, groups, counts = {}, {}, {}
    for i, block in enumerate(model.model.layers):
        for first, members in BLOCK_INPUTS.items():
            d = block.get_submodule(first).in_features
            tokens = 2 * d
            x = torch.randn(tokens, d, generator=g, device=device, dtype=torch.bfloat16)
            x[:, :OUTLIERS] *= OUTLIER_SCALE
            cov = torch.zeros(d, d, device=device)
            ck.covariance_update(cov, x)
            group = f"model.layers.{i}.{first}"
            covariances[group] = ck.finalize_covariance(cov, tokens, inplace=True)
            counts[group] = tokens
            groups.update({f"model.layers.{i}.{name}": group for name in members})
            del x
    return Calibration(covariances, groups, counts)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(args, calibration, device, mode, ids) -> dict:
    log(f"ours ({mode}): building the model")
    model = build_model(args, device)
    with torch.no_grad():
        before = model(ids).logits.float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    log(f"ours ({mode}): apply(corda) on {sum(1 for _ in calibration.groups)} targets")
    start = time.perf_counter()
    ck.apply(model, "corda", mode=mode, rank=args.rank, covariances=calibration, progress=args.progress)
    _sync(device)
    seconds = time.perf_counter() - start
    log(f"ours ({mode}): {seconds:.2f} s")
    with torch.no_grad():
        delta = float((model(ids).logits.float() - before).abs().max())
    layers = sum(isinstance(m, ck.LowRankLinear) for m in model.modules())
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    del model
    gc.collect()
    return {"seconds": seconds, "delta": delta, "layers": layers, "peak": peak}


def time_peft(args, calibration, device) -> dict:
    """PEFT's per-layer eigens on ``args.peft_blocks`` blocks, extrapolated to all blocks."""
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import collect_eigens_for_layer

    model = build_model(args, device)
    config = LoraConfig(r=args.rank, init_lora_weights="corda", corda_config=CordaConfig())
    names = [n for n in calibration.groups if int(n.split(".")[2]) < args.peft_blocks]
    log(f"PEFT: collect_eigens_for_layer on {len(names)} layers")
    _sync(device)
    start = time.perf_counter()
    for name in names:
        layer = model.get_submodule(name)
        layer.covariance_matrix = calibration.covariance(name)
        layer.eigens = collect_eigens_for_layer(layer, config)
        del layer.eigens, layer.covariance_matrix
    _sync(device)
    seconds = time.perf_counter() - start
    del model
    gc.collect()
    return {"seconds": seconds, "layers": len(names), "extrapolated": seconds * args.blocks / args.peft_blocks}


def warm_up(args, device, ids) -> None:
    """Every code path once on a one-block stand-in (library handles, kernels, lazy imports)."""
    small = argparse.Namespace(
        **{
            **vars(args),
            "blocks": 1,
            "hidden": 128,
            "intermediate": 256,
            "heads": 2,
            "rank": 4,
            "progress": False,
            "peft_blocks": 1,
        }
    )
    calibration = synthetic_calibration(build_model(small, "meta"), device)
    for mode in args.modes:
        time_ours(small, calibration, device, mode, ids)
    if args.peft_blocks:
        time_peft(small, calibration, device)


def run(args) -> list[str]:
    device = torch.device(args.device)
    ids = torch.randint(0, args.vocab, (2, 64), generator=torch.Generator().manual_seed(2)).to(device)
    log("warm-up on a one-block stand-in")
    warm_up(args, device, ids)
    log("synthetic covariances")
    calibration = synthetic_calibration(build_model(args, "meta"), device)
    rows = {mode: time_ours(args, calibration, device, mode, ids) for mode in args.modes}
    peft = time_peft(args, calibration, device) if args.peft_blocks else None
    if args.json:
        write_json(
            args.json,
            args,
            covariances=len(calibration.covariances),
            groups=len(calibration.groups),
            ours=rows,
            peft=peft,
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    gib = calibration.nbytes / 2**30
    lines = [
        f"{name}, torch {torch.__version__}; {args.blocks} blocks, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, {args.dtype}, rank {args.rank}, {args.spectrum} spectra; "
        f"{len(calibration.covariances)} covariances "
        f"({gib:.1f} GiB fp32)\n",
        "| implementation | layers | time (s) | vs PEFT (extrapolated / ours) | max abs Δlogits "
        "| peak GPU memory (GiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, r in rows.items():
        ratio = f"{peft['extrapolated'] / r['seconds']:.2f}x" if peft else "-"
        peak = f"{r['peak'] / 2**30:.1f}" if r["peak"] is not None else "-"
        lines.append(
            f"| ours: apply(corda, {mode}) | {r['layers']} | {r['seconds']:.2f} | {ratio} | {r['delta']:.3g} | {peak} |"
        )
    if peft:
        lines.append(
            f"| PEFT collect_eigens_for_layer, {peft['layers']} layers of {args.peft_blocks} block(s) | "
            f"{peft['layers']} | {peft['seconds']:.2f} (all {args.blocks} blocks: {peft['extrapolated']:.2f}) | "
            "1.00x | - | - |"
        )
    return lines


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--modes", nargs="+", default=["ipa", "kpa"], choices=["ipa", "kpa"])
    p.add_argument("--peft-blocks", type=int, default=1, help="blocks PEFT's anchor runs on (0: skip it)")
    p.add_argument(
        "--spectrum",
        default="smollm2",
        choices=["smollm2", "random"],
        help="weights with SmolLM2's singular-value profile per projection kind (default) or as initialized "
        "(flat spectra: the randomized SVD's check sends every layer to the exact SVD)",
    )
    return parse_model_arguments(p, argv)


if __name__ == "__main__":
    print("\n".join(run(parse())))
