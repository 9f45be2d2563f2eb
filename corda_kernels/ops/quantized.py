"""Quantized frozen weights: :class:`QuantizedWeight`, an ``(out, in)`` weight stored 4-bit (NF4) or
8-bit (int8 row-wise) in bitsandbytes' formats, which :func:`~corda_kernels.ops.lowrank_linear.lowrank_linear`
takes as its base.

:func:`quantize_weight` quantizes with bitsandbytes itself (``quantize_4bit`` NF4, block size 64,
double quantization; ``int8_vectorwise_quant`` as ``Linear8bitLt`` stores its weight), so
transformers' ``BitsAndBytesConfig`` loading of the same weight gives the same codes. Dequantizing
needs no bitsandbytes: :mod:`corda_kernels.kernels.reference.dequantize` is the bit-exact
specification, and the Triton kernels dequantize tiles inside the GEMM's K loop.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import nn

from .._dtypes import ACTIVATION_DTYPES, FLOAT_DTYPES
from ..kernels.reference import dequantize as reference

FORMATS = ("nf4", "int8")
_NF4_BUFFERS = ("packed", "absmax_q", "nested_absmax", "offset", "code", "nested_code")
_INT8_BUFFERS = ("CB", "SCB")
_SAME_SIZE_INT = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
BUFFERS = {"nf4": _NF4_BUFFERS, "int8": _INT8_BUFFERS}
# The base weight's kind, as the registered op carries it: 0 dense, then one code per format.
KINDS = {"nf4": 1, "int8": 2}


class QuantizedCodes(NamedTuple):
    """A quantized ``(out, in)`` base as the op and its kernels read it: the format, the logical shape
    and the storage tensors in :data:`BUFFERS` order (also reachable by name, e.g. ``codes.packed``).
    :meth:`QuantizedWeight.codes` makes one; the registered op rebuilds one from its flat arguments."""

    fmt: str
    shape: torch.Size
    tensors: tuple

    def __getattr__(self, name: str):  # only reached for names the tuple does not define
        if not name.startswith("_") and len(self) == 3:
            names = BUFFERS.get(tuple.__getitem__(self, 0), ())
            if name in names:
                return tuple.__getitem__(self, 2)[names.index(name)]
        raise AttributeError(name)

    @property
    def kind(self) -> int:
        return KINDS[self.fmt]

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The full weight in ``dtype``, per :mod:`corda_kernels.kernels.reference.dequantize` (bitsandbytes'
        own NF4 kernel on the CPU where it applies: bit-identical, faster)."""
        if self.fmt == "int8":
            # the reference's two fp32 products, in place: bit-identical, ~3x faster on a CPU than its
            # int8 x fp32 broadcast (which makes two full-size temporaries)
            weight = self.CB.to(torch.float32).mul_(self.SCB.view(-1, 1)).mul_(reference.INT8_INV_SCALE)
            return weight.to(dtype)
        fast = _bitsandbytes_nf4(self)
        if fast is not None:
            return fast.to(dtype)
        return reference.dequantize_nf4(
            self.packed, self.absmax_q, self.nested_absmax, self.offset, self.code, self.nested_code, self.shape, dtype
        )


def _bitsandbytes_nf4(codes: QuantizedCodes) -> Optional[torch.Tensor]:
    """The fp32 weight by bitsandbytes' own NF4 kernel on CPU (bit-identical to the reference,
    tested; ~20x faster than its table gather there), or None where it does not apply: no
    bitsandbytes, another device, a width it mis-handles, or while tracing (torch.compile
    traces the reference)."""
    if codes.packed.device.type != "cpu" or codes.shape[1] % reference.NF4_BLOCK or torch.compiler.is_compiling():
        return None
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        return None
    nested = bnbf.QuantState(
        absmax=codes.nested_absmax, code=codes.nested_code, blocksize=reference.NESTED_BLOCK, dtype=torch.float32
    )
    state = bnbf.QuantState(
        absmax=codes.absmax_q,
        shape=codes.shape,
        code=codes.code,
        blocksize=reference.NF4_BLOCK,
        quant_type="nf4",
        dtype=torch.float32,
        offset=codes.offset,
        state2=nested,
    )
    return bnbf.dequantize_4bit(codes.packed.view(-1, 1), state)


