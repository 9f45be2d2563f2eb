"""Which implementation of an op runs on which device.

Every op has a pure-torch ``reference`` (the specification, valid everywhere) and may have faster
backends: ``triton`` (GPU, or CPU under ``TRITON_INTERPRET=1``), ``cuda`` (the compiled
``corda_kernels._C`` extension) and ``torch`` (a tuned torch composition: the CPU path, valid on any
device). ``CORDA_KERNELS_BACKEND`` forces one for every op (``auto`` by default); a forced backend
that cannot run the call raises instead of silently falling back, so bug reports and tests know
what ran. (``cpu``, the torch backend's name before 0.2, is accepted with a deprecation warning.)

When a fast backend is missing (Triton not installed, extension not built) the op falls back to the
reference and says so once through :mod:`logging` (a diagnostic: results agree across backends).
Anything that changes results is a :class:`CordaWarning` instead, which Python shows by default.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings

import torch

logger = logging.getLogger("corda_kernels")

BACKENDS = ("auto", "triton", "cuda", "torch", "reference")
_RENAMED = {"cpu": "torch"}
ENV_BACKEND = "CORDA_KERNELS_BACKEND"

_warned: set[str] = set()


class CordaWarning(UserWarning):
    """Something that changes results happened, and the run went on.

    Raised through :func:`warnings.warn` (never as an exception) when, for example, padding could
    not be excluded from a layer's covariance, a damaged decomposition-cache entry was recomputed,
    or adapters with different dropouts were exported to PEFT's single ``lora_dropout``. A
    ``UserWarning`` subclass, so Python shows it by default; silence it with
    ``warnings.filterwarnings("ignore", category=corda_kernels.CordaWarning)``. Progress and backend
    diagnostics go to the ``corda_kernels`` logger instead.
    """


def warn(message: str, stacklevel: int = 2) -> None:
    """``warnings.warn(message, CordaWarning)`` attributed ``stacklevel`` frames above the caller."""
    warnings.warn(message, CordaWarning, stacklevel=stacklevel + 1)


def info_once(key: str, message: str) -> None:
    """Log ``message`` at INFO level the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        logger.info(message)


def warn_once(key: str, message: str) -> None:
    """Log ``message`` at WARNING level the first time ``key`` is seen in this process (diagnostics
    only: use :func:`warn` for anything that changes results)."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def requested_backend() -> str:
    """The backend forced by ``CORDA_KERNELS_BACKEND`` (``auto`` when unset)."""
    name = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
    if name in _RENAMED:
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"{ENV_BACKEND}={name} is deprecated; the backend is now called {_RENAMED[name]!r}",
                DeprecationWarning,
                stacklevel=3,
            )
        name = _RENAMED[name]
    if name not in BACKENDS:
        raise ValueError(f"{ENV_BACKEND}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_importable() -> bool:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising something else
        warn_once("triton-missing", f"Triton is not usable ({exc}); ops fall back to torch.")
        return False
    return True


def triton_runs_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of ``device``."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreted()


@functools.cache
def extension():
    """The compiled ``corda_kernels._C`` module, or None when it was not built."""
    try:
        return importlib.import_module("corda_kernels._C")
    except ImportError as exc:
        info_once("ext-missing", f"corda_kernels._C is not built ({exc}); using Triton/torch paths.")
        return None


def extension_has_cuda() -> bool:
    ext = extension()
    return bool(ext is not None and getattr(ext, "built_with_cuda", lambda: False)())


def choose(op: str, device: torch.device, available: dict[str, bool], preference: tuple[str, ...]) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    ``available`` maps backend name -> whether it can run this call; ``preference`` is the measured
    order for ``device`` (fastest first). ``reference`` is always available.
    """
    forced = requested_backend()
    if forced != "auto":
        if forced == "reference" or available.get(forced, False):
            return forced
        raise RuntimeError(
            f"{ENV_BACKEND}={forced} but the {forced} backend of {op} cannot run on {device} "
            f"(available here: {', '.join(k for k, v in available.items() if v) or 'reference'})"
        )
    for name in preference:
        if available.get(name, False):
            return name
    info_once(f"{op}-{device.type}-reference", f"{op} on {device.type}: using the pure-torch reference.")
    return "reference"


class TritonOrTorch:
    """The backend choice of an op whose fast paths are a Triton kernel and a torch composition:
    ``plan(x)`` -> ``"triton"`` / ``"torch"`` / ``"reference"`` for ``x``'s device and dtype,
    ``preference`` per device type (fastest first), memoized per environment (a per-call hot path).
    Triton runs fp16/bf16/fp32 on a GPU, or on the CPU under the interpreter (not bf16 there).
    ``kernels(backend, torch_kernel, reference)`` returns the module that runs it."""

    def __init__(self, op: str, triton_module: str, cuda: tuple[str, ...], cpu: tuple[str, ...]):
        self.op, self.triton_module = op, triton_module
        self.preference = {"cuda": cuda, "cpu": cpu}
        self._cache: dict[tuple, str] = {}

    def __call__(self, x: torch.Tensor) -> str:
        key = (x.device.type, x.dtype, os.environ.get(ENV_BACKEND), os.environ.get("TRITON_INTERPRET"))
        backend = self._cache.get(key)
        if backend is None:
            interpreted_bf16 = x.device.type == "cpu" and x.dtype == torch.bfloat16  # the interpreter cannot do bf16
            triton = x.dtype in (torch.float16, torch.bfloat16, torch.float32) and not interpreted_bf16
            available = {"triton": triton and triton_runs_on(x.device), "torch": True}
            preference = self.preference["cuda" if x.device.type == "cuda" else "cpu"]
            backend = self._cache[key] = choose(self.op, x.device, available, preference)
        return backend

    def kernels(self, backend: str, torch_kernel, reference):
        """The kernel module of ``backend`` (Triton imported on first use)."""
        if backend == "triton":
            return importlib.import_module(self.triton_module)
        return torch_kernel if backend == "torch" else reference
