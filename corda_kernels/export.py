"""Stage 4, export: back to plain Hugging Face weights, or to a PEFT LoRA adapter.

- :func:`merge` folds every adapter into its layer (``W' + scale·delta``) and restores plain
  ``nn.Linear`` / ``Conv1D`` modules: ``save_pretrained`` then writes an ordinary checkpoint.
- :func:`unload` drops the adapters and keeps the frozen residual ``W'`` (the base model PEFT needs
  for CorDA/PiSSA adapters); :func:`save_residual_model` saves it without changing ``model`` (a
  quantized residual as a pre-quantized bitsandbytes checkpoint that transformers loads 4/8-bit).
- :func:`save_peft_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
  ``peft.PeftModel.from_pretrained(residual_base, path)`` loads with the same outputs. With
  ``initial=`` (a directory written by this function right after ``apply``) it writes instead the
  conversion PEFT offers for PiSSA/CorDA: a rank-2r LoRA ``[A | A₀], [B | −B₀]`` that applies to
  the original, unmodified base weights.
Row/column index sets and SiVA's diagonal are expanded into dense LoRA factors on export.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from typing import Iterator, Optional

import torch
from torch import nn

from . import _backend
from .integrations import hf
from .nn import LowRankLinear
from .ops.quantized import QuantizedWeight

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def adapters(model: nn.Module) -> dict[str, LowRankLinear]:
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


def merged_weight(layer: LowRankLinear) -> torch.Tensor:
    """``W' + scale·delta`` computed in fp32 and cast once to the weight dtype."""
    with torch.no_grad():
        if getattr(layer, "merged", False):
            return layer.weight.detach().clone()
        return (layer.weight.float() + layer.delta_weight()).to(layer.weight.dtype)


@contextlib.contextmanager
def plain_layers(model: nn.Module, kind: str) -> Iterator[nn.Module]:
    """Temporarily replace adapters by plain layers (``kind``: "merged" or "residual")."""
    layers = adapters(model)
    for name, layer in layers.items():
        weight = merged_weight(layer) if kind == "merged" else residual_weight(layer)
        hf.set_submodule(model, name, plain_layer(layer, weight))
    try:
        yield model
    finally:
        for name, layer in layers.items():
            hf.set_submodule(model, name, layer)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer, in place; the model becomes a plain HF model.

    Each ``LowRankLinear`` becomes an ``nn.Linear`` (or ``Conv1D``, as it came) holding
    ``W' + s·delta``, summed in fp32 and cast once to the weight's dtype. GGUF quantization marks
    are dropped, so ``save_pretrained`` writes an ordinary checkpoint.

    Args:
        model: a model adapted by :func:`corda_kernels.apply` (or ``apply_blockwise``).

    Returns:
        ``model`` itself, without adapters.

    Raises:
        ValueError: ``model`` carries no ``LowRankLinear`` layer.
    """
    for name, layer in adapters(model).items():
        hf.set_submodule(model, name, plain_layer(layer, merged_weight(layer)))
    hf.forget_gguf_quantization(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Drop the adapters, keeping the frozen residual weights, in place.

    Each ``LowRankLinear`` becomes an ``nn.Linear`` / ``Conv1D`` holding the frozen base ``W'``
    (a quantized base dequantized, bit-exact, to its dtype): the base PEFT needs for a CorDA or
    PiSSA adapter written by :func:`save_peft_adapter`.

    Args:
        model: a model adapted by :func:`corda_kernels.apply`.

    Returns:
        ``model`` itself, holding the residual weights.

    Raises:
        ValueError: ``model`` carries no ``LowRankLinear`` layer.
    """
    for name, layer in adapters(model).items():
        hf.set_submodule(model, name, plain_layer(layer, residual_weight(layer)))
    hf.forget_gguf_quantization(model)
    return model


