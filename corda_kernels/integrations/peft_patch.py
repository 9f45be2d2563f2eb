"""Run an existing PEFT LoRA model on corda_kernels' fused low-rank linear op, in place.

:func:`patch_peft` gives each ``peft.tuners.lora.layer.Linear`` of a ``PeftModel`` an instance
``forward`` (a bound method shadowing the class's) that computes, for the active adapter ``a``::

    y = x·Wᵀ + b + scaling[a] · B_a·A_a·drop(x)      (W, b: the base nn.Linear / Conv1D)

with one call of :func:`corda_kernels.ops.lowrank_linear.lowrank_linear` on PEFT's own tensors
(``lora_A[a].weight``, ``lora_B[a].weight``, the base weight and bias: nothing is copied), so
gradients land on PEFT's parameters and training, ``save_pretrained``, loading and merging stay
PEFT's. Dropout: PEFT's ``lora_dropout[a]`` (``nn.Dropout`` in training mode gives our op its
``p``; ``nn.Identity`` or eval mode gives 0). The op draws its own dropout mask (a counter hash
seeded from torch's default generator), so with ``p > 0`` the random mask differs from
``nn.Dropout``'s; the distribution is the same.

Checks that cannot change while the model runs (variants, ``lora_bias``, base layer kind,
dropout module) are made once per adapter at patch time (and on the first call of an adapter added
later) and cached; the per-call path only reads flags and dtypes, then calls the op's unvalidated
entry :func:`~corda_kernels.ops.lowrank_linear.fused` (eager calls skip the dispatcher).

Per call, the layer falls back to PEFT's own forward when the fused path does not apply: adapters
disabled or merged, ``adapter_names`` (mixed batches) or other extra arguments, more or fewer than
one active adapter, an adapter that cannot run fused, or an input dtype other than the base
weight's outside autocast. Under ``torch.autocast`` it runs fused: the op's autocast rule casts
``x``, the base weight and bias to the autocast dtype. Adapter factors may be fp32 on a 16-bit base
(PEFT's ``autocast_adapter_dtype``, its default): the op reads them as they are, rounds them where
they enter its products and returns fp32 gradients (no cast in the graph).

:func:`corda_kernels.ops.dora.dora_linear` for a DoRA adapter (``use_dora``), with PEFT's
``lora_magnitude_vector[a].weight`` as the magnitude; under dropout in training mode PEFT's own
``lora_dropout[a]`` module drops ``x`` for the DoRA term and the base output is corrected as PEFT
does (``(m/n - 1)·(x_d·Wᵀ)``), so the mask and the result are PEFT's.

:func:`patch_peft` refuses, naming the layer and the variant, configurations it would never run
fused (several active adapters, a LoRA variant other than DoRA, ``lora_bias``, a quantized or
non-linear base layer, a dropout module other than ``nn.Dropout`` / ``nn.Identity``). Other LoRA
layer types (embeddings, convolutions) are left on PEFT's forward. :func:`unpatch_peft` restores.
The patched forward is a ``functools.partial`` of a module-level function, so patched models
pickle (``torch.save`` / ``torch.load``) and ``copy.deepcopy`` with the patch in place.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .._dtypes import ACTIVATION_DTYPES, HALF_DTYPES
from ..ops import dora
from ..ops.lowrank_linear import Options, draw_seed, fused
from . import hf

_MARK = "_corda_kernels_patched"
_PLANS = "_corda_kernels_plans"  # {adapter: True when it can run fused}, filled lazily


def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("patch_peft needs `pip install peft`") from exc
    return Linear


# PEFT's variant classes by the names its docs use (others print as their class name, shortened).
_VARIANT_NAMES = {
    "ALora": "aLoRA",
    "Kasa": "KaSA",
    "Velora": "VeLoRA",
    "BdLora": "BD-LoRA",
    "QALora": "QA-LoRA",
    "Monteclora": "MonteCLoRA",
    "MiCA": "MiCA",
    "Arrow": "Arrow",
}


def _variant_name(layer: nn.Module, adapter: str) -> str:
    """The LoRA variant of ``adapter`` as users know it ("" for plain LoRA)."""
    if layer.use_dora.get(adapter, False):
        return "DoRA"
    variant = layer.lora_variant.get(adapter)
    if variant is None:
        return ""
    name = type(variant).__name__
    short = name.removesuffix("LinearVariant").removesuffix("Variant") or name
    return f"{_VARIANT_NAMES.get(short, short)} ({name})"


def _adapter_refusal(name: str, layer: nn.Module, adapter: str) -> str:
    """Why ``adapter`` of ``layer`` cannot run fused (empty string when it can)."""
    if adapter not in layer.lora_A:
        return f"layer {name} has no LoRA weights for its active adapter {adapter!r}"
    variant = _variant_name(layer, adapter)
    if variant and variant != "DoRA":  # DoRA runs on the fused DoRA op
        return (
            f"layer {name} uses the LoRA variant {variant} for adapter {adapter!r}; "
            f"patch_peft runs plain LoRA only, not {variant}"
        )
    if layer.lora_bias.get(adapter, False):
        return f"layer {name} has lora_bias=True for adapter {adapter!r}; the fused op has no adapter bias"
    base = layer.base_layer
    if not hf.is_linear_like(base):
        return f"layer {name}'s base layer is a {type(base).__name__}, not an nn.Linear / Conv1D (quantized or wrapped)"
    if base.weight.dtype not in ACTIVATION_DTYPES:
        return f"layer {name}'s base weight has dtype {base.weight.dtype}; the fused op needs fp32/fp16/bf16"
    if not isinstance(layer.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
        return (
            f"layer {name}'s lora_dropout is a {type(layer.lora_dropout[adapter]).__name__}, "
            "not nn.Dropout / nn.Identity"
        )
    return ""


def _refusal(name: str, layer: nn.Module) -> str:
    """Why ``layer`` cannot run fused (empty string when it can)."""
    active = list(layer.active_adapters)
    if len(active) != 1:
        return (
            f"layer {name} has {len(active)} active adapters {active}; "
            "patch_peft runs exactly one (model.set_adapter(name))"
        )
    return _adapter_refusal(name, layer, active[0])


def _runs_fused(layer: nn.Module, adapter: str) -> bool:
    plans = layer.__dict__.setdefault(_PLANS, {})
    ok = plans.get(adapter)
    if ok is None:
        ok = plans[adapter] = not _adapter_refusal("", layer, adapter)
    return ok


def _factor_ok(factor: torch.Tensor, weight: torch.Tensor) -> bool:
    return factor.dtype == weight.dtype or (factor.dtype == torch.float32 and weight.dtype in HALF_DTYPES)


def _fused_forward(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of a patched PEFT LoRA ``Linear`` (see the module docstring)."""
    if args or layer.disable_adapters or layer.merged or (kwargs and any(v is not None for v in kwargs.values())):
        return type(layer).forward(layer, x, *args, **kwargs)
    active = layer.active_adapters
    if len(active) != 1 or not _runs_fused(layer, active[0]):
        return type(layer).forward(layer, x, *args, **kwargs)
    adapter = active[0]
    base = layer.base_layer
    weight = base.weight
    A = layer.lora_A[adapter].weight
    B = layer.lora_B[adapter].weight
    autocast = torch.is_autocast_enabled(x.device.type)
    if (x.dtype != weight.dtype and not autocast) or not (_factor_ok(A, weight) and _factor_ok(B, weight)):
        return type(layer).forward(layer, x, *args, **kwargs)
    drop = layer.lora_dropout[adapter]
    p = drop.p if drop.training and type(drop) is not nn.Identity else 0.0
    if p >= 1.0:
        return type(layer).forward(layer, x, *args, **kwargs)
    if layer.__dict__.get("_corda_kernels_conv1d"):
        weight = weight.t()
    if layer.use_dora.get(adapter, False):
        return _dora_forward(layer, adapter, x, weight, A, B, p)
    seed = draw_seed(x.device) if p > 0.0 else None
    return fused(x, weight, A, B, Options(float(layer.scaling[adapter]), base.bias, dropout=float(p), seed=seed))


