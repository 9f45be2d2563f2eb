"""The ``corda-kernels`` subcommands' shared argument definitions: model, data, device and output
options, the method and quantization options, and the argparse value types they parse with.

Parsing only: what needs the file system, the hub or the method's rules is checked in
:mod:`.checks`, before any model is loaded.
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

from ..decomposition.refinement import MAX_QUANTIZE_ITERS, check_quantize_iters
from ..integrations import loading

# -- argparse value types (argparse turns their ValueError/ArgumentTypeError into a usage error) --


def _int_at_least(name: str, minimum: int, what: str):
    """An argparse type: an int >= ``minimum``, else "must be ``what``" (``name``: argparse's label
    for a value that is not an int at all)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = name
    return parse


positive_int = _int_at_least("positive_int", 1, "a positive integer")
non_negative_int = _int_at_least("non_negative_int", 0, "an integer >= 0")
seq_len = _int_at_least("seq_len", 2, "at least 2 tokens (one next-token target)")


def quantize_iters(text: str) -> int:
    """``--quantize-iters``: apply's own check (an integer in [0, MAX_QUANTIZE_ITERS])."""
    try:
        return check_quantize_iters(int(text), "nf4")
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_QUANTIZE_ITERS}], got {text}") from None


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def ratio(text: str) -> float:
    value = float(text)
    if not (0 < value <= 1):
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def int_list(text: str) -> list[int]:
    """``"0,16,64"`` -> ``[0, 16, 64]``: non-negative integers, comma-separated, sorted, unique."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return sorted(set(values))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every default; ``%(default)s`` is not repeated where the help names it."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def add_common_arguments(parser: argparse.ArgumentParser, out_default: Optional[str] = "corda-out") -> None:
    """Model, data and device options (and ``--out``/``--overwrite`` unless ``out_default`` is None)."""
    parser.add_argument(
        "--model", help="hub id or local directory (default: the embedded SmolLM2-135M-Instruct GGUF, offline)"
    )
    parser.add_argument("--gguf-file", help="GGUF file inside --model to load (needs --model)")
    parser.add_argument("--calib", default="builtin", help="'builtin', or a .jsonl ({'text': ...}) / text file")
    parser.add_argument("--samples", type=positive_int, default=64, help="calibration texts to use")
    parser.add_argument("--seq-len", type=seq_len, default=256, help="tokens per text (truncation)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="texts per forward pass")
    parser.add_argument("--dtype", choices=sorted(loading.DTYPES), default="fp32", help="model dtype")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--targets", help="comma-separated layer names (suffix match) or a regex (default: all linear)")
    parser.add_argument("--seed", type=int, default=0, help="seed of randomized decompositions")
    if out_default:
        parser.add_argument("--out", default=out_default, help="output directory (must be empty or absent)")
        parser.add_argument(
            "--overwrite", action="store_true", help="replace a non-empty --out (at the end, atomically)"
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quantize nf4|int8`` and ``--quantize-iters T`` (apply's ``quantize`` / ``quantize_iters``)."""
    parser.add_argument(
        "--quantize", choices=["nf4", "int8"], help="store the frozen residuals quantized (bitsandbytes formats)"
    )
    parser.add_argument(
        "--quantize-iters",
        type=quantize_iters,
        default=0,
        help=f"LoftQ-style refinements of the residual, 0..{MAX_QUANTIZE_ITERS}",
    )


def targets(spec):
    """``--targets``: comma-separated names (suffix match) or a regex."""
    if spec is None:
        return None
    return spec.split(",") if "," in spec or spec.isidentifier() else spec


# -- the method options init and estimate share --

PARTIAL_LORA_OPTIONS = ("few_shot", "few_shot_samples", "margin", "score", "metric", "density")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    from ..methods import METHODS

    parser.add_argument("--method", default="corda", choices=sorted(METHODS), help="initialization recipe")
    parser.add_argument(
        "--mode", choices=["ipa", "kpa"], help="corda only: ipa (largest r in the adapter) or kpa (default: ipa)"
    )
    parser.add_argument("--rank", type=positive_int, default=8, help="adapter rank")
    parser.add_argument(
        "--dora",
        action="store_true",
        help="add a trainable DoRA magnitude per output row (PEFT's use_dora; not for siva, partial_lora, --quantize)",
    )
    group = parser.add_argument_group("partial_lora options (--method partial_lora)")
    group.add_argument("--few-shot", help="few-shot texts for the ratio search (default: the --calib texts)")
    group.add_argument("--few-shot-samples", type=positive_int, help="few-shot texts to use (default: 8)")
    group.add_argument("--margin", type=ratio, help="fraction of the unpruned metric to keep (default: 0.9)")
    group.add_argument("--score", choices=["svd", "snip"], help="ratio search (default: svd)")
    group.add_argument("--metric", choices=["likelihood", "accuracy"], help="few-shot metric (default: likelihood)")
    group.add_argument("--density", type=ratio, help="a fixed keep ratio for every layer: skips the search")
