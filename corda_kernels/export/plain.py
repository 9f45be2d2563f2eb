"""Export as plain layers: every ``LowRankLinear`` back to the ``nn.Linear`` / ``Conv1D`` it replaced.

What: :func:`merge` and :func:`unload` swap the adapters, in place, for plain layers holding the
merged weight ``W' + scale·delta`` (:func:`merged_weight`) or the frozen residual ``W'``
(:func:`residual_weight`); :func:`save_merged_model` and :func:`save_residual_model` write those
with ``save_pretrained`` and put the adapters back (:func:`plain_layers`). Why: a plain HF model
is what ``from_pretrained``, other tools and PEFT (as the residual base of an adapter) load.

A quantized residual is written in bitsandbytes' storage format by
:mod:`corda_kernels.export.bnb_checkpoint`; the PEFT adapter by :mod:`corda_kernels.export.peft_adapter`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from ..integrations import hf
from ..nn import LowRankLinear
from ..ops.quantized import QuantizedWeight
from . import bnb_checkpoint


def adapters(model: nn.Module) -> dict[str, LowRankLinear]:
    """Every ``LowRankLinear`` of ``model`` by name; raises ``ValueError`` when there is none (every
    export needs one)."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if not found:
        raise ValueError(f"{type(model).__name__} carries no corda_kernels adapters (LowRankLinear layers)")
    return found


def plain_layer(layer: LowRankLinear, weight: torch.Tensor) -> nn.Module:
    """An ``nn.Linear`` (or ``Conv1D`` if the layer came from one) holding ``weight`` ``(out, in)``."""
    bias = layer.bias
    if getattr(layer, "source_layout", "linear") == "conv1d":
        plain = hf.Conv1D(weight.shape[0], weight.shape[1])
        plain.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        plain.bias = nn.Parameter(
            bias.detach().clone()
            if bias is not None
            else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device),
            requires_grad=False,
        )
        return plain
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    plain.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        plain.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return plain


def residual_weight(layer: LowRankLinear) -> torch.Tensor:
    """The frozen base ``W'`` as a tensor (a quantized base dequantized, bit-exact, to its dtype)."""
    weight = layer.weight
    return weight.dequantize() if isinstance(weight, QuantizedWeight) else weight.detach()


def merged_weight(layer: LowRankLinear, adapter: Optional[str] = None) -> torch.Tensor:
    """``W' + scale·delta`` of the active adapter or ``adapter`` (times DoRA's ``m / n`` per row)
    computed in fp32 and cast once to the weight dtype."""
    with torch.no_grad():
        if getattr(layer, "merged", False):
            return layer.weight.detach().clone()
        return layer.merged_weight(adapter).to(layer.weight.dtype)


def chosen_adapter(layers: dict[str, LowRankLinear], adapter_name: Optional[str], where: str) -> Optional[str]:
    """The adapter an export of several named adapters uses: ``adapter_name`` (every layer must hold
    it), else the layers' active adapter (they must agree); None when every layer holds one adapter."""
    if adapter_name is not None:
        for name, layer in layers.items():
            if adapter_name not in layer.adapter_names:
                raise ValueError(
                    f"{where}: layer {name} holds no adapter {adapter_name!r} (it holds {list(layer.adapter_names)})"
                )
        return adapter_name
    if all(len(layer.adapter_names) == 1 for layer in layers.values()):
        return None
    active: dict[str, str] = {}
    for name, layer in layers.items():
        active.setdefault(layer.active_adapter, name)
    if len(active) > 1:
        (a, la), (b, lb) = list(active.items())[:2]
        raise ValueError(
            f"{where}: ambiguous: layer {la}'s active adapter is {a!r}, layer {lb}'s {b!r}; pass adapter_name="
        )
    return next(iter(active))


@contextlib.contextmanager
def plain_layers(model: nn.Module, kind: str, adapter_name: Optional[str] = None) -> Iterator[nn.Module]:
    """Temporarily replace adapters by plain layers (``kind``: "merged", of the active adapter or
    ``adapter_name``, or "residual")."""
    layers = adapters(model)
    chosen = chosen_adapter(layers, adapter_name, "save_merged_model") if kind == "merged" else None
    for name, layer in layers.items():
        weight = merged_weight(layer, chosen) if kind == "merged" else residual_weight(layer)
        hf.set_submodule(model, name, plain_layer(layer, weight))
    try:
        yield model
    finally:
        for name, layer in layers.items():
            hf.set_submodule(model, name, layer)