def _dora_forward(layer: nn.Module, adapter: str, x, weight, A, B, p: float) -> torch.Tensor:
    """A DoRA adapter's forward on the fused DoRA op (see the module docstring); ``‖W_o‖²`` cached
    in the layer until the base weight changes (its storage or version: merges write it in place)."""
    magnitude = layer.lora_magnitude_vector[adapter].weight
    if not _factor_ok(magnitude, weight):
        return type(layer).forward(layer, x)
    key = (weight.data_ptr(), weight._version, weight.dtype)
    cached = layer.__dict__.get("_corda_kernels_weight_sq")
    if cached is None or cached[0] != key:
        cached = layer.__dict__["_corda_kernels_weight_sq"] = (key, dora.weight_sq_norm(weight))
    bias = layer.base_layer.bias
    scale = float(layer.scaling[adapter])
    if p == 0.0:
        return dora.fused(x, weight, A, B, magnitude, dora.DoraOptions(scale, bias, cached[1]))
    xd = layer.lora_dropout[adapter](x)
    low = dora.fused(xd, weight, A, B, magnitude, dora.DoraOptions(scale, None, cached[1]))
    return torch.nn.functional.linear(x, weight, bias) - torch.nn.functional.linear(xd, weight) + low


def patch_peft(peft_model: nn.Module) -> list[str]:
    """Make every PEFT LoRA ``Linear`` of ``peft_model`` run on the fused op, in place.

    Each layer's forward becomes one call of the fused low-rank op on PEFT's own tensors (nothing
    is copied), so training, ``save_pretrained``, loading and merging stay PEFT's. Per call it falls
    back to PEFT's forward where the fused path does not apply (adapters disabled or merged, mixed
    batches, an input dtype other than the base weight's outside autocast). Idempotent; patched
    models pickle and deep-copy. :func:`unpatch_peft` restores.

    Args:
        peft_model: a ``peft.PeftModel`` (or any module) holding PEFT LoRA ``Linear`` layers.

    Returns:
        The names of the patched layers.

    Raises:
        ValueError: the model has no PEFT LoRA ``Linear`` layer, or a layer has a configuration it
            would never run fused (several active adapters, a LoRA variant other than DoRA,
            ``lora_bias``, a quantized or non-linear base layer, a dropout module other than
            ``nn.Dropout`` / ``nn.Identity``); the message names the layer and the variant.
        ImportError: peft is not installed.
    """
    linear_cls = _lora_linear_class()
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, linear_cls)}
    if not layers:
        raise ValueError(
            f"{type(peft_model).__name__} has no PEFT LoRA Linear layers to patch (is it a LoRA PeftModel?)"
        )
    for name, layer in layers.items():
        reason = _refusal(name, layer)
        if reason:
            raise ValueError(f"patch_peft: {reason}")
    for layer in layers.values():
        layer.__dict__[_PLANS] = {}
        layer.__dict__["_corda_kernels_conv1d"] = hf.is_conv1d(layer.base_layer)
        layer.forward = functools.partial(_fused_forward, layer)
        setattr(layer, _MARK, True)
    return list(layers)


def unpatch_peft(peft_model: nn.Module) -> list[str]:
    """Restore PEFT's forward on every layer :func:`patch_peft` patched, in place.

    Args:
        peft_model: a model :func:`patch_peft` patched (an unpatched one is left as it is).

    Returns:
        The names of the restored layers (empty when none was patched).
    """
    restored = []
    for name, module in peft_model.named_modules():
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
            module.__dict__.pop(_PLANS, None)
            module.__dict__.pop("_corda_kernels_conv1d", None)
            restored.append(name)
    return restored


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` (a PEFT LoRA layer) runs on the fused op."""
    return bool(getattr(module, _MARK, False))