def require_bitsandbytes():
    """The ``bitsandbytes`` module, or an ImportError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "quantize='nf4'/'int8' needs bitsandbytes: pip install bitsandbytes (or pip install 'corda-kernels[quant]')"
        ) from err
    return bitsandbytes


def check_format(quantize: Optional[str]) -> Optional[str]:
    if quantize is not None and quantize not in FORMATS:
        raise ValueError(f"quantize must be one of {FORMATS} or None, got {quantize!r}")
    return quantize


def check_quantizable(name: str, shape, fmt: str) -> None:
    """Refuse shapes the format cannot store faithfully (the message names the layer)."""
    out_f, in_f = shape
    if fmt == "nf4" and in_f % reference.NF4_BLOCK != 0:
        raise ValueError(
            f"layer {name}: nf4 needs in_features divisible by {reference.NF4_BLOCK}, got {in_f} "
            "(bitsandbytes' CPU dequantization mis-handles other widths); exclude the layer or use quantize='int8'"
        )


class QuantizedWeight(nn.Module):
    """A frozen ``(out, in)`` weight in ``fmt`` (``"nf4"`` or ``"int8"``) that dequantizes to ``dtype``.

    Buffers (persistent, so they travel with ``state_dict`` and ``.to(device)``): NF4 ``packed``
    ``(out·in/2,)`` uint8, ``absmax_q`` ``(out·in/64,)`` uint8, ``nested_absmax`` fp32, ``offset``
    fp32 scalar, ``code (16,)`` and ``nested_code (256,)`` fp32; int8 ``CB (out, in)`` int8 and
    ``SCB (out,)`` fp32. It quacks like the weight tensor where the adapter code reads one
    (``shape``, ``dtype``, ``device``, ``dim()``, ``float()``, ``dequantize()``).
    """

    def __init__(self, fmt: str, shape, dtype: torch.dtype, tensors: dict):
        super().__init__()
        check_format(fmt)
        self.fmt = fmt
        self.shape = torch.Size(shape)
        self.dtype = dtype
        for name in _NF4_BUFFERS if fmt == "nf4" else _INT8_BUFFERS:
            self.register_buffer(name, tensors[name])

    @property
    def device(self) -> torch.device:
        return self.CB.device if self.fmt == "int8" else self.packed.device

    def _apply(self, fn, recurse=True):
        """What ``model.to(...)``, ``.half()``, ``.cuda()`` ... do to the weight: a device move moves
        every buffer; a float dtype cast changes the dtype the weight dequantizes to (the compute
        dtype) and leaves the codes and their statistics as they are (casting the fp32 absmax, code
        tables or row scales would change the weight). The float buffers go through ``fn`` as
        integer views of their bits, which no float cast touches."""
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.device))
        if not probe.is_floating_point() or probe.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"a {self.fmt} quantized weight {tuple(self.shape)} cannot become {probe.dtype}: it dequantizes to "
                f"a float dtype ({', '.join(str(d).replace('torch.', '') for d in FLOAT_DTYPES)})"
            )
        moved = {}
        for name, buf in self._buffers.items():
            view = buf.view(_SAME_SIZE_INT[buf.dtype]) if buf.is_floating_point() else buf
            out = fn(view)
            if out.dtype != view.dtype:  # e.g. Module.type(dtype), which casts integer tensors too
                raise TypeError(
                    f"a {self.fmt} quantized weight {tuple(self.shape)} keeps its codes: {name} ({buf.dtype}) "
                    f"cannot become {out.dtype}"
                )
            moved[name] = out.view(buf.dtype) if buf.is_floating_point() else out
        self._buffers.update(moved)
        self.dtype = probe.dtype
        return self

    def dim(self) -> int:
        return 2

    @property
    def requires_grad(self) -> bool:
        return False

    def codes(self) -> QuantizedCodes:
        """The storage as the op reads it (format, shape, tensors; no copy)."""
        return QuantizedCodes(self.fmt, self.shape, tuple(getattr(self, n) for n in BUFFERS[self.fmt]))

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The full weight in ``dtype`` (default: the dtype it was quantized from), per the reference."""
        return self.codes().dequantize(dtype or self.dtype)

    def _bitsandbytes_nf4(self) -> Optional[torch.Tensor]:
        """bitsandbytes' NF4 dequantization of this weight on CPU, or None (see :func:`_bitsandbytes_nf4`)."""
        return _bitsandbytes_nf4(self.codes())

    def float(self) -> torch.Tensor:
        return self.dequantize(torch.float32)

    def stand_in(self) -> torch.Tensor:
        """A storage-free ``(out, in)`` tensor of the weight's dtype and device, for shape/dtype checks."""
        return torch.empty((), dtype=self.dtype, device=self.device).expand(self.shape)

    def storage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"fmt={self.fmt}, shape={tuple(self.shape)}, dtype={self.dtype}"


