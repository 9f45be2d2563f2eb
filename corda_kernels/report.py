"""The CorDA paper's central evidence, reproduced on any model and data.

For plain SVD, ASVD and CO-SVD, discard the smallest r components of every target weight (the
frozen residual of knowledge-preserved initialization with rank r) and measure the perplexity on
held-out text. CO-SVD keeps the model's behaviour far better because it orders components by how
much the *calibration activations* use them (paper Fig. 2 / Table 1).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibrate import calibrate
from .decompose import decompose
from .integrations import hf
from .methods import CorDA, MiLoRA
from .methods.asvd import ASVD

METHODS = {"SVD": lambda: MiLoRA(), "ASVD": lambda: ASVD(mode="kpa"), "CO-SVD": lambda: CorDA(mode="kpa")}


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[dict]) -> float:
    """exp(mean next-token NLL) over the non-padding tokens of ``batches``."""
    device = hf.input_device(model)
    nll, count = 0.0, 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask", torch.ones_like(ids)).to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        keep = mask[:, 1:].bool() & mask[:, :-1].bool()
        nll -= float(logp[keep].sum())
        count += int(keep.sum())
    return math.exp(nll / max(count, 1))


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
    results = {name: {0: base} for name in METHODS}
    runs = [(m, r) for m in METHODS for r in discards if r > 0]
    for method_name, r in tqdm(runs, desc="discard report", disable=not progress):
        ranks = {n: min(r, min(originals[n].shape)) for n in targets}
        inits = decompose(targets, METHODS[method_name](), ranks=ranks, alphas=ranks,
                          covariances=covariances, seed=seed, progress=False)
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
    lines = ["| discarded r | " + " | ".join(METHODS) + " |", "| --- |" + " --- |" * len(METHODS)]
    for r in ranks_sorted:
        lines.append(f"| {r} | " + " | ".join(f"{results[m].get(r, float('nan')):.3f}" for m in METHODS) + " |")
    table = "\n".join(lines)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "discard_report.md"), "w") as fh:
            fh.write(f"Held-out perplexity after discarding the smallest r components ({len(targets)} layers)\n\n{table}\n")
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
