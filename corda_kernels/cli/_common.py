"""What the ``corda-kernels`` subcommands share: the model/data options and text batches."""

from __future__ import annotations

import argparse

import torch

from ..integrations import loading


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
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


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quantize nf4|int8`` and ``--quantize-iters T`` (apply's ``quantize`` / ``quantize_iters``)."""
    parser.add_argument(
        "--quantize", choices=["nf4", "int8"], help="store the frozen residuals quantized (bitsandbytes formats)"
    )
    parser.add_argument("--quantize-iters", type=int, default=0, help="LoftQ-style refinements of the residual")


def targets(spec):
    """``--targets``: comma-separated names (suffix match) or a regex."""
    if spec is None:
        return None
    return spec.split(",") if "," in spec or spec.isidentifier() else spec


def text_batches(args, tokenizer, spec=None, samples=None):
    """Tokenizer batches of ``--calib`` (or ``spec``), at most ``--samples`` (or ``samples``) texts."""
    texts = loading.load_texts(spec or args.calib)[: samples or args.samples]
    return loading.token_batches(tokenizer, texts, args.seq_len, args.batch_size)