def save_merged_model(model: nn.Module, path: str, **save_kwargs) -> None:
    """``save_pretrained`` of the merged model, leaving ``model``'s weights unchanged.

    The adapters are swapped for merged plain layers during the save and put back after it. A
    GGUF-loaded model's quantization marks are dropped: its weights are plain floats, saved as such.

    Args:
        model: a model adapted by :func:`corda_kernels.apply`.
        path: the output directory.
        **save_kwargs: passed to ``model.save_pretrained`` (e.g. ``safe_serialization``).

    Raises:
        ValueError: ``model`` carries no ``LowRankLinear`` layer.
    """
    hf.forget_gguf_quantization(model)
    with plain_layers(model, "merged"):
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
        state = model.state_dict()
        for name, weight in quantized.items():
            state.update(_bnb_state(name, weight))
        config = _bnb_config(model, quantized)
        model.config.quantization_config = config
        try:
            model.save_pretrained(path, state_dict=state, **save_kwargs)
        finally:
            del model.config.quantization_config


def _bnb_state(name: str, weight: QuantizedWeight) -> dict:
    """``name``'s state-dict entries as bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` save them."""
    if weight.fmt == "int8":
        return {f"{name}.weight": weight.CB, f"{name}.SCB": weight.SCB, f"{name}.weight_format": torch.tensor(0).byte()}
    from bitsandbytes.functional import QuantState

    nested = QuantState(absmax=weight.nested_absmax, code=weight.nested_code, blocksize=256, dtype=torch.float32)
    state = QuantState(
        absmax=weight.absmax_q,
        shape=weight.shape,
        code=weight.code,
        blocksize=64,
        quant_type="nf4",
        dtype=weight.dtype,
        offset=weight.offset,
        state2=nested,
    )
    out = {f"{name}.weight": weight.packed.reshape(-1, 1)}
    out.update({f"{name}.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return out


def _bnb_config(model: nn.Module, quantized: dict):
    """The ``BitsAndBytesConfig`` that loads ``quantized``'s layers and keeps every other linear as it is."""
    from transformers import BitsAndBytesConfig

    formats = {w.fmt for w in quantized.values()}
    if len(formats) != 1:
        raise ValueError(f"save_residual_model: the residuals mix quantization formats {sorted(formats)}")
    skip = sorted({n for n, m in model.named_modules() if hf.is_linear_like(m) and n not in quantized} | {"lm_head"})
    dtype = next(iter(quantized.values())).dtype
    if formats == {"int8"}:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        llm_int8_skip_modules=skip,
    )


def dense_factors(layer: LowRankLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT-style dense ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` with ``diag`` folded in A."""
    with torch.no_grad():
        A, B = layer.A.detach(), layer.B.detach()
        if layer.diag is not None:
            A = A * layer.diag.detach().unsqueeze(1)
        if layer.col_index is not None:
            dense = A.new_zeros(A.shape[0], layer.in_features)
            dense[:, layer.col_index] = A
            A = dense
        if layer.row_index is not None:
            dense = B.new_zeros(layer.out_features, B.shape[1])
            dense[layer.row_index] = B
            B = dense
        return A.contiguous(), B.contiguous()


# PEFT task types by the model class's suffix (AutoPeftModelFor* needs one to pick the model class).
_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def task_type(model: nn.Module) -> Optional[str]:
    """PEFT's ``task_type`` for ``model``'s class (None when the class name says nothing)."""
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES if name.endswith(suffix)), None)


def _lora_config(
    layers: dict[str, LowRankLinear], base_model_name_or_path: Optional[str], rank_mult: int, task: Optional[str]
):
    try:
        from peft import LoraConfig
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("saving a PEFT adapter needs `pip install peft`") from exc
    ranks = {n: layer.rank * rank_mult for n, layer in layers.items()}
    alphas = {n: layer.scale * ranks[n] for n, layer in layers.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropouts = {float(getattr(layer, "dropout", 0.0)) for layer in layers.values()}
    if len(dropouts) > 1:  # PEFT's LoraConfig has one lora_dropout
        _backend.warn(
            f"the adapters use dropouts {sorted(dropouts)}; PEFT's adapter_config.json holds one, written as "
            f"lora_dropout={max(dropouts)}: training the exported adapter will use it on every layer",
            stacklevel=4,
        )
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=sorted(layers),
        rank_pattern={n: v for n, v in ranks.items() if v != r},
        alpha_pattern={n: v for n, v in alphas.items() if v != alpha},
        lora_dropout=max(dropouts),
        bias="none",
        init_lora_weights=True,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task,
    )


def _original_id(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def adapter_base(model: nn.Module, layers: dict[str, LowRankLinear], residual_model: Optional[str]) -> Optional[str]:
    """What an adapter without ``initial=`` applies to: ``residual_model`` when given; the original
    model when no layer's base weight was changed (LoRA-style methods: the residual is the
    original); otherwise a value that says what is needed, so PEFT never loads the adapter onto the
    original weights (which would silently give wrong outputs)."""
    if residual_model is not None:
        return os.fspath(residual_model)
    original = _original_id(model)
    if not any(getattr(layer, "base_changed", True) for layer in layers.values()):
        return original
    return f"residual model of {original or type(model).__name__} (save it with corda_kernels.save_residual_model)"


def save_peft_adapter(
    model: nn.Module,
    path: str,
    *,
    base_model_name_or_path: Optional[str] = None,
    initial: Optional[str] = None,
    residual_model: Optional[str] = None,
) -> None:
    """Write a PEFT LoRA adapter of ``model``'s adapters to directory ``path``.

    Writes ``adapter_config.json``, ``adapter_model.safetensors`` (fp32 or the factors' dtype;
    row/column masks and SiVA's diagonal expanded to dense ``lora_A (r, in)`` / ``lora_B (out, r)``)
    and ``corda_kernels.json`` (what the adapter applies to). Without ``initial`` the adapter
    applies to the residual base (:func:`save_residual_model`); with ``initial`` it is converted,
    as PEFT's ``path_initial_model_for_weight_conversion`` does, to a rank-2r LoRA
    ``[A | A₀], [B | −B₀]`` (scaling kept) that applies to the original base weights.

    Args:
        model: a model adapted by :func:`corda_kernels.apply` (trained or not).
        path: the output directory.
        base_model_name_or_path: the value written to ``adapter_config.json``; overrides the
            defaults below.
        initial: a directory this function wrote right after ``apply`` (the initial adapter);
            the adapter then names the original model.
        residual_model: the directory the residual was or will be saved to (as PEFT resolves it:
            from the working directory or the hub). When not given, ``base_model_name_or_path``
            says that the residual model is needed, never the original id, except for methods that
            left the base weights unchanged (LoRA, asymmetric, Partial-LoRA): loading a CorDA or
            PiSSA adapter onto the original weights would silently give wrong outputs.

    Raises:
        ValueError: ``model`` carries no ``LowRankLinear`` layer, or ``initial`` lacks one of its
            layers' factors (saved from another model).
        ImportError: peft is not installed.
    """
    from safetensors.torch import load_file, save_file

    layers = adapters(model)
    tensors = {}
    for name, layer in layers.items():
        A, B = dense_factors(layer)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.cpu()
    if initial is not None:
        start = load_file(os.path.join(initial, ADAPTER_WEIGHTS))
        missing = sorted(k for k in tensors if k not in start)
        if missing:
            raise ValueError(
                f"initial adapter at {initial} lacks {missing[0]} (and {len(missing) - 1} more); "
                "was it saved from this model?"
            )
        for key in list(tensors):
            t0 = start[key].to(tensors[key].dtype)
            tensors[key] = torch.cat([tensors[key], t0], 0) if ".lora_A." in key else torch.cat([tensors[key], -t0], 1)
    if base_model_name_or_path is None:
        base_model_name_or_path = (
            _original_id(model) if initial is not None else adapter_base(model, layers, residual_model)
        )
    config = _lora_config(layers, base_model_name_or_path, 2 if initial is not None else 1, task_type(model))
    os.makedirs(path, exist_ok=True)
    config.save_pretrained(path)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    info = {
        "applies_to": "original base" if initial else "residual base",
        "base_model_name_or_path": base_model_name_or_path,
        "original_model": _original_id(model),
        "layers": len(layers),
    }
    with open(os.path.join(path, "corda_kernels.json"), "w") as fh:
        json.dump(info, fh)
