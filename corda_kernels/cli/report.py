"""``corda-kernels report``: the CorDA paper's central evidence, reproduced on any model and data.

For plain SVD, ASVD (the ASVD paper's scaling: input channels times mean |x| ** 0.5 over the
calibration tokens) and CO-SVD (CorDA's damped covariance), discard the smallest r components of
every target weight (the frozen residual of knowledge-preserved initialization with rank r) and
measure the perplexity on held-out text. CO-SVD keeps the model's behaviour far better because it
orders components by how much the *calibration activations* use them (paper Fig. 2 / Table 1).

Each method decomposes every layer once, for the largest r asked: discarding r components needs
the r smallest, a slice of that one decomposition (components ordered by their singular value
``σ_i = scale·‖B[:, i]‖²``, U having orthonormal columns). The perplexity is evaluated once per
(method, r).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .._measure import measure
from ..calibration import calibrate
from ..calibration.mean_abs import MeanAbsInputs
from ..decomposition import decompose
from ..integrations import hf, loading
from ..integrations.evaluation import perplexity
from ..methods import CorDA, MiLoRA
from ..methods.asvd import MeanAbsASVD
from .arguments import add_common_arguments, int_list, positive_int, targets
from .checks import check_extra, read_texts, validate
from .output import output_dir, provenance

METHODS = ("SVD", "ASVD", "CO-SVD")  # the decompositions the report compares (CorDA paper Fig. 2 / Table 1)
# Bounds each decomposition call (Ctrl-C is seen between calls).
CHUNK_BYTES = 256 << 20


def smallest_components(init, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_r, A_r)``: the ``r`` components of ``init`` with the smallest singular values, scale
    folded into ``B_r``, so that discarding them leaves ``W − B_r·A_r``."""
    sigma = init.B.square().sum(0)  # ∝ σ_i: B = U·sqrt(S/scale)
    keep = sigma.argsort()[:r]
    return init.scale * init.B[:, keep], init.A[keep]


def discard_report(
    model: nn.Module,
    calib_batches: Sequence[dict],
    heldout_batches: Sequence[dict],
    discards: Sequence[int],
    *,
    target_modules: hf.TargetSpec = None,
    seed: int = 0,
    progress: bool = True,
    stages: Optional[list] = None,
) -> dict[str, dict[int, float]]:
    """Held-out perplexity ``{method: {r: ppl}}`` for each method and number of discarded
    components (r = 0: the unchanged model). The model is restored to its original weights
    afterwards. ``stages`` collects the time and peak memory of each stage."""
    stages = [] if stages is None else stages
    discards = sorted({0, *discards})
    largest = max(discards)
    found = hf.find_targets(model, target_modules)
    with measure("calibrate") as st, MeanAbsInputs(model, found) as recorder:
        covariances = calibrate(model, calib_batches, target_modules, progress=progress)
    magnitudes = recorder.result(calib_batches)
    stages.append(st)
    _print_stage(st)
    originals = {n: hf.weight_matrix(m).detach().clone() for n, m in found.items()}
    with measure("evaluate r=0") as st:
        base = perplexity(model, heldout_batches)
    results = {name: {0: base} for name in METHODS}
    stages.append(st)
    _print_stage(st)
    if largest == 0:
        return results
    makers = {"SVD": MiLoRA, "ASVD": lambda: MeanAbsASVD(magnitudes), "CO-SVD": lambda: CorDA(mode="kpa")}
    for method_name in METHODS:
        ranks = {n: min(largest, min(w.shape)) for n, w in originals.items()}
        with measure(f"decompose {method_name}") as st:
            inits = decompose(
                found,
                makers[method_name](),
                ranks=ranks,
                alphas=ranks,
                covariances=covariances,
                seed=seed,
                max_batch_bytes=CHUNK_BYTES,
                progress=progress,
            )
        stages.append(st)
        _print_stage(st)
        rs = [r for r in discards if r > 0]
        with measure(f"evaluate {method_name}") as st:
            for r in tqdm(rs, desc=f"perplexity {method_name}", disable=not progress):
                try:
                    with torch.no_grad():
                        for name, init in inits.items():
                            B, A = smallest_components(init, min(r, ranks[name]))
                            residual = originals[name].double() - B.double() @ A.double()
                            hf.weight_matrix(found[name]).copy_(residual.to(originals[name].dtype))
                    results[method_name][r] = perplexity(model, heldout_batches)
                finally:
                    with torch.no_grad():
                        for name, weight in originals.items():
                            hf.weight_matrix(found[name]).copy_(weight)
        stages.append(st)
        _print_stage(st)
        del inits
    return results