def quantize_weight(weight: torch.Tensor, fmt: str, name: str = "weight") -> QuantizedWeight:
    """Quantize ``weight (out, in)`` (fp16/bf16/fp32) with bitsandbytes into ``fmt``.

    NF4: ``bitsandbytes.functional.quantize_4bit(blocksize=64, compress_statistics=True,
    quant_type="nf4")``; int8: ``int8_vectorwise_quant`` (no outlier threshold), as
    ``Linear8bitLt(has_fp16_weights=False)`` quantizes its weight. Runs where bitsandbytes has a
    backend for ``weight.device`` (CPU and CUDA in current releases).
    """
    check_format(fmt)
    if weight.dim() != 2 or weight.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{name}: needs a 2-D fp16/bf16/fp32 weight, got {weight.dtype} {tuple(weight.shape)}")
    check_quantizable(name, weight.shape, fmt)
    require_bitsandbytes()
    import bitsandbytes.functional as bnbf

    w = weight.detach().contiguous()
    if fmt == "int8":
        # bitsandbytes' CUDA kernel takes fp16 only (bf16/fp32 raise there); its CPU kernel takes any
        # float dtype, rounding the same formula (round(127 · w / absmax_row)), so other dtypes go
        # through the CPU and the codes come back to w's device.
        src = w if w.device.type == "cpu" or w.dtype == torch.float16 else w.cpu()
        CB, SCB, _ = bnbf.int8_vectorwise_quant(src.clone())
        tensors = {"CB": CB.contiguous().to(w.device), "SCB": SCB.float().contiguous().to(w.device)}
        return QuantizedWeight("int8", w.shape, w.dtype, tensors)
    packed, state = bnbf.quantize_4bit(w, blocksize=reference.NF4_BLOCK, compress_statistics=True, quant_type="nf4")
    nested = state.state2
    if state.blocksize != reference.NF4_BLOCK or nested.blocksize != reference.NESTED_BLOCK:
        raise RuntimeError(f"{name}: bitsandbytes used blocks {state.blocksize}/{nested.blocksize}, expected 64/256")
    tensors = {
        "packed": packed.reshape(-1).view(torch.uint8).contiguous(),
        "absmax_q": state.absmax.reshape(-1).contiguous(),
        "nested_absmax": nested.absmax.float().reshape(-1).contiguous(),
        "offset": torch.as_tensor(state.offset, dtype=torch.float32, device=w.device).reshape(()),
        "code": state.code.float().to(w.device).contiguous(),
        "nested_code": nested.code.float().to(w.device).contiguous(),
    }
    return QuantizedWeight("nf4", w.shape, w.dtype, tensors)
