"""Hugging Face model plumbing: which modules are targets, their weight layout, where inputs go.

Target selection follows PEFT's rules so configs carry over: ``target_modules`` as a string is a
regex that must match the whole module name; as a list, an entry matches a module whose name
equals it or ends with ``"." + entry``. The default is every ``nn.Linear`` (and transformers'
``Conv1D``, GPT-2 style, stored ``(in, out)``) inside the model's repeated blocks (the
``nn.ModuleList`` stacks of decoder/encoder layers), which excludes ``lm_head`` and embeddings.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .._dtypes import ACTIVATION_DTYPES

try:  # transformers' GPT-2 style linear layer, stored (in_features, out_features)
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover - transformers is a dependency, but keep the ops usable without it
    Conv1D = ()  # type: ignore[assignment]

TargetSpec = Optional[Union[str, Sequence[str]]]


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def is_conv1d(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as ``(out_features, in_features)`` (a transposed view for Conv1D)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def in_out_features(module: nn.Module) -> tuple[int, int]:
    w = weight_matrix(module)
    return w.shape[1], w.shape[0]


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's stacks of repeated blocks: outermost ``nn.ModuleList``s of identical module
    types that contain linear layers (``model.layers``, ``transformer.h``, ``encoder.layer`` ...)."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(prefix + ".") for prefix, _ in stacks):
            continue  # nested inside a block already counted (e.g. MoE experts)
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and any(is_linear_like(m) for m in module[0].modules()):
            stacks.append((name, module))
    return stacks


def matches(name: str, spec: Union[str, Sequence[str]]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def find_targets(
    model: nn.Module, target_modules: TargetSpec = None, exclude_modules: TargetSpec = None
) -> dict[str, nn.Module]:
    """Map of module name -> linear-like module to adapt (see module docstring for the rules).

    Raises ValueError when nothing matches, listing the closest linear layer names.
    """
    linears = {name: m for name, m in model.named_modules() if is_linear_like(m)}
    if target_modules is None:
        prefixes = [prefix + "." for prefix, _ in block_stacks(model)]
        chosen = {n: m for n, m in linears.items() if any(n.startswith(p) for p in prefixes)}
    else:
        chosen = {n: m for n, m in linears.items() if matches(n, target_modules)}
    if exclude_modules is not None:
        chosen = {n: m for n, m in chosen.items() if not matches(n, exclude_modules)}
    if not chosen:
        raise ValueError(_nothing_matched(model, target_modules, linears))
    return chosen


def _nothing_matched(model: nn.Module, spec: TargetSpec, linears: dict[str, nn.Module]) -> str:
    if not linears:
        return f"{type(model).__name__} has no nn.Linear or Conv1D layers to adapt"
    if spec is None:
        return (
            f"found no repeated block stack (nn.ModuleList of layers) in {type(model).__name__}; pass "
            f"target_modules, e.g. {sorted({n.rsplit('.', 1)[-1] for n in linears})[:8]}"
        )
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
    keys = [spec] if isinstance(spec, str) else list(spec)
    close = list(
        dict.fromkeys(c for k in keys for c in difflib.get_close_matches(k.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5))
    )
    hint = f"; close names: {close}" if close else f"; linear layer names end in: {leaves[:12]}"
    return f"target_modules={spec!r} matched no nn.Linear/Conv1D in {type(model).__name__}{hint}"


def check_adaptable(name: str, module: nn.Module) -> None:
    """Refuse weights we cannot decompose (quantized or integer storage) with a clear message."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.dtype not in ACTIVATION_DTYPES:
        kind = type(weight).__name__ if weight is not None else "no weight"
        dtype = getattr(weight, "dtype", None)
        raise TypeError(
            f"layer {name} ({type(module).__name__}) has a {kind} weight of dtype {dtype}; corda_kernels adapts "
            "float32/float16/bfloat16 weights. Dequantize the model first (e.g. load it in bf16), then re-quantize "
            "the residual after initialization."
        )


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace ``model.<name>`` with ``new`` and return the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the input embedding's device (handles ``device_map`` dispatch)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def named(modules: Iterable[str]) -> str:
    """A short human list of names for messages."""
    names = list(modules)
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