def _print_stage(stage) -> None:
    print("  " + stage.line(), flush=True)


def table(results: dict[str, dict[int, float]]) -> str:
    """The markdown table: one row per r, one column per method."""
    ranks = sorted({r for values in results.values() for r in values})
    lines = ["| discarded r | " + " | ".join(results) + " |", "| --- |" + " --- |" * len(results)]
    for r in ranks:
        lines.append(f"| {r} | " + " | ".join(f"{results[m].get(r, math.nan):.3f}" for m in results) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r for values in results.values() for r in values})
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, values in results.items():
        ax.plot(ranks, [values.get(r, float("nan")) for r in ranks], marker="o", label=name)
    ax.set_xlabel("smallest components discarded (r)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, out_default="corda-report")
    parser.add_argument(
        "--discard", type=int_list, default="0,16,64,128", help="comma-separated numbers of smallest components"
    )
    parser.add_argument("--eval", default="heldout", help="held-out text: 'heldout' (built-in) or a file")
    parser.add_argument("--eval-samples", type=positive_int, default=16, help="held-out texts to use")
    parser.set_defaults(samples=32)  # 32 + 16 texts: the default report fits 5 minutes on 2 idle cores
    parser.add_argument("--no-plot", action="store_true", help="skip discard_report.png (no matplotlib needed)")


def run(args) -> int:
    if not args.no_plot:
        check_extra("matplotlib", "report", "the plot discard_report.png (or pass --no-plot)")
    texts = validate(args)
    held_texts = read_texts(args.eval, "--eval", args.eval_samples)
    info = provenance(args, args.model, args.gguf_file)
    with output_dir(args.out, args.overwrite) as tmp:
        stages = []
        print("corda-kernels report: stages (time, peak memory)", flush=True)
        with measure("load") as st:
            model, tokenizer = loading.load_model(args.model, args.gguf_file, args.dtype, args.device)
        stages.append(st)
        _print_stage(st)
        calib = loading.token_batches(tokenizer, texts, args.seq_len, args.batch_size)
        held = loading.token_batches(tokenizer, held_texts, args.seq_len, args.batch_size)
        results = discard_report(
            model,
            calib,
            held,
            args.discard,
            target_modules=targets(args.targets),
            seed=args.seed,
            progress=not args.no_progress,
            stages=stages,
        )
        n_layers = len(hf.find_targets(model, targets(args.targets)))
        text = table(results)
        total = sum(s.seconds for s in stages)
        print(
            f"\nHeld-out perplexity after discarding the smallest r components ({n_layers} layers, "
            f"{len(texts)} calibration / {len(held_texts)} held-out texts, {args.seq_len} tokens), {total:.0f} s:\n"
        )
        print(text, flush=True)
        with open(os.path.join(tmp, "discard_report.md"), "w") as fh:
            fh.write(
                f"Held-out perplexity after discarding the smallest r components ({n_layers} layers, "
                f"{len(texts)} calibration / {len(held_texts)} held-out texts)\n\n{text}\n"
            )
        report = {
            "perplexity": {m: {str(r): v for r, v in values.items()} for m, values in results.items()},
            "layers": n_layers,
            "stages": [vars(s) for s in stages],
            "provenance": info,
        }
        with open(os.path.join(tmp, "report.json"), "w") as fh:
            json.dump(report, fh, indent=1)
        if not args.no_plot:
            plot(results, os.path.join(tmp, "discard_report.png"))
    print(f"wrote {args.out}/discard_report.md" + ("" if args.no_plot else ", discard_report.png") + ", report.json")
    return 0
