"""``corda-kernels report``: the CorDA paper's central evidence, reproduced on any model and data.

For plain SVD, ASVD and CO-SVD, discard the smallest r components of every target weight (the
frozen residual of knowledge-preserved initialization with rank r) and measure the perplexity on
held-out text. CO-SVD keeps the model's behaviour far better because it orders components by how
much the *calibration activations* use them (paper Fig. 2 / Table 1).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import calibrate
from ..decomposition import decompose
from ..integrations import hf, loading
from ..integrations.evaluation import perplexity
from ..methods import CorDA, MiLoRA
from ..methods.asvd import ASVD
from ._common import add_common_arguments, targets, text_batches

# The three decompositions the report compares (CorDA paper Fig. 2 / Table 1).
DECOMPOSITIONS = {"SVD": lambda: MiLoRA(), "ASVD": lambda: ASVD(mode="kpa"), "CO-SVD": lambda: CorDA(mode="kpa")}


def discard_report(
    model: nn.Module,
    calib_batches: Sequence[dict],
    heldout_batches: Sequence[dict],
    discards: Sequence[int],
    *,
    target_modules: hf.TargetSpec = None,
    seed: int = 0,
    out_dir: Optional[str] = None,
    progress: bool = True,
) -> str:
    """Perplexity table (markdown) for each method and number of discarded components.

    Writes ``discard_report.md`` and ``discard_report.png`` into ``out_dir`` when given. The model
    is restored to its original weights afterwards.
    """
    covariances = calibrate(model, calib_batches, target_modules, progress=progress)
    targets = hf.find_targets(model, list(covariances.groups))
    originals = {n: hf.weight_matrix(m).detach().clone() for n, m in targets.items()}
    base = perplexity(model, heldout_batches)
    results = {name: {0: base} for name in DECOMPOSITIONS}
    runs = [(m, r) for m in DECOMPOSITIONS for r in discards if r > 0]
    for method_name, r in tqdm(runs, desc="discard report", disable=not progress):
        ranks = {n: min(r, min(originals[n].shape)) for n in targets}
        inits = decompose(
            targets,
            DECOMPOSITIONS[method_name](),
            ranks=ranks,
            alphas=ranks,
            covariances=covariances,
            seed=seed,
            progress=False,
        )
        try:
            with torch.no_grad():
                for name, init in inits.items():
                    residual = originals[name].float() - init.scale * (init.B @ init.A)
                    hf.weight_matrix(targets[name]).copy_(residual.to(originals[name].dtype))
            results[method_name][r] = perplexity(model, heldout_batches)
        finally:  # every run decomposes the original weights
            with torch.no_grad():
                for name, weight in originals.items():
                    hf.weight_matrix(targets[name]).copy_(weight)
    ranks_sorted = sorted({0, *discards})
    lines = ["| discarded r | " + " | ".join(DECOMPOSITIONS) + " |", "| --- |" + " --- |" * len(DECOMPOSITIONS)]
    for r in ranks_sorted:
        lines.append(f"| {r} | " + " | ".join(f"{results[m].get(r, float('nan')):.3f}" for m in DECOMPOSITIONS) + " |")
    table = "\n".join(lines)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "discard_report.md"), "w") as fh:
            fh.write(
                f"Held-out perplexity after discarding the smallest r components ({len(targets)} layers)\n\n{table}\n"
            )
        _plot(results, ranks_sorted, os.path.join(out_dir, "discard_report.png"))
    return table


def _plot(results: dict, ranks: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    add_common_arguments(parser)
    parser.add_argument("--discard", default="0,16,64,128", help="comma-separated numbers of smallest components")
    parser.add_argument("--eval", default="heldout", help="held-out text: 'heldout' (built-in) or a file")
    parser.add_argument("--eval-samples", type=int, default=32)


def run(args) -> int:
    model, tokenizer = loading.load_model(args.model, args.gguf_file, args.dtype, args.device)
    calib = text_batches(args, tokenizer)
    held = text_batches(args, tokenizer, args.eval, args.eval_samples)
    discards = [int(r) for r in args.discard.split(",")]
    table = discard_report(
        model,
        calib,
        held,
        discards,
        target_modules=targets(args.targets),
        seed=args.seed,
        out_dir=args.out,
        progress=not args.no_progress,
    )
    print(table)
    return 0
