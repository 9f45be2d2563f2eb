"""The LLaMA-2-7B-shaped model the GPU benchmarks share (``decompose_7b.py``, ``blockwise_7b.py``):
a random-weight ``LlamaForCausalLM`` of the given shapes (LLaMA-2-7B on a GPU, a small stand-in on a
CPU), optionally with SmolLM2's measured singular-value profile per projection kind; its command-line
options and the JSON a run writes beside its table. A module, not a script: the scripts import it.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

SPECTRA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_spectra.json")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
PROJECTIONS += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@torch.no_grad()
def shape_spectra(model, seed: int = 4) -> None:
    """Give every projection SmolLM2's measured singular-value profile for its kind
    (``smollm2_spectra.json``, made by ``bench/studies/smollm2_spectra.py``) and keep its Frobenius
    norm: ``W = U diag(σ ⊙ ±1) Vᵀ`` with one random orthonormal ``U, V`` pair per shape and random
    signs per layer. Random Gaussian weights have flat spectra; real ones do not."""
    with open(SPECTRA) as fh:
        profiles = json.load(fh)["profiles"]
    device = model.model.embed_tokens.weight.device
    g = torch.Generator(device=device).manual_seed(seed)
    grid = torch.linspace(0, 1, 65, dtype=torch.float64, device=device) ** 2
    bases = {}
    for block in model.model.layers:
        for path in PROJECTIONS:
            lin = block.get_submodule(path)
            m, n = lin.weight.shape
            k = min(m, n)
            if (m, n) not in bases:
                U = torch.linalg.qr(torch.randn(m, k, generator=g, device=device)).Q
                V = torch.linalg.qr(torch.randn(n, k, generator=g, device=device)).Q
                bases[(m, n)] = (U, V)
            U, V = bases[(m, n)]
            logs = torch.tensor(profiles[path.split(".")[1]], dtype=torch.float64, device=device).log()
            pos = torch.arange(k, dtype=torch.float64, device=device) / max(k - 1, 1)
            hi = torch.searchsorted(grid, pos).clamp(1, grid.numel() - 1)
            t = (pos - grid[hi - 1]) / (grid[hi] - grid[hi - 1])
            sigma = (logs[hi - 1] * (1 - t) + logs[hi] * t).exp().float()
            signs = torch.randint(0, 2, (k,), generator=g, device=device).float() * 2 - 1
            W = (U * (sigma * signs)) @ V.T
            lin.weight.copy_(W * (lin.weight.float().norm() / W.norm()))


def build_model(args, device):
    """A random-weight ``LlamaForCausalLM`` with the given shapes, built in ``args.dtype`` on ``device``
    (``args.spectrum == "smollm2"``: its projections given SmolLM2's spectral profile)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.blocks,
        num_attention_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    if getattr(args, "spectrum", "random") == "smollm2" and str(device) != "meta":
        shape_spectra(model)
    return model


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model-shape options shared by the 7B-shaped benchmarks (LLaMA-2-7B on a GPU, a small
    stand-in on a CPU)."""
    gpu = torch.cuda.is_available()
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--blocks", type=int, default=32 if gpu else 2)
    p.add_argument("--hidden", type=int, default=4096 if gpu else 256)
    p.add_argument("--intermediate", type=int, default=11008 if gpu else 688)
    p.add_argument("--heads", type=int, default=32 if gpu else 4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--rank", type=int, default=128 if gpu else 16)
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--progress", action="store_true")


def write_json(path: str, args: argparse.Namespace, **results) -> None:
    """The run's options and raw results (seconds, bytes, counts) as JSON, beside the printed table."""
    options = {k: str(v) if isinstance(v, torch.dtype) else v for k, v in vars(args).items()}
    with open(path, "w") as fh:
        json.dump({"options": options, "torch": torch.__version__, **results}, fh, indent=1)


def parse_model_arguments(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    p.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    return args
