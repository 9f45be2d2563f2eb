"""Every check of a ``corda-kernels`` command line that needs no model: device, model location (local,
cached or reachable hub), targets, texts, optional packages, the method's options and the output
folder's room. Runs in seconds, before minutes of loading, and fails with one :class:`UsageError`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
from typing import Optional
from urllib.parse import urlparse

import torch

from ..integrations import loading
from .arguments import PARTIAL_LORA_OPTIONS, targets


class UsageError(ValueError):
    """A bad argument or environment, found before any work was done."""


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


# -- the method options init and estimate share --


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
        dora=getattr(args, "dora", False),
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
