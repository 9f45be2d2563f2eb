"""bitsandbytes' quantized linear layers read in place as the fused op's quantized base.

A ``bitsandbytes.nn.Linear4bit`` (NF4, block size 64, double quantization) or ``Linear8bitLt``
(int8 row-wise, ``has_fp16_weights=False``) holds its weight in exactly the storage
:class:`~corda_kernels.ops.quantized.QuantizedCodes` describes: :func:`codes` returns that record
over bitsandbytes' own tensors (views, no copy; read again on every call, so ``.to(device)`` and
bitsandbytes moving ``CB`` / ``SCB`` into the layer's ``state`` are followed), and
:func:`~corda_kernels.ops.lowrank_linear.fused` dequantizes it inside the op (CPU: bitsandbytes' own
NF4 kernel; Triton: tiles in the GEMM's K loop). No full-precision copy of the weight is kept.

Mapping (bitsandbytes 0.50): NF4 ``weight.data`` ``(out·in/2, 1)`` uint8 -> ``packed``,
``quant_state.absmax`` (uint8 codes) -> ``absmax_q``, ``quant_state.state2.absmax`` ->
``nested_absmax``, ``quant_state.offset``, ``quant_state.code``, ``quant_state.state2.code``;
int8 ``weight.data`` ``(out, in)`` int8 -> ``CB``, ``weight.SCB`` (or ``state.SCB`` once the layer
ran) -> ``SCB``.

Numerics: ``Linear4bit`` computes ``x·dequant(W)ᵀ`` in its ``compute_dtype`` (the patched layer does
the same: :func:`compute_dtype`). ``Linear8bitLt`` on the CPU computes ``x·dequant(W)ᵀ`` in training
mode, as the op does; in eval mode bitsandbytes quantizes ``x`` to int8 as well (LLM.int8(), with
outlier columns above ``threshold`` in fp16), which the op does not: its result is the exact
product with the dequantized weight.

:func:`refusal` says, naming the layer, why a layer's storage cannot be read: another quant type,
block size or storage dtype, no double quantization, NF4 rows of a width not divisible by 64, an
unquantized or fp16-weight layer, a weight bitsandbytes repacked for its CPU inference kernel,
inconsistent sizes, an unsupported ``compute_dtype``.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from .._dtypes import ACTIVATION_DTYPES
from ..kernels.reference.dequantize import NESTED_BLOCK, NF4_BLOCK
from ..ops.quantized import QuantizedCodes


def fmt(base: nn.Module) -> Optional[str]:
    """``"nf4"`` for a bitsandbytes ``Linear4bit``, ``"int8"`` for a ``Linear8bitLt``, else None (never
    imports bitsandbytes: a layer of it exists only once it is imported)."""
    bnb = sys.modules.get("bitsandbytes.nn")
    if bnb is None:
        return None
    if isinstance(base, bnb.Linear4bit):
        return "nf4"
    if isinstance(base, bnb.Linear8bitLt):
        return "int8"
    return None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _nf4_refusal(base: nn.Module) -> str:
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return "has no bitsandbytes quant_state (its weight is not quantized: load it with a BitsAndBytesConfig)"
    if getattr(state, "packing_format_for_cpu", False):
        return (
            "holds its weight in bitsandbytes' CPU inference layout (packing_format_for_cpu, set by an eval-mode "
            "forward without gradients); patch before running the model, or reload it"
        )
    if state.quant_type != "nf4":
        return f"is 4-bit {state.quant_type}; the fused op reads nf4 only (bnb_4bit_quant_type='nf4')"
    if state.blocksize != NF4_BLOCK:
        return f"uses 4-bit blocks of {state.blocksize}; the fused op reads blocks of {NF4_BLOCK}"
    nested = state.state2 if state.nested else None
    if nested is None:
        return "has no double quantization; the fused op reads nf4 with bnb_4bit_use_double_quant=True only"
    if nested.blocksize != NESTED_BLOCK:
        return f"double-quantizes in blocks of {nested.blocksize}; the fused op reads blocks of {NESTED_BLOCK}"
    if weight.dtype != torch.uint8:
        return f"stores its 4-bit codes as {weight.dtype}; the fused op reads uint8 (bnb_4bit_quant_storage=uint8)"
    shape = tuple(state.shape)
    if len(shape) != 2:
        return f"has a quant_state of shape {shape}, not (out_features, in_features)"
    if shape[1] % NF4_BLOCK:
        return (
            f"has in_features={shape[1]}, not divisible by {NF4_BLOCK}: bitsandbytes' CPU dequantization "
            "mis-handles such rows (its result and the fused op's would differ); exclude the layer"
        )
    n = shape[0] * shape[1]
    n_blocks = _ceil_div(n, NF4_BLOCK)
    sizes = {
        "packed codes": (weight.numel(), _ceil_div(n, 2)),
        "absmax": (state.absmax.numel(), n_blocks),
        "nested absmax": (nested.absmax.numel(), _ceil_div(n_blocks, NESTED_BLOCK)),
        "code table": (state.code.numel(), 16),
        "nested code table": (nested.code.numel(), 256),
    }
    for what, (got, want) in sizes.items():
        if got != want:
            return f"has {got} {what} for a {shape} weight, expected {want} (unreadable bitsandbytes storage)"
    if state.absmax.dtype != torch.uint8 or nested.absmax.dtype != torch.float32:
        return (
            f"has absmax {state.absmax.dtype} / nested absmax {nested.absmax.dtype}, expected uint8 / float32 "
            "(unreadable bitsandbytes storage)"
        )
    if base.compute_dtype is not None and base.compute_dtype not in ACTIVATION_DTYPES:
        return f"computes in {base.compute_dtype}; the fused op computes in fp32/fp16/bf16"
    return ""


def _int8_parts(base: nn.Module):
    weight = base.weight
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(base.state, "SCB", None)
    return weight.data, scb


def _int8_refusal(base: nn.Module) -> str:
    if base.state.has_fp16_weights:
        return "keeps fp16 weights (has_fp16_weights=True); the fused op reads int8 codes"
    cb, scb = _int8_parts(base)
    shape = (base.out_features, base.in_features)
    if cb.dtype != torch.int8 or tuple(cb.shape) != shape:
        return (
            f"holds a {cb.dtype} weight {tuple(cb.shape)}, not int8 codes {shape} "
            "(not quantized yet, or unreadable bitsandbytes storage)"
        )
    if scb is None or scb.dtype != torch.float32 or tuple(scb.shape) != shape[:1]:
        got = "no row scales" if scb is None else f"row scales {scb.dtype} {tuple(scb.shape)}"
        return f"has {got}, expected float32 ({shape[0]},) (unreadable bitsandbytes storage)"
    return ""


def refusal(name: str, base: nn.Module) -> str:
    """Why ``base`` (a bitsandbytes layer) cannot run as the op's quantized base, naming layer
    ``name``; empty when it can."""
    kind = fmt(base)
    why = _nf4_refusal(base) if kind == "nf4" else _int8_refusal(base) if kind == "int8" else "is not bitsandbytes"
    if not why:
        return ""
    what = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}.get(kind, type(base).__name__)
    return f"layer {name}'s bitsandbytes {what} base {why}"


def codes(base: nn.Module, kind: str) -> Optional[QuantizedCodes]:
    """The layer's storage as the op reads it, or None when it cannot be read now (bitsandbytes
    repacked it for its CPU inference kernel, or the layer's state changed since patching)."""
    if kind == "nf4":
        state = getattr(base.weight, "quant_state", None)
        if state is None or getattr(state, "packing_format_for_cpu", False) or not state.nested:
            return None
        nested = state.state2
        packed = base.weight.data.reshape(-1)
        offset = state.offset if isinstance(state.offset, torch.Tensor) else torch.tensor(state.offset)
        tensors = (packed, state.absmax, nested.absmax, offset.reshape(()), state.code, nested.code)
        return QuantizedCodes("nf4", torch.Size(state.shape), tensors)
    cb, scb = _int8_parts(base)
    if cb.dtype != torch.int8 or scb is None:
        return None
    return QuantizedCodes("int8", torch.Size(cb.shape), (cb, scb))


def compute_dtype(base: nn.Module, kind: str, x_dtype: torch.dtype) -> torch.dtype:
    """The dtype bitsandbytes multiplies in for an input of ``x_dtype`` outside autocast: a
    ``Linear4bit``'s ``compute_dtype`` when set (it casts ``x`` to it and the result back), else
    ``x_dtype``."""
    if kind == "nf4" and base.compute_dtype is not None:
        return base.compute_dtype
    return x_dtype
