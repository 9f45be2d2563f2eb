"""Hugging Face model plumbing: which modules are targets, their weight layout, where inputs go.

Target selection follows PEFT's rules so configs carry over: ``target_modules`` as a string is a
regex that must match the whole module name; as a list, an entry matches a module whose name
equals it or ends with ``"." + entry``. The default is every ``nn.Linear`` (and transformers'
``Conv1D``, GPT-2 style, stored ``(in, out)``) inside the model's repeated blocks (the
``nn.ModuleList`` stacks of decoder/encoder layers), which excludes ``lm_head`` and embeddings.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .._dtypes import ACTIVATION_DTYPES
from ..nn import LowRankLinear


class StopForward(Exception):
    """Raised after the last layer a forward pass was run for (calibration, EVA) when the rest need
    not run; caught around that forward."""


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
    types that contain linear layers, or adapted ones (``model.layers``, ``transformer.h``,
    ``encoder.layer`` ...)."""
    stacks: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(name.startswith(prefix + ".") for prefix, _ in stacks):
            continue  # nested inside a block already counted (e.g. MoE experts)
        kinds = {type(child) for child in module}
        if len(kinds) == 1 and any(is_linear_like(m) or isinstance(m, LowRankLinear) for m in module[0].modules()):
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
    if not chosen:
        raise ValueError(_nothing_matched(model, target_modules, linears))
    if exclude_modules is not None:
        kept = {n: m for n, m in chosen.items() if not matches(n, exclude_modules)}
        if not kept:
            source = f"target_modules={target_modules!r} matched" if target_modules is not None else None
            source = source or "of the default targets"
            raise ValueError(
                f"exclude_modules={exclude_modules!r} excludes every target (the {len(chosen)} linear layers "
                f"{source}, e.g. {next(iter(chosen))}): nothing is left to calibrate or adapt"
            )
        chosen = kept
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
    """Replace ``model.<name>`` with ``new`` and return the module it replaced. ``new`` takes the
    replaced module's training mode (an adapter put into an ``eval()`` model must not run dropout)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    new.train(old.training)
    setattr(parent, child, new)
    return old


def training_modes(model: nn.Module) -> dict[str, bool]:
    """Every module's ``training`` flag, by name (see :func:`restore_training_modes`)."""
    return {name: module.training for name, module in model.named_modules()}


def restore_training_modes(model: nn.Module, modes: Mapping[str, bool]) -> None:
    """Put back the flags :func:`training_modes` recorded, module by module (a module swapped in
    since takes the flag of the one it replaced, by name; a module that did not exist takes its
    parent's)."""
    now: dict[str, bool] = {}
    for name, module in model.named_modules():
        flag = modes.get(name, now.get(name.rpartition(".")[0], model.training))
        module.training = now[name] = flag


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the input embedding's device (handles ``device_map`` dispatch)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


def without_cache(model: nn.Module, batch: Mapping) -> dict:
    """``batch`` as keyword arguments with ``use_cache=False`` when the model has a KV cache: a
    forward that only reads activations must not keep every layer's keys and values (SmolLM2 at
    8x256 tokens: 94 MB held until the forward returns; a 7B model without GQA: ~1 GB)."""
    if getattr(getattr(model, "config", None), "use_cache", None) is None or not _takes_use_cache(type(model)):
        return dict(batch)
    return {**batch, "use_cache": False}


@functools.cache
def _takes_use_cache(cls: type) -> bool:
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False
    return "use_cache" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def named(modules: Iterable[str]) -> str:
    """A short human list of names for messages."""
    names = list(modules)
    return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")


def is_offloaded(model: nn.Module) -> bool:
    """Whether accelerate's hooks move weights in per module (``device_map`` with offload)."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def refuse_meta(model: nn.Module, modules: dict[str, nn.Module], what: str) -> None:
    """Refuse target layers whose weights are on the ``meta`` device (no values: built under
    ``init_empty_weights`` or ``device="meta"``), unless accelerate loads them per module."""
    meta = [
        name
        for name, module in modules.items()
        if getattr(module, "weight", None) is not None and module.weight.is_meta
    ]
    if meta and not is_offloaded(model):
        raise ValueError(
            f"{what} needs the weights' values, but layer {meta[0]} (and {len(meta) - 1} more) of "
            f"{type(model).__name__} is on the meta device; load the model with its weights (from_pretrained "
            "without init_empty_weights / device='meta'), or use corda_kernels.estimate_memory for a meta model"
        )


def check_finite_parameters(named_parameters: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise naming the first parameter holding NaN or Inf (in calibration it would poison every
    later layer's input, so the error would otherwise name a downstream layer)."""
    for name, param in named_parameters:
        if param is None or param.is_meta or not param.dtype.is_floating_point:
            continue
        if not bool(torch.isfinite(param).all()):
            raise FloatingPointError(f"{what}: parameter {name} holds NaN or Inf; fix or reload the weights")


def decoder_stack(model: nn.Module) -> tuple[Optional[str], Optional[nn.Module]]:
    """``(name of the decoder module, the encoder module)`` of an encoder-decoder model (T5, BART:
    ``config.is_encoder_decoder``), else ``(None, None)``."""
    config = getattr(model, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return None, None
    get_dec, get_enc = getattr(model, "get_decoder", None), getattr(model, "get_encoder", None)
    decoder = get_dec() if callable(get_dec) else None
    encoder = get_enc() if callable(get_enc) else None
    if decoder is None or encoder is None:
        return None, None
    name = next((n for n, m in model.named_modules() if m is decoder), None)
    return name, encoder


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def forget_gguf_quantization(model: nn.Module) -> bool:
    """transformers dequantizes GGUF tensors to float at load but keeps marking the model as
    GGUF-quantized, which makes ``save_pretrained`` and ``Trainer`` refuse it. The weights are plain
    floats: drop the marks so the model saves and trains as an ordinary one. Other quantization
    methods are left alone. Returns whether marks were dropped."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    method = getattr(method, "value", method) or getattr(model, "quantization_method", None)
    if str(getattr(method, "value", method)).lower() != "gguf":
        return False
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model, "config") and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return True


def refuse_adapted(model: nn.Module, what: str) -> None:
    """Refuse a model that already carries corda_kernels or PEFT LoRA adapters (``what``: the
    refusing call): its target layers are no longer plain linear layers."""
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            more = "; to add a further named adapter to its layers pass adapter_name=" if what == "apply" else ""
            raise ValueError(
                f"{what}: model already carries corda_kernels adapters (e.g. {name}); {what} the base model, or merge "
                f"or unload them first (corda_kernels.merge / corda_kernels.unload){more}"
            )
        if type(module).__module__.startswith("peft.") and hasattr(module, "lora_A"):
            raise ValueError(
                f"{what}: model already carries PEFT LoRA layers (e.g. {name}); {what} the base model, "
                "or use corda_kernels.patch_peft to run an existing PeftModel on our kernels"
            )


def pattern_entry(pattern: Optional[Mapping[str, Any]], name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: ``(key, value)`` of the first ``pattern``
    key (a regex) matching the end of module ``name``; ``(None, default)`` when none does."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return key, value
    return None, default
