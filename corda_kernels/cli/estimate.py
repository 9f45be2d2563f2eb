"""``corda-kernels estimate``: the peak memory of an ``init`` run, estimated beforehand from the
model's config (a ``meta``-device model: no weights are read)."""

from __future__ import annotations

import argparse

from .._measure import rss_bytes
from ..integrations import loading
from ..memory import estimate_memory, meta_model
from . import init
from .checks import adapt_config, validate
from .init import HIGHER


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every ``init`` argument (the same definitions: prefix an ``init`` command line with ``estimate``
    to see its memory; ``--out`` and the like are accepted and write nothing), and the block-wise /
    storage options ``init`` does not have."""
    init.add_arguments(parser)
    parser.add_argument("--blockwise", action="store_true", help="block-wise calibration (apply_blockwise)")
    parser.add_argument(
        "--offload", choices=["cpu"], help="block-wise: where block inputs are kept; else: finalized covariances"
    )
    parser.add_argument("--storage", default="full", choices=["full", "packed"], help="finalized covariances")


def run(args) -> int:
    texts = validate(args, out=False)
    model = meta_model(args.model, args.gguf_file, args.dtype)
    loading.load_tokenizer(args.model, args.gguf_file)  # init holds one: counted in the runtime below
    runtime = rss_bytes()  # this process: Python, torch, transformers, the tokenizer, as in init
    batch_size = min(args.batch_size, len(texts))
    options = {"mode": args.mode} if args.method == "corda" else {}
    if args.method == "partial_lora":  # the ratio search is not modelled: every row and column kept, an upper bound
        options = {"densities": args.density or 1.0}
    n_batches = -(-len(texts) // batch_size)
    # the config init would run (a quantized residual is smaller; --alpha, --normalization and
    # --no-residual change no memory)
    estimate = estimate_memory(
        model,
        adapt_config(args, options),
        batch_size=batch_size,
        seq_len=args.seq_len,
        n_batches=n_batches,
        blockwise=args.blockwise,
        covariance_device=None if args.blockwise else args.offload,
        block_inputs_device=args.offload if args.blockwise else None,
        storage=args.storage,
        device=args.device,
    )
    estimate.add("runtime + tokenizer", "cpu", runtime)
    # init's output check holds the final hidden states of its first two batches, as computed and one
    # precision up (logits are formed per text at comparison time).
    hidden = model.get_output_embeddings().weight.shape[1]
    check = min(2 * batch_size, len(texts)) * args.seq_len * hidden
    estimate.add("output check", "cpu", check * (HIGHER[args.dtype].itemsize + model.dtype.itemsize))
    print(estimate.summary())
    print(f"(sequences counted at --seq-len {args.seq_len} tokens: an upper bound when the texts are shorter)")
    return 0
