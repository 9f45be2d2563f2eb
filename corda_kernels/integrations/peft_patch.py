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

Per call, the layer falls back to PEFT's own forward when the fused path does not apply: adapters
disabled or merged, ``adapter_names`` (mixed batches) or other extra arguments, more or fewer than
one active adapter, a LoRA variant (DoRA, ...) or ``lora_bias`` on the active adapter, autocast,
or an input dtype other than the base weight's. Adapter factors stored in another dtype than the
base weight (PEFT's ``autocast_adapter_dtype`` keeps fp32 adapters on a bf16 base) are cast to
the base dtype inside the graph, so gradients still reach the fp32 parameters.

:func:`patch_peft` refuses, naming the layer, configurations it would never run fused (several
active adapters, DoRA or other variants, ``lora_bias``, a quantized or non-linear base layer,
a dropout module other than ``nn.Dropout`` / ``nn.Identity``). Other LoRA layer types
(embeddings, convolutions) are left on PEFT's forward. :func:`unpatch_peft` restores.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from .._dtypes import ACTIVATION_DTYPES
from ..ops.lowrank_linear import lowrank_linear
from . import hf

_MARK = "_corda_kernels_patched"


def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("patch_peft needs `pip install peft`") from exc
    return Linear


def _refusal(name: str, layer: nn.Module) -> str:
    """Why ``layer`` cannot run fused (empty string when it can)."""
    active = list(layer.active_adapters)
    if len(active) != 1:
        return (
            f"layer {name} has {len(active)} active adapters {active}; "
            "patch_peft runs exactly one (model.set_adapter(name))"
        )
    adapter = active[0]
    if adapter not in layer.lora_A:
        return f"layer {name} has no LoRA weights for its active adapter {adapter!r}"
    variant = layer.lora_variant.get(adapter)
    if variant is not None or layer.use_dora.get(adapter, False):
        kind = type(variant).__name__ if variant is not None else "DoRA"
        return (
            f"layer {name} uses a LoRA variant ({kind}) for adapter {adapter!r}; "
            "patch_peft runs plain LoRA only (no DoRA)"
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


def _fusable(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    if args or any(v is not None for v in kwargs.values()) or layer.disable_adapters or layer.merged:
        return False
    if len(layer.active_adapters) != 1 or torch.is_autocast_enabled(x.device.type):
        return False
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in layer.lora_variant or layer.lora_bias.get(adapter, False):
        return False
    drop = layer.lora_dropout[adapter]
    fits_dropout = isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and drop.p < 1.0)
    return fits_dropout and x.dtype == layer.base_layer.weight.dtype


def _fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Instance forward of a patched PEFT LoRA ``Linear`` (see the module docstring)."""
    if not _fusable(self, x, args, kwargs):
        return type(self).forward(self, x, *args, **kwargs)
    adapter = self.active_adapters[0]
    drop = self.lora_dropout[adapter]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    base = self.base_layer
    weight = hf.weight_matrix(base)
    A = self.lora_A[adapter].weight.to(weight.dtype)
    B = self.lora_B[adapter].weight.to(weight.dtype)
    return lowrank_linear(x, weight, A, B, scale=self.scaling[adapter], bias=base.bias, dropout=p)


def patch_peft(peft_model: nn.Module) -> list[str]:
    """Make every PEFT LoRA ``Linear`` of ``peft_model`` run on the fused op; returns their names.

    Raises ValueError (naming the layer) for configurations listed in the module docstring, and
    when the model has no PEFT LoRA ``Linear`` layer. Idempotent.
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
        layer.forward = types.MethodType(_fused_forward, layer)
        setattr(layer, _MARK, True)
    return list(layers)


def unpatch_peft(peft_model: nn.Module) -> list[str]:
    """Restore PEFT's forward on every layer :func:`patch_peft` patched; returns their names."""
    restored = []
    for name, module in peft_model.named_modules():
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
            restored.append(name)
    return restored


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` (a PEFT LoRA layer) runs on the fused op."""
    return bool(getattr(module, _MARK, False))