def _replace_adapters(model: nn.Module, weight_of) -> nn.Module:
    """Swap every ``LowRankLinear`` of ``model`` for a plain layer holding ``weight_of(layer)``."""
    for name, layer in adapters(model).items():
        hf.set_submodule(model, name, plain_layer(layer, weight_of(layer)))
    hf.forget_gguf_quantization(model)
    return model


def merge(model: nn.Module, adapter_name: Optional[str] = None) -> nn.Module:
    """Fold every adapter into its layer, in place; the model becomes a plain HF model.

    Each ``LowRankLinear`` becomes an ``nn.Linear`` (or ``Conv1D``, as it came) holding
    ``W' + s·delta``, summed in fp32 and cast once to the weight's dtype. GGUF quantization marks
    are dropped, so ``save_pretrained`` writes an ordinary checkpoint. With several named adapters
    the active one is merged (or ``adapter_name``) and the others are dropped.

    Args:
        model: a model adapted by :func:`corda_kernels.apply` (or ``apply_blockwise``).
        adapter_name: the adapter to merge when the layers hold several (default: the active one).

    Returns:
        ``model`` itself, without adapters.

    Raises:
        ValueError: ``model`` carries no ``LowRankLinear`` layer; a layer lacks ``adapter_name``;
            layers with several adapters disagree on the active one and no ``adapter_name`` is
            given (ambiguous). Nothing is changed then.
    """
    chosen = chosen_adapter(adapters(model), adapter_name, "merge")
    return _replace_adapters(model, lambda layer: merged_weight(layer, chosen))


def unload(model: nn.Module) -> nn.Module:
    """Drop the adapters, keeping the frozen residual weights, in place.

    Each ``LowRankLinear`` becomes an ``nn.Linear`` / ``Conv1D`` holding the frozen base ``W'``
    (a quantized base dequantized, bit-exact, to its dtype): the base PEFT needs for a CorDA or
    PiSSA adapter written by :func:`save_peft_adapter`. Layers holding several named adapters
    hold the original weight: unloading them gives the original model.

    Args:
        model: a model adapted by :func:`corda_kernels.apply`.

    Returns:
        ``model`` itself, holding the residual weights.

    Raises:
        ValueError: ``model`` carries no ``LowRankLinear`` layer.
    """
    return _replace_adapters(model, residual_weight)


def save_merged_model(model: nn.Module, path: str, *, adapter_name: Optional[str] = None, **save_kwargs) -> None:
    """``save_pretrained`` of the merged model, leaving ``model``'s weights unchanged.

    The adapters are swapped for merged plain layers during the save and put back after it. A
    GGUF-loaded model's quantization marks are dropped: its weights are plain floats, saved as such.

    Args:
        model: a model adapted by :func:`corda_kernels.apply`.
        path: the output directory.
        adapter_name: the adapter to merge when the layers hold several (default: the active one).
        **save_kwargs: passed to ``model.save_pretrained`` (e.g. ``safe_serialization``).

    Raises:
        ValueError: ``model`` carries no ``LowRankLinear`` layer, or the adapter to merge is
            unknown or ambiguous (as :func:`merge`).
    """
    hf.forget_gguf_quantization(model)
    with plain_layers(model, "merged", adapter_name):
        model.save_pretrained(path, **save_kwargs)


def save_residual_model(model: nn.Module, path: str, *, dequantize: bool = False, **save_kwargs) -> None:
    """``save_pretrained`` of the residual base (adapters dropped), leaving ``model``'s weights
    unchanged (GGUF quantization marks dropped, as in :func:`save_merged_model`).

    Quantized residuals (``apply(quantize=...)``) are written as a pre-quantized bitsandbytes
    checkpoint (codes and quantization state as ``Linear4bit`` / ``Linear8bitLt`` save them, the
    ``BitsAndBytesConfig`` in ``config.json``, every other linear layer listed in
    ``llm_int8_skip_modules``): ``AutoModelForCausalLM.from_pretrained(path)`` loads the very same
    codes (QLoRA-style base for the PEFT adapter).

    Args:
        model: a model adapted by :func:`corda_kernels.apply`.
        path: the output directory.
        dequantize: write a quantized residual dequantized, in full precision, instead.
        **save_kwargs: passed to ``model.save_pretrained``.

    Raises:
        ValueError: ``model`` carries no ``LowRankLinear`` layer, or its quantized residuals mix
            NF4 and int8.
    """
    hf.forget_gguf_quantization(model)
    layers = adapters(model)
    quantized = {n: layer.weight for n, layer in layers.items() if isinstance(layer.weight, QuantizedWeight)}
    with plain_layers(model, "residual"):
        if not quantized or dequantize:
            model.save_pretrained(path, **save_kwargs)
            return
        bnb_checkpoint.save_pretrained_prequantized(model, path, quantized, **save_kwargs)
