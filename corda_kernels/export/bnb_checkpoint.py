"""Export of a quantized residual as a pre-quantized bitsandbytes checkpoint (the storage format).

What: :func:`save_pretrained_prequantized` writes a model whose quantized residuals
(:class:`~corda_kernels.ops.quantized.QuantizedWeight`, NF4 or int8) are stored as bitsandbytes'
``Linear4bit`` / ``Linear8bitLt`` save them (:func:`layer_state`), with the ``BitsAndBytesConfig``
that loads them in ``config.json`` (:func:`loading_config`). Why: transformers'
``from_pretrained`` then loads the very same codes, a QLoRA-style base for the PEFT adapter, with
no re-quantization.

Only the storage format lives here: the codes are made by :mod:`corda_kernels.ops.quantized`, refined
by :mod:`corda_kernels.decomposition.refinement` and dequantized, as specified, by
:mod:`corda_kernels.kernels.reference.dequantize`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..integrations import hf
from ..ops.quantized import QuantizedWeight


def save_pretrained_prequantized(
    model: nn.Module, path: str, quantized: dict[str, QuantizedWeight], **save_kwargs
) -> None:
    """``model.save_pretrained(path)`` with the layers named in ``quantized`` (plain layers in
    ``model`` at this point) stored as their bitsandbytes codes, and the ``BitsAndBytesConfig``
    that loads them set on ``model.config`` for the save only."""
    state = model.state_dict()
    for name, weight in quantized.items():
        state.update(layer_state(name, weight))
    config = loading_config(model, quantized)
    model.config.quantization_config = config
    try:
        model.save_pretrained(path, state_dict=state, **save_kwargs)
    finally:
        del model.config.quantization_config


def layer_state(name: str, weight: QuantizedWeight) -> dict:
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


def loading_config(model: nn.Module, quantized: dict):
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
