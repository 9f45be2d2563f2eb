"""PEFT, globally on corda_kernels: ``patch_peft()`` with no argument.

While the global patch is on (:func:`patch_global` ... :func:`unpatch_global`, or the context
manager :func:`peft_patched`), PEFT itself is unchanged in its public API and file formats, and:

1. every LoRA ``Linear`` layer that PEFT builds or loads (``get_peft_model``,
   ``PeftModel.from_pretrained``, ``load_adapter``, ``add_adapter``: all go through
   ``BaseTuner.inject_adapter``), bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` included, is
   patched by the per-layer patch :func:`corda_kernels.integrations.peft_patch.patch_layer` once
   the injection is done; a layer it does not patch (a LoRA variant it does not run, ``lora_bias``,
   bitsandbytes storage it cannot read, ...) stays on PEFT's forward, with one log line;
2. PEFT's weight- and data-aware initializations run on our batched engine
   (:mod:`corda_kernels.integrations.peft_init`): ``"pissa"``, ``"pissa_niter_N"``, ``"olora"`` and
   ``"loftq"`` layers are collected during the injection and initialized together, one batch per shape,
   bounded by :data:`~corda_kernels.integrations.peft_init.CHUNK_BYTES`; ``preprocess_corda``
   accumulates its covariances on our streaming op and decomposes with our CO-SVD, storing only
   the r kept components; EVA (``get_eva_state_dict`` / ``initialize_lora_eva_weights``) computes
   its components as the top eigenvectors of each layer's exact centered input covariance
   (:mod:`corda_kernels.integrations.peft_eva`), with PEFT's stopping rule and rank redistribution;
3. anything else (other initializations, options or layer types we do not
   implement) runs PEFT's own code, with one log line on the ``corda_kernels.peft`` logger saying why.

Patching replaces a handful of attributes on PEFT's classes and modules (saved and restored
exactly by :func:`unpatch_global`); it works whether ``peft`` was imported before or after (it is
imported here), and is idempotent. A PEFT outside :data:`SUPPORTED_PEFT` or one that does not import
raises before anything is patched.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import weakref
from typing import Any, Callable, Iterator, Optional

from torch import nn

from . import peft_eva, peft_init, peft_patch

logger = logging.getLogger("corda_kernels.peft")

# The PEFT versions whose internals the global patch was written against and tested with.
SUPPORTED_PEFT = (">=0.21.0", "<0.22.0")
SUPPORTED_TEXT = "peft>=0.21.0,<0.22.0"

# (module, owner attribute path, attribute) that the global patch replaces.
_TARGETS = (
    ("peft.tuners.tuners_utils", "BaseTuner", "inject_adapter"),
    ("peft.tuners.lora.layer", "LoraLayer", "pissa_init"),
    ("peft.tuners.lora.layer", "LoraLayer", "olora_init"),
    ("peft.tuners.lora.layer", "LoraLayer", "loftq_init"),
    ("peft.tuners.lora.corda", None, "calib_cov_distribution"),
    ("peft.tuners.lora.corda", None, "collect_eigens"),
    ("peft.tuners.lora.eva", None, "_get_eva_state_dict"),
)

_saved: Optional[dict[tuple[str, Optional[str], str], Any]] = None  # originals while patched
_fused_layers: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # layers the global patch fused


def is_globally_patched() -> bool:
    """Whether the global PEFT patch is on."""
    return _saved is not None


def _version_ok(version: str) -> bool:
    from packaging.version import Version

    v = Version(version)
    return Version("0.21.0") <= v < Version("0.22.0")


def _resolve() -> dict[tuple[str, Optional[str], str], tuple[Any, Any]]:
    """``{target: (owner, original)}`` for every attribute the patch replaces, or raise (before any
    change) when PEFT is missing, broken or of another version."""
    try:
        peft = importlib.import_module("peft")
    except ImportError as exc:
        raise ImportError(f"patch_peft() needs PEFT ({SUPPORTED_TEXT}): `pip install 'peft>=0.21,<0.22'`") from exc
    except Exception as exc:  # a broken install raises anything at import time
        raise ImportError(
            f"patch_peft(): PEFT failed to import ({type(exc).__name__}: {exc}); supported: {SUPPORTED_TEXT}"
        ) from exc
    version = getattr(peft, "__version__", "unknown")
    try:
        ok = _version_ok(version)
    except Exception:
        ok = False
    if not ok:
        raise RuntimeError(
            f"patch_peft(): PEFT {version} is installed; the global patch supports {SUPPORTED_TEXT} "
            "(nothing was patched; patch_peft(peft_model) still patches a built model's layers)"
        )
    found = {}
    for target in _TARGETS:
        module_name, owner_name, attr = target
        try:
            module = importlib.import_module(module_name)
            owner = getattr(module, owner_name) if owner_name else module
            original = owner.__dict__[attr] if owner_name else getattr(module, attr)
        except Exception as exc:
            raise RuntimeError(
                f"patch_peft(): PEFT {version} lacks {module_name}.{owner_name + '.' if owner_name else ''}{attr} "
                f"({type(exc).__name__}: {exc}); the install is broken or modified; supported: {SUPPORTED_TEXT} "
                "(nothing was patched)"
            ) from exc
        found[target] = (owner, original)
    return found


def _fuse(model: nn.Module) -> None:
    """Run every LoRA ``Linear`` of ``model`` (bitsandbytes' included) on the fused ops through the
    per-layer patch (:func:`~corda_kernels.integrations.peft_patch.patch_layer`), logging each layer
    it leaves on PEFT's forward and why. Layers patched before (explicitly) are left to their owner."""
    linear_cls, bnb_classes = peft_patch._lora_classes()
    for name, module in model.named_modules():
        if not isinstance(module, (linear_cls, *bnb_classes)) or peft_patch.is_patched(module):
            continue
        unpatched = peft_patch.patch_layer(module, name)
        if unpatched is not None:
            logger.info("PEFT layer %s runs PEFT's own forward: %s", name, unpatched.message)
            continue
        _fused_layers.add(module)


def _wrap_inject(original: Callable) -> Callable:
    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        with peft_init.collecting() as pending:
            result = original(self, model, adapter_name, *args, **kwargs)
            peft_init.run_pending(pending)
        if getattr(self, "prefix", None) == "lora_":
            _fuse(model)
        return result

    inject_adapter.__wrapped__ = original
    inject_adapter.__name__ = original.__name__
    inject_adapter.__doc__ = original.__doc__
    return inject_adapter


def _replacements(found) -> dict:
    corda = peft_init.corda_functions(
        found[("peft.tuners.lora.corda", None, "calib_cov_distribution")][1],
        found[("peft.tuners.lora.corda", None, "collect_eigens")][1],
    )
    return {
        ("peft.tuners.tuners_utils", "BaseTuner", "inject_adapter"): _wrap_inject(
            found[("peft.tuners.tuners_utils", "BaseTuner", "inject_adapter")][1]
        ),
        ("peft.tuners.lora.layer", "LoraLayer", "pissa_init"): peft_init.wrap_pissa(
            found[("peft.tuners.lora.layer", "LoraLayer", "pissa_init")][1]
        ),
        ("peft.tuners.lora.layer", "LoraLayer", "olora_init"): peft_init.wrap_olora(
            found[("peft.tuners.lora.layer", "LoraLayer", "olora_init")][1]
        ),
        ("peft.tuners.lora.layer", "LoraLayer", "loftq_init"): peft_init.wrap_loftq(
            found[("peft.tuners.lora.layer", "LoraLayer", "loftq_init")][1]
        ),
        ("peft.tuners.lora.corda", None, "calib_cov_distribution"): corda[0],
        ("peft.tuners.lora.corda", None, "collect_eigens"): corda[1],
        ("peft.tuners.lora.eva", None, "_get_eva_state_dict"): peft_eva.wrap_get_eva_state_dict(
            found[("peft.tuners.lora.eva", None, "_get_eva_state_dict")][1]
        ),
    }


def patch_global() -> None:
    """Switch the global PEFT patch on (idempotent); see the module docstring."""
    global _saved
    if _saved is not None:
        return
    found = _resolve()
    replacements = _replacements(found)
    _saved = {target: original for target, (_, original) in found.items()}
    for target, (owner, _) in found.items():
        setattr(owner, target[2], replacements[target])


def unpatch_global() -> None:
    """Switch the global PEFT patch off: PEFT's attributes are restored exactly, and the layers it
    fused run PEFT's forward again. Without a patch, a no-op."""
    global _saved
    if _saved is None:
        return
    saved, _saved = _saved, None
    for (module_name, owner_name, attr), original in saved.items():
        module = importlib.import_module(module_name)
        setattr(getattr(module, owner_name) if owner_name else module, attr, original)
    for layer in list(_fused_layers):
        if peft_patch.is_patched(layer):
            peft_patch.unpatch_peft(layer)
    _fused_layers.clear()


@contextlib.contextmanager
def peft_patched() -> Iterator[None]:
    """The global PEFT patch (:func:`patch_peft` without an argument) for a ``with`` block.

    On exit PEFT is restored (as :func:`unpatch_peft` does), unless the global patch was already
    on when the block began.

    Returns:
        A context manager: the global patch is on inside its ``with`` block (it yields ``None``).

    Raises:
        ImportError: PEFT is not installed or fails to import.
        RuntimeError: the installed PEFT is outside the supported range; nothing is patched.
    """
    was_on = is_globally_patched()
    patch_global()
    try:
        yield
    finally:
        if not was_on:
            unpatch_global()


def patch_peft(peft_model: Optional[nn.Module] = None) -> Optional[list[str]]:
    """Run PEFT on corda_kernels: globally (no argument), or one built model's LoRA layers.

    ``patch_peft()`` switches the global patch on: from then on every LoRA ``Linear`` layer PEFT
    builds or loads runs on the fused op, and PEFT's ``"pissa"``, ``"pissa_niter_N"`` and
    ``"olora"`` initializations, ``preprocess_corda`` and EVA's ``get_eva_state_dict`` /
    ``initialize_lora_eva_weights`` run on our batched engine with PEFT's
    semantics; anything else runs PEFT's own code, with a log line (``corda_kernels.peft``
    logger) saying why. Works whether ``peft`` was imported before or after; idempotent;
    :func:`unpatch_peft` restores. ``patch_peft(peft_model)`` patches that model's LoRA ``Linear``
    layers only, strictly (see :func:`corda_kernels.integrations.peft_patch.patch_peft`).

    Args:
        peft_model: ``None`` for the global patch, or a ``PeftModel`` (any module holding PEFT LoRA
            ``Linear`` layers) to patch in place.

    Returns:
        ``None`` for the global patch; for a model, the names of the patched layers.

    Raises:
        ImportError: PEFT is not installed or fails to import (the message names the supported
            versions).
        RuntimeError: (global) the installed PEFT is outside the supported range, or lacks what the
            patch replaces; nothing is patched.
        ValueError: (model) the model has no PEFT LoRA ``Linear`` layer, or a layer it would never
            run fused (DoRA or another variant, ``lora_bias``, several active adapters, ...).
    """
    if peft_model is not None:
        return peft_patch.patch_peft(peft_model)
    patch_global()
    return None


def unpatch_peft(peft_model: Optional[nn.Module] = None) -> Optional[list[str]]:
    """Undo :func:`patch_peft`: globally (no argument) or on one model.

    Without an argument, PEFT's classes and functions get their own attributes back exactly, and
    the layers the global patch fused run PEFT's forward again; a no-op when the global patch is off.

    Args:
        peft_model: ``None`` for the global patch, or a model :func:`patch_peft` patched.

    Returns:
        ``None`` for the global patch; for a model, the names of the restored layers.
    """
    if peft_model is not None:
        return peft_patch.unpatch_peft(peft_model)
    unpatch_global()
    return None
