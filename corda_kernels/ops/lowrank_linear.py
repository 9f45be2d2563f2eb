"""The fused low-rank linear op: ``y = x·Wᵀ + b + s · scatter_rows((drop(x_c)·A_cᵀ ⊙ d) · B_rᵀ)``.

Public calls:

- :func:`lowrank_linear` ``(x, weight, A, B, *, scale, bias, row_index, col_index, diag, dropout,
  generator, seed, validate_indices) -> y``: ``x (..., in)``, ``weight (out, in)`` dense or a
  :class:`~corda_kernels.ops.quantized.QuantizedWeight`, ``A (r, n_cols)`` compact over
  ``col_index`` (input features; all when None), ``B (n_rows, r)`` compact over ``row_index``
  (output features; all when None), ``diag (r,)``, ``bias (out,)``; all float tensors of one dtype
  (fp16/bf16/fp32/fp64) on one device, indices int64, except that ``A``, ``B`` and ``diag`` may be
  fp32 on a 16-bit ``weight`` (rounding rule: the reference module's docstring). Returns
  ``(..., out)`` in ``x``'s dtype.
- :func:`fused` ``(x, weight, A, B, opts)``: the same without validation, the optional parts as one
  :class:`Options` record (for modules and patched layers that validated once).
- :func:`check_factors`, :func:`check_scale`, :func:`check_dropout`: the validation.
- :func:`delta_weight`: the dense fp32 update ``s · scatter(B · diag(d) · A)``.
- :func:`dropout_mask`: the keep-mask a given seed draws (to replay dropout in tests).

One op, one record. Every layer passes ``(x, weight, A, B, opts)`` with :class:`Options` =
``(scale, bias, row_index, col_index, diag, dropout, seed)`` in that order: this module, the
registered op's schema (flattened in the same order), its autograd, and the reference, torch and
Triton kernels. The base weight is dense or quantized codes
(:class:`~corda_kernels.ops.quantized.QuantizedCodes`); the registered op carries it as a tensor
list plus its kind and shape, so one ``corda_kernels::lowrank_linear`` (and its backward) covers
both.

One place chooses how a call runs: :func:`_plan` picks the backend (``triton``, ``torch``,
``reference``; see :mod:`corda_kernels._backend`) from the device, dtype and call kind, and, for a
quantized base, whether Triton dequantizes inside the GEMM or the base is dequantized once per
pass. :func:`fused` picks the autograd wrapper: the registered op under ``torch.compile``,
functorch transforms or tensor subclasses; in eager mode a plain ``autograd.Function`` with the
same bodies (the dispatcher costs tens of µs per call on a CPU), or, for small fp32/fp64 training
calls on the torch backend without index sets or dropout, differentiable torch ops (backward in
autograd's C++ engine).

Autograd: only inputs that require grad get one. ``x`` is saved only when ``weight`` or ``A``
needs a gradient; ``u = drop(x_c)·Aᵀ`` (``(N, r)`` fp32) only when ``B`` or ``diag`` does. So
asymmetric LoRA (A frozen) keeps ``N·r`` numbers per layer, not ``N·in``. A quantized base is
never differentiated and no full-precision copy of it is kept between forward and backward.
Dropout masks are a counter-based hash of ``(seed, token, column)``, regenerated in the backward
instead of saved, and identical on every backend.

Autocast (CPU and CUDA): ``x``, a dense ``weight`` and ``bias`` are cast to the autocast dtype (as
``nn.Linear`` does), fp32 factors stay fp32 (rounded inside the kernels, their gradients fp32), a
quantized base dequantizes to that dtype; the op then runs in that dtype, accumulating in fp32.
fp64 inputs are not cast.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Union

import torch

from .. import _backend
from .._dtypes import ACTIVATION_DTYPES, accumulation_dtype
from ..kernels.reference import lowrank_linear as reference
from ..kernels.reference.lowrank_linear import Options
from ..kernels.torch import lowrank_linear as torch_kernel
from ._checks import check_beside_weight, check_input
from ._checks import shape as _shape
from ._registry import needs, register_autocast, register_op
from .quantized import BUFFERS, KINDS, QuantizedCodes, QuantizedWeight

__all__ = ["Options", "lowrank_linear", "fused", "check_factors", "check_scale", "check_dropout", "delta_weight"]

# GPU preference, fastest first, by call kind. H200, bf16, forward + backward at 4096x4096 and
# 4096x11008, 8k tokens, r 16 / 128 (bench/results/gpu-h200-2026-12-04.md): without index sets or
# dropout the torch composition (cuBLAS GEMMs) took 0.70-0.80x the Triton fused kernels' time; calls
# with index sets or dropout keep Triton (its in-kernel gather/scatter and hashed dropout; the torch
# composition was not measured there).
_CUDA_PREFERENCE = {True: ("torch", "triton", "reference"), False: ("triton", "torch", "reference")}
_CPU_PREFERENCE = ("torch", "reference")
# A quantized base on Triton is dequantized tile by tile inside the GEMM's K loop, once per token
# tile: up to this many tokens (two 64-row tiles) that beats dequantizing W once; above it W is
# dequantized once per pass into a temporary and the dense path runs (the H200 run at 8k tokens:
# in-kernel 95 ms vs 1.1 ms for bitsandbytes' dequantize + matmul). CORDA_KERNELS_BACKEND=triton
# keeps the in-kernel path at any size.
QUANT_IN_KERNEL_MAX_TOKENS = 128
_SEED_RANGE = 2**31 - 1
_DENSE = 0
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Training calls in these dtypes (no rounding between products) on the torch backend, without index
# sets or dropout, run as differentiable torch ops (torch_kernel.forward_autograd): same products,
# backward in autograd's C++ engine instead of a Python autograd.Function ...
_NATIVE_DTYPES = (torch.float32, torch.float64)
# ... for inputs up to this size: there the Function's per-call Python cost (~40 µs) dominates; on
# larger ones its in-place accumulation of dx wins by a few percent (bench/results/speed.md, training).
_NATIVE_MAX_ELEMENTS = 1 << 18


# ---------------------------------------------------------------------------------------------
# the one place that chooses how a call runs


def _available(x: torch.Tensor) -> dict[str, bool]:
    interpreted_bf16 = x.device.type == "cpu" and x.dtype == torch.bfloat16  # the interpreter cannot do bf16
    return {
        "triton": x.dtype in ACTIVATION_DTYPES and not interpreted_bf16 and _backend.triton_runs_on(x.device),
        "torch": True,
    }


_BACKEND_CACHE: dict[tuple, str] = {}


def _backend_for(x: torch.Tensor, plain: bool = True) -> str:
    """The backend for ``x``'s device and dtype and the call's kind (``plain``: no index sets, no
    dropout), memoized per environment (a per-call hot path)."""
    key = (x.device.type, x.dtype, plain, os.environ.get(_backend.ENV_BACKEND), os.environ.get("TRITON_INTERPRET"))
    backend = _BACKEND_CACHE.get(key)
    if backend is None:
        preference = _CUDA_PREFERENCE[plain] if x.device.type == "cuda" else _CPU_PREFERENCE
        backend = _backend.choose("lowrank_linear", x.device, _available(x), preference)
        _BACKEND_CACHE[key] = backend
    return backend


def _plan(x: torch.Tensor, weight, opts: Options) -> tuple[str, Optional[str]]:
    """``(backend, quantized)`` for one call: ``quantized`` is None for a dense base, ``"in-kernel"``
    (Triton dequantizes tiles inside the GEMM) or ``"dequantize"`` (the base is dequantized once per
    pass, then the dense path). Forward and backward of a call plan alike."""
    if isinstance(weight, torch.Tensor):
        return _backend_for(x, opts.plain), None
    tokens = x.numel() // max(x.shape[-1], 1)
    if _backend_for(x, False) == "triton" and (
        tokens <= QUANT_IN_KERNEL_MAX_TOKENS or _backend.requested_backend() == "triton"
    ):
        return "triton", "in-kernel"
    return _backend_for(x, opts.plain), "dequantize"


def _kernels(backend: str):
    if backend == "triton":
        from ..kernels.triton import lowrank_linear as triton_kernel

        return triton_kernel
    return torch_kernel if backend == "torch" else reference


def _forward(x, weight, A, B, opts: Options):
    """``(y, u)`` of one call, as :func:`_plan` says (the body of every wrapper)."""
    backend, quantized = _plan(x, weight, opts)
    if quantized == "dequantize":
        weight = weight.dequantize(x.dtype)
    return _kernels(backend).forward(x, weight, A, B, opts)


def _backward(dy, x, weight, A, B, u, opts: Options, needs):
    """``[dx, dweight, dA, dB, ddiag, dbias]`` of one call (None where ``needs`` says so)."""
    backend, quantized = _plan(dy, weight, opts)
    if quantized == "dequantize":
        weight = weight.dequantize(dy.dtype)
    elif quantized == "in-kernel":
        dy = dy.contiguous()
    return _kernels(backend).backward(dy, x, weight, A, B, u, opts, needs)


# ---------------------------------------------------------------------------------------------
# the registered op: one schema for dense and quantized bases, the options flattened in order


def _flatten_base(weight) -> tuple[list, int, list]:
    """``(tensors, kind, shape)`` of a base: a dense tensor, or quantized codes / a QuantizedWeight."""
    if isinstance(weight, torch.Tensor):
        return [weight], _DENSE, list(weight.shape)
    if isinstance(weight, QuantizedWeight):  # its buffers directly (traceable: no codes object is built)
        return [getattr(weight, name) for name in BUFFERS[weight.fmt]], KINDS[weight.fmt], list(weight.shape)
    return list(weight.tensors), weight.kind, list(weight.shape)


_FORMATS = {v: k for k, v in KINDS.items()}


def _base(tensors: list, kind: int, shape: list):
    return tensors[0] if kind == _DENSE else QuantizedCodes(_FORMATS[kind], torch.Size(shape), tuple(tensors))


# The schema, written once: the base (dense: one tensor, kind 0; quantized: its storage tensors, kind
# and (out, in) shape), the factors, then Options' fields in their order.
_BASE_SCHEMA = "Tensor[] base, int base_kind, int[] base_shape, Tensor A, Tensor B"
_OPTIONS_SCHEMA = (
    "float scale, Tensor? bias, Tensor? row_index, Tensor? col_index, Tensor? diag, float dropout, Tensor? seed"
)


def _op_forward(x, base, base_kind, base_shape, A, B, *opts):
    """``(y, u)`` (the registered op's body)."""
    return _forward(x, _base(base, base_kind, base_shape), A, B, Options(*opts))


def _op_forward_fake(x, base, base_kind, base_shape, A, B, *opts):
    n_tokens = math.prod(x.shape[:-1])
    y = x.new_empty(*x.shape[:-1], base_shape[0])
    return y, x.new_empty(n_tokens, A.shape[0], dtype=accumulation_dtype(x.dtype))


def _op_backward(dy, x, base, base_kind, base_shape, A, B, u, *rest):
    """``(dx, dweight, dA, dB, ddiag, dbias)``; entries not flagged in ``needs`` are empty tensors."""
    *opts, needs = rest
    grads = _backward(dy, x, _base(base, base_kind, base_shape), A, B, u, Options(*opts), needs)
    return tuple(dy.new_empty(0) if gr is None else gr for gr in grads)


def _op_backward_fake(dy, x, base, base_kind, base_shape, A, B, u, *rest):
    *opts, needs = rest
    opts = Options(*opts)
    weight_like = base[0] if base_kind == _DENSE else dy
    shapes = (
        (*dy.shape[:-1], base_shape[1]),
        tuple(base_shape),
        tuple(A.shape),
        tuple(B.shape),
        (A.shape[0],),
        (base_shape[0],),
    )
    like = (
        dy,
        weight_like,
        A,
        B,
        opts.diag if opts.diag is not None else dy,
        opts.bias if opts.bias is not None else dy,
    )
    return tuple(t.new_empty(shape if need else (0,)) for t, shape, need in zip(like, shapes, needs))


_lowrank_linear_op, _lowrank_linear_backward_op = register_op(
    "lowrank_linear",
    _op_forward,
    _op_forward_fake,
    f"(Tensor x, {_BASE_SCHEMA}, {_OPTIONS_SCHEMA}) -> (Tensor, Tensor)",
    _op_backward,
    _op_backward_fake,
    f"(Tensor dy, Tensor? x, {_BASE_SCHEMA}, Tensor? u, {_OPTIONS_SCHEMA}, bool[] needs) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)


def _setup_context(ctx, inputs, output):
    x, base, kind, shape, A, B, *opts = inputs
    opts = Options(*opts)
    g, n = ctx.needs_input_grad, len(base) - 1  # needs_input_grad has one entry per tensor of `base`
    # (x, weight, A, B, diag, bias)
    ctx.needs = needs(g[0], kind == _DENSE and g[1], g[4 + n], g[5 + n], g[10 + n], g[7 + n])
    ctx.kind, ctx.shape, ctx.scale, ctx.dropout = kind, shape, opts.scale, opts.dropout
    need_x, need_w, need_a, need_b, need_d, _ = ctx.needs
    keep_x = x if (need_w or need_a) else None
    keep_u = output[1] if (need_b or need_d) else None
    ctx.save_for_backward(keep_x, A, B, keep_u, opts.bias, opts.row_index, opts.col_index, opts.diag, opts.seed, *base)


def _backward_registered(ctx, dy, du):
    x, A, B, u, bias, row_index, col_index, diag, seed, *base = ctx.saved_tensors
    opts = Options(ctx.scale, bias, row_index, col_index, diag, ctx.dropout, seed)
    grads = _lowrank_linear_backward_op(dy, x, base, ctx.kind, ctx.shape, A, B, u, *opts, ctx.needs)
    dx, dw, dA, dB, ddiag, dbias = (gr if need else None for gr, need in zip(grads, ctx.needs))
    base_grads = [dw] + [None] * (len(base) - 1)
    return dx, base_grads, None, None, dA, dB, None, dbias, None, None, ddiag, None, None


_lowrank_linear_op.register_autograd(_backward_registered, setup_context=_setup_context)


def _registered(x, weight, A, B, opts: Options) -> torch.Tensor:
    base, kind, shape = _flatten_base(weight)
    return _lowrank_linear_op(x, base, kind, shape, A, B, *opts)[0]


# ---------------------------------------------------------------------------------------------
# eager mode


class _EagerFused(torch.autograd.Function):
    """The op's forward/backward without the dispatcher (eager mode's hot path). Same bodies and
    saved tensors as the registered op; a quantized base is kept by reference, never saved
    dequantized."""

    @staticmethod
    def forward(ctx, x, weight, A, B, scale, bias, row_index, col_index, diag, dropout, seed):
        opts = Options(scale, bias, row_index, col_index, diag, dropout, seed)
        y, u = _forward(x, weight, A, B, opts)
        g = ctx.needs_input_grad
        # (x, weight, A, B, diag, bias)
        ctx.needs = needs(g[0], isinstance(weight, torch.Tensor) and g[1], g[2], g[3], g[8], g[5])
        need_x, need_w, need_a, need_b, need_d, _ = ctx.needs
        ctx.scale, ctx.dropout = scale, dropout
        ctx.quantized = None if isinstance(weight, torch.Tensor) else weight
        dense = weight if ctx.quantized is None else None
        keep_x = x if (need_w or need_a) else None
        keep_u = u if (need_b or need_d) else None
        ctx.save_for_backward(keep_x, dense, A, B, keep_u, bias, row_index, col_index, diag, seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, dense, A, B, u, bias, row_index, col_index, diag, seed = ctx.saved_tensors
        weight = dense if ctx.quantized is None else ctx.quantized
        opts = Options(ctx.scale, bias, row_index, col_index, diag, ctx.dropout, seed)
        if torch.is_autocast_enabled(dy.device.type):  # backward called inside an autocast region
            with torch.autocast(dy.device.type, enabled=False):
                grads = _backward(dy, x, weight, A, B, u, opts, ctx.needs)
        else:
            grads = _backward(dy, x, weight, A, B, u, opts, ctx.needs)
        dx, dw, dA, dB, ddiag, dbias = (gr if need else None for gr, need in zip(grads, ctx.needs))
        return dx, dw, dA, dB, None, dbias, None, None, ddiag, None, None


def _autocast_factor(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Factors stay fp32 (the kernels round them at their products) or are cast to ``dtype``."""
    if t is None or t.dtype in (torch.float32, dtype):
        return t
    return t.to(dtype)


def _autocast_inputs(device_type, x, weight, A, B, opts: Options):
    """The autocast rule: ``x``, a dense ``weight`` and ``bias`` to the autocast dtype, factors kept
    when fp32 (fp64 inputs are left alone, as autocast leaves them; a quantized base dequantizes to
    ``x``'s dtype by itself)."""
    dense = isinstance(weight, torch.Tensor)
    if x.dtype == torch.float64 or (dense and weight.dtype == torch.float64):
        return x, weight, A, B, opts
    dtype = torch.get_autocast_dtype(device_type)
    bias = None if opts.bias is None else opts.bias.to(dtype)
    opts = opts._replace(bias=bias, diag=_autocast_factor(opts.diag, dtype))
    weight = weight.to(dtype) if dense else weight
    return x.to(dtype), weight, _autocast_factor(A, dtype), _autocast_factor(B, dtype), opts


def _eager_ok(x, weight, A, B) -> bool:
    return (
        type(x) in _PLAIN
        and (type(weight) in _PLAIN or isinstance(weight, (QuantizedWeight, QuantizedCodes)))
        and type(A) in _PLAIN
        and type(B) in _PLAIN
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


def fused(x, weight, A, B, opts: Options) -> torch.Tensor:
    """The op without validation, for callers that validated once (modules, patched layers):
    ``weight`` dense or quantized, the optional parts as one :class:`Options`. Chooses the wrapper
    (module docstring): the registered op when tracing or under tensor subclasses, else eager."""
    if not _eager_ok(x, weight, A, B):
        return _registered(x, weight, A, B, opts)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x, weight, A, B, opts = _autocast_inputs(device_type, x, weight, A, B, opts)
        with torch.autocast(device_type, enabled=False):  # the kernels choose their own precision
            return _eager(x, weight, A, B, opts)
    return _eager(x, weight, A, B, opts)


def _eager(x, weight, A, B, opts: Options) -> torch.Tensor:
    dense = isinstance(weight, torch.Tensor)
    if torch.is_grad_enabled() and (
        x.requires_grad
        or (dense and weight.requires_grad)
        or A.requires_grad
        or B.requires_grad
        or (opts.bias is not None and opts.bias.requires_grad)
        or (opts.diag is not None and opts.diag.requires_grad)
    ):
        if (
            dense
            and opts.plain
            and x.dtype in _NATIVE_DTYPES
            and x.numel() <= _NATIVE_MAX_ELEMENTS
            and x.dtype == weight.dtype == A.dtype == B.dtype
            and (opts.diag is None or opts.diag.dtype == x.dtype)
            and (opts.bias is None or opts.bias.dtype == x.dtype)
            and _backend_for(x) == "torch"
        ):
            return torch_kernel.forward_autograd(x, weight, A, B, opts.bias, opts.diag, opts.scale)
        return _EagerFused.apply(x, weight, A, B, *opts)
    return _forward(x, weight, A, B, opts)[0]


def _cast_and_run(device_type, x, base, kind, shape, A, B, *opts):
    """Autocast rule (see :func:`_autocast_inputs`); the op then runs with autocast excluded."""
    opts = Options(*opts)
    weight = _base(base, kind, shape)
    x, weight, A, B, opts = _autocast_inputs(device_type, x, weight, A, B, opts)
    return _lowrank_linear_op(x, *_flatten_base(weight), A, B, *opts)


register_autocast("lowrank_linear", _cast_and_run)


# ---------------------------------------------------------------------------------------------
# validation and the public entry


def _check_index(index: torch.Tensor, name: str, bound: int, bound_name: str, values: bool) -> None:
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64:
        got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(f"lowrank_linear: {name} must be an int64 tensor, got {got}")
    if index.dim() != 1:
        raise ValueError(f"lowrank_linear: {name} must be 1-D, got shape {_shape(index)}")
    if not values or index.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(index))
    if lo < 0 or hi >= bound:
        bad = lo if lo < 0 else hi
        raise ValueError(f"lowrank_linear: {name} holds {bad}, out of range for {bound_name}={bound}")
    if torch.unique(index).numel() != index.numel():
        raise ValueError(f"lowrank_linear: {name} holds duplicated entries")


def check_factors(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    row_index: Optional[torch.Tensor] = None,
    col_index: Optional[torch.Tensor] = None,
    diag: Optional[torch.Tensor] = None,
    validate_indices: bool = True,
) -> None:
    """Raise TypeError/ValueError naming the offending tensor if the factors are inconsistent.

    ``validate_indices`` also reads the index values (range and uniqueness; a device sync on GPU).
    ``weight`` may be a :class:`~corda_kernels.ops.quantized.QuantizedWeight` (checked as the
    ``(out, in)`` weight of the dtype it dequantizes to).
    """
    if isinstance(weight, QuantizedWeight):
        weight = weight.stand_in()
    named = {"weight": weight, "A": A, "B": B, "bias": bias, "diag": diag}
    check_beside_weight("lowrank_linear", weight, named, factors=("A", "B", "diag"))
    for name in ("weight", "A", "B"):
        if named[name].dim() != 2:
            raise ValueError(f"lowrank_linear: {name} must be 2-D, got shape {_shape(named[name])}")
    out_f, in_f = weight.shape
    r = A.shape[0]
    if r == 0:
        raise ValueError("lowrank_linear: rank r = A.shape[0] is 0; a low-rank adapter needs r >= 1")
    if B.shape[1] != r:
        raise ValueError(
            f"lowrank_linear: A {_shape(A)} and B {_shape(B)} disagree on the rank: B must be (n_rows, {r})"
        )
    if diag is not None and _shape(diag) != (r,):
        raise ValueError(f"lowrank_linear: diag must have shape ({r},) (the rank), got {_shape(diag)}")
    if bias is not None and _shape(bias) != (out_f,):
        raise ValueError(f"lowrank_linear: bias must have shape ({out_f},), got {_shape(bias)}")
    for index, name, factor, axis, dim, dim_name in (
        (col_index, "col_index", A, 1, in_f, "in_features"),
        (row_index, "row_index", B, 0, out_f, "out_features"),
    ):
        fname = "A" if factor is A else "B"
        what = "columns" if axis == 1 else "rows"
        if index is None:
            if factor.shape[axis] != dim:
                raise ValueError(
                    f"lowrank_linear: {fname} {_shape(factor)} has {factor.shape[axis]} {what} but {dim_name} is "
                    f"{dim}; pass {name} to select {factor.shape[axis]} of them"
                )
            continue
        _check_index(index, name, dim, dim_name, validate_indices)
        if index.device != weight.device:
            raise ValueError(
                f"lowrank_linear: device mismatch: {name} is on {index.device} but weight is on {weight.device}"
            )
        if index.numel() != factor.shape[axis]:
            raise ValueError(
                f"lowrank_linear: {name} has {index.numel()} entries but {fname} {_shape(factor)} has "
                f"{factor.shape[axis]} {what}"
            )


def check_scale(scale, where: str = "lowrank_linear") -> float:
    """``scale`` as a float; TypeError unless it is a real number, ValueError unless it is finite
    (a NaN or infinite scale turns every output into NaN/inf)."""
    if isinstance(scale, torch.Tensor) and scale.numel() == 1 and scale.dtype.is_floating_point:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{where}: scale must be a real number, got {type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"{where}: scale must be finite, got {scale}")
    return float(scale)


def check_dropout(dropout, where: str = "lowrank_linear") -> float:
    """``dropout`` as a float; TypeError unless it is a real number, ValueError outside [0, 1)."""
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"{where}: dropout must be a number in [0, 1), got {type(dropout).__name__} {dropout!r}")
    if not 0.0 <= dropout < 1.0:  # also refuses NaN
        raise ValueError(f"{where}: dropout must be in [0, 1), got {dropout}")
    return float(dropout)


def _seed_tensor(seed, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    if seed is None:
        gen_device = generator.device if generator is not None else device
        drawn = torch.randint(0, _SEED_RANGE, (), generator=generator, device=gen_device, dtype=torch.int64)
        return drawn.to(device)
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"lowrank_linear: seed must be an int or a one-element integer tensor, got {seed.dtype} {_shape(seed)}"
            )
        return seed.reshape(()).to(device=device, dtype=torch.int64)
    if not isinstance(seed, int):
        raise TypeError(
            f"lowrank_linear: seed must be an int or a one-element integer tensor, got {type(seed).__name__}"
        )
    return torch.tensor(seed, dtype=torch.int64, device=device)


def draw_seed(device: torch.device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A dropout seed for :func:`fused`, drawn from ``generator`` (default: ``device``'s default one)."""
    return _seed_tensor(None, generator, device)


def lowrank_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    scale: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    row_index: Optional[torch.Tensor] = None,
    col_index: Optional[torch.Tensor] = None,
    diag: Optional[torch.Tensor] = None,
    dropout: float = 0.0,
    generator: Optional[torch.Generator] = None,
    seed: Union[int, torch.Tensor, None] = None,
    validate_indices: bool = True,
) -> torch.Tensor:
    """``y = x·weightᵀ + bias + scale · scatter_rows((drop(x[..., col_index])·Aᵀ ⊙ diag) · Bᵀ)``.

    Args:
        x: ``(..., in)`` activations.
        weight: ``(out, in)`` frozen base (it may require grad).
        A: ``(r, n_cols)`` down projection over the input features ``col_index`` (all when None).
        B: ``(n_rows, r)`` up projection onto the output features ``row_index`` (all when None).
        scale: the adapter scale ``s``.
        bias: optional ``(out,)``.
        row_index: optional distinct int64 output features ``B`` writes (Partial-LoRA).
        col_index: optional distinct int64 input features ``A`` reads (Partial-LoRA).
        diag: optional ``(r,)`` diagonal between the factors (SiVA).
        dropout: probability ``p`` in [0, 1) of zeroing an entry of ``x_c`` (kept ones scale by
            ``1/(1-p)``); applies to the low-rank path only, as in LoRA.
        generator: the source of the dropout seed when ``seed`` is None (default: the default
            generator of ``x``'s device).
        seed: the dropout seed (an int or a one-element int tensor).
        validate_indices: check index range and uniqueness (reads the indices: a device sync on
            GPU; skipped under ``torch.compile``). Modules check once at construction instead.

    Returns:
        ``y`` ``(..., out)`` in ``x``'s dtype (the autocast dtype under ``torch.autocast``).
        Gradients flow to whichever of ``x``, ``weight``, ``A``, ``B``, ``diag``, ``bias``
        require them; fp32 factors on a 16-bit ``x`` / ``weight`` are rounded where they enter a
        product and get fp32 gradients. Registered as ``torch.ops.corda_kernels.lowrank_linear``.

    Raises:
        TypeError: a tensor is not a float tensor, dtypes disagree (factors may be fp32 on a
            16-bit weight; ``x`` may differ from ``weight`` only under autocast), an index is not
            int64, or ``scale`` / ``dropout`` / ``seed`` has the wrong type.
        ValueError: shapes disagree (``x``'s last dim, rank, index lengths, ``diag``, ``bias``),
            the rank is 0, an index is out of range or duplicated, tensors are on different
            devices, ``scale`` is not finite, or ``dropout`` is outside [0, 1).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"lowrank_linear: x must be a tensor, got {type(x).__name__}")
    check_factors(
        weight,
        A,
        B,
        bias=bias,
        row_index=row_index,
        col_index=col_index,
        diag=diag,
        validate_indices=validate_indices and not torch.compiler.is_compiling(),
    )
    check_input("lowrank_linear", x, weight)
    dropout = check_dropout(dropout)
    scale = check_scale(scale)
    seed_t = _seed_tensor(seed, generator, x.device) if dropout > 0.0 else None
    return fused(x, weight, A, B, Options(scale, bias, row_index, col_index, diag, dropout, seed_t))


# The dense update, without autograd (merging, exporting, forming residuals).
delta_weight = torch.no_grad()(reference.delta_weight)


def dropout_mask(seed: int, n_tokens: int, n_cols: int, p: float, device=None) -> torch.Tensor:
    """The ``(n_tokens, n_cols)`` bool keep-mask that :func:`lowrank_linear` uses for ``seed``
    (tokens are the rows of ``x.reshape(-1, in)``, columns the compact ``col_index`` positions)."""
    return reference.dropout_keep(seed, n_tokens, n_cols, p, device)
