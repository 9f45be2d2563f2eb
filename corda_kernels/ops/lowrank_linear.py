"""The fused low-rank linear op: ``y = x·Wᵀ + b + s · scatter_rows((drop(x_c)·A_cᵀ ⊙ d) · B_rᵀ)``.

Public calls:

- :func:`lowrank_linear` ``(x, weight, A, B, *, scale, bias, row_index, col_index, diag, dropout,
  generator, seed, validate_indices) -> y``: ``x (..., in)``, ``weight (out, in)``, ``A (r, n_cols)``
  compact over ``col_index`` (input features; all when None), ``B (n_rows, r)`` compact over
  ``row_index`` (output features; all when None), ``diag (r,)``, ``bias (out,)``; all float tensors
  of one dtype (fp16/bf16/fp32/fp64) on one device, indices int64, except that ``A``, ``B`` and
  ``diag`` may be fp32 on a 16-bit ``weight`` (rounding rule: the reference module's docstring).
  Returns ``(..., out)`` in ``x``'s dtype.
- :func:`check_factors`: the validation of everything but ``x`` (used by :class:`LowRankLinear`).
- :func:`delta_weight`: the dense fp32 update ``s · scatter(B · diag(d) · A)``.
- :func:`dropout_mask`: the keep-mask a given seed draws (to replay dropout in tests).

Autograd: only inputs that require grad get one. ``x`` is saved only when ``weight`` or ``A``
needs a gradient; ``u = drop(x_c)·Aᵀ`` (``(N, r)`` fp32) only when ``B`` or ``diag`` does. So
asymmetric LoRA (A frozen) keeps ``N·r`` numbers per layer, not ``N·in``. Dropout masks are a
counter-based hash of ``(seed, token, column)``, regenerated in the backward instead of saved, and
identical on every backend. Eager training calls of the plain case on the torch backend (one
fp32/fp64 dtype, no index sets, no dropout, small inputs) run as differentiable torch ops, so the backward is
autograd's own (same products and saved tensors; no Python per layer in the backward).

Autocast (CPU and CUDA): an ``Autocast<device>`` kernel casts ``x``, ``weight`` and ``bias`` to the
autocast dtype (as ``nn.Linear`` does) and leaves fp32 factors fp32 (rounded inside the kernels,
their gradients fp32); the op then runs in that dtype, accumulating in fp32. fp64 inputs are
not cast.

Backends (:mod:`corda_kernels._backend`): ``triton`` (CUDA fp16/bf16/fp32, or CPU fp16/fp32 under
the interpreter), ``torch`` (a torch composition that runs on any device) and ``reference``. The op
is registered as ``corda_kernels::lowrank_linear`` with its backward
``corda_kernels::lowrank_linear_backward``, both with fake implementations, so
``torch.compile(fullgraph=True)`` traces models that use it.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional, Union

import torch

from .. import _backend
from .._dtypes import ACTIVATION_DTYPES, FLOAT_DTYPES, HALF_DTYPES, accumulation_dtype
from ..kernels.reference import lowrank_linear as reference
from ..kernels.torch import lowrank_linear as torch_kernel
from .quantized import QuantizedWeight

# GPU preference, fastest first, by call kind. H200, bf16, forward + backward at 4096x4096 and
# 4096x11008, 8k tokens, r 16 / 128 (bench/results/gpu-h200-2026-12-04.md): without index sets or
# dropout the torch composition (cuBLAS GEMMs) took 0.70-0.80x the Triton fused kernels' time; calls
# with index sets or dropout keep Triton (its in-kernel gather/scatter and hashed dropout; the torch
# composition was not measured there).
_CUDA_PREFERENCE = {True: ("torch", "triton", "reference"), False: ("triton", "torch", "reference")}
_CPU_PREFERENCE = ("torch", "reference")
# A quantized base on Triton is dequantized tile by tile inside the GEMM's K loop, once per token
# tile: up to this many tokens (two 64-row tiles) that beats dequantizing W once; above it W is
# dequantized once per call into a temporary and the dense path runs (the H200 run at 8k tokens:
# in-kernel 95 ms vs 1.1 ms for bitsandbytes' dequantize + matmul).
QUANT_IN_KERNEL_MAX_TOKENS = 128
_SEED_RANGE = 2**31 - 1


def _available(x: torch.Tensor) -> dict[str, bool]:
    interpreted_bf16 = x.device.type == "cpu" and x.dtype == torch.bfloat16  # the interpreter cannot do bf16
    return {
        "triton": x.dtype in ACTIVATION_DTYPES and not interpreted_bf16 and _backend.triton_runs_on(x.device),
        "torch": True,
    }


_BACKEND_CACHE: dict[tuple, str] = {}


def _backend_for(x: torch.Tensor, plain: bool = True) -> str:
    """The backend for ``x``'s device and dtype and the call's kind (``plain``: no index sets, no
    dropout), memoized per environment (a per-call hot path). Forward and backward of one call pass
    the same ``plain``, so they run on one backend."""
    key = (x.device.type, x.dtype, plain, os.environ.get(_backend.ENV_BACKEND), os.environ.get("TRITON_INTERPRET"))
    backend = _BACKEND_CACHE.get(key)
    if backend is None:
        preference = _CUDA_PREFERENCE[plain] if x.device.type == "cuda" else _CPU_PREFERENCE
        backend = _backend.choose("lowrank_linear", x.device, _available(x), preference)
        _BACKEND_CACHE[key] = backend
    return backend


def _keep_mask(
    seed: Optional[torch.Tensor], dropout: float, n_tokens: int, n_cols: int, device
) -> Optional[torch.Tensor]:
    if seed is None or dropout == 0.0:
        return None
    return reference.dropout_keep(int(seed), n_tokens, n_cols, dropout, device)


def _run_forward(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout):
    """``(y, u)`` on the chosen backend (the body of the registered op and of the eager path)."""
    backend = _backend_for(x, row_index is None and col_index is None and seed is None)
    if backend == "triton":
        from ..kernels.triton import lowrank_linear as triton_kernel

        return triton_kernel.forward(x, weight, A, B, bias, row_index, col_index, diag, seed, dropout, scale)
    keep = None if seed is None else _keep_mask(seed, dropout, math.prod(x.shape[:-1]), A.shape[1], x.device)
    impl = torch_kernel if backend == "torch" else reference
    return impl.forward(x, weight, A, B, bias, row_index, col_index, diag, keep, dropout, scale)


@torch.library.custom_op("corda_kernels::lowrank_linear", mutates_args=())
def _lowrank_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    bias: Optional[torch.Tensor],
    row_index: Optional[torch.Tensor],
    col_index: Optional[torch.Tensor],
    diag: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    scale: float,
    dropout: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run_forward(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout)


@_lowrank_linear_op.register_fake
def _(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout):
    n_tokens = math.prod(x.shape[:-1])
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    return y, x.new_empty(n_tokens, A.shape[0], dtype=accumulation_dtype(x.dtype))


def _run_backward(dy, x, weight, A, B, diag, u, row_index, col_index, seed, scale, dropout, needs):
    """``[dx, dweight, dA, dB, ddiag, dbias]`` (None where not flagged in ``needs``) on the chosen backend."""
    backend = _backend_for(dy, row_index is None and col_index is None and seed is None)
    if backend == "triton":
        from ..kernels.triton import lowrank_linear as triton_kernel

        return triton_kernel.backward(dy, x, weight, A, B, diag, u, row_index, col_index, seed, dropout, scale, needs)
    keep = None if seed is None else _keep_mask(seed, dropout, math.prod(dy.shape[:-1]), A.shape[1], dy.device)
    impl = torch_kernel if backend == "torch" else reference
    return impl.backward(dy, x, weight, A, B, diag, u, row_index, col_index, keep, dropout, scale, needs)


@torch.library.custom_op("corda_kernels::lowrank_linear_backward", mutates_args=())
def _lowrank_linear_backward_op(
    dy: torch.Tensor,
    x: Optional[torch.Tensor],
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    diag: Optional[torch.Tensor],
    u: Optional[torch.Tensor],
    row_index: Optional[torch.Tensor],
    col_index: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    scale: float,
    dropout: float,
    needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dA, dB, ddiag, dbias)``; entries not flagged in ``needs`` are empty tensors."""
    grads = _run_backward(dy, x, weight, A, B, diag, u, row_index, col_index, seed, scale, dropout, needs)
    return tuple(dy.new_empty(0) if gr is None else gr for gr in grads)


@_lowrank_linear_backward_op.register_fake
def _(dy, x, weight, A, B, diag, u, row_index, col_index, seed, scale, dropout, needs):
    shapes = (
        (*dy.shape[:-1], weight.shape[1]),
        tuple(weight.shape),
        tuple(A.shape),
        tuple(B.shape),
        (A.shape[0],),
        (weight.shape[0],),
    )
    like = (dy, weight, A, B, diag if diag is not None else dy, weight)
    return tuple(t.new_empty(shape if need else (0,)) for t, shape, need in zip(like, shapes, needs))


def _setup_context(ctx, inputs, output):
    x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout = inputs
    need_x, need_w, need_a, need_b, need_bias, _, _, need_d = ctx.needs_input_grad[:8]
    ctx.needs = [need_x, need_w, need_a, need_b, need_d, need_bias]
    ctx.scale, ctx.dropout = scale, dropout
    keep_x = x if (need_w or need_a) else None
    keep_u = output[1] if (need_b or need_d) else None
    ctx.save_for_backward(keep_x, weight, A, B, diag, keep_u, row_index, col_index, seed)


def _backward(ctx, dy, du):
    x, weight, A, B, diag, u, row_index, col_index, seed = ctx.saved_tensors
    grads = _lowrank_linear_backward_op(
        dy, x, weight, A, B, diag, u, row_index, col_index, seed, ctx.scale, ctx.dropout, ctx.needs
    )
    dx, dw, dA, dB, ddiag, dbias = (gr if need else None for gr, need in zip(grads, ctx.needs))
    return dx, dw, dA, dB, dbias, None, None, ddiag, None, None, None


_lowrank_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_factor(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Factors stay fp32 (the kernels round them at their products) or are cast to ``dtype``."""
    if t is None or t.dtype in (torch.float32, dtype):
        return t
    return t.to(dtype)


def _autocast_inputs(device_type, x, weight, A, B, bias, diag):
    """The autocast rule: ``x``, ``weight``, ``bias`` to the autocast dtype, factors kept when fp32
    (fp64 inputs are left alone, as autocast leaves them)."""
    if x.dtype == torch.float64 or weight.dtype == torch.float64:
        return x, weight, A, B, bias, diag
    dtype = torch.get_autocast_dtype(device_type)
    bias = None if bias is None else bias.to(dtype)
    return (
        x.to(dtype),
        weight.to(dtype),
        _autocast_factor(A, dtype),
        _autocast_factor(B, dtype),
        bias,
        _autocast_factor(diag, dtype),
    )


class _EagerFused(torch.autograd.Function):
    """The op's forward/backward without the dispatcher (eager mode's hot path: the registered
    custom op costs tens of µs per call on CPU). Same bodies, same saved tensors as the op."""

    @staticmethod
    def forward(ctx, x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout):
        y, u = _run_forward(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout)
        _setup_context(ctx, (x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout), (y, u))
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, diag, u, row_index, col_index, seed = ctx.saved_tensors
        args = (dy, x, weight, A, B, diag, u, row_index, col_index, seed, ctx.scale, ctx.dropout, tuple(ctx.needs))
        if torch.is_autocast_enabled(dy.device.type):  # backward called inside an autocast region
            with torch.autocast(dy.device.type, enabled=False):
                grads = _run_backward(*args)
        else:
            grads = _run_backward(*args)
        dx, dw, dA, dB, ddiag, dbias = (gr if need else None for gr, need in zip(grads, ctx.needs))
        return dx, dw, dA, dB, dbias, None, None, ddiag, None, None, None


_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Training calls in these dtypes (no rounding between products) on the torch backend, without index
# sets or dropout, run as differentiable torch ops (torch_kernel.forward_autograd): same products,
# backward in autograd's C++ engine instead of a Python autograd.Function.
_NATIVE_DTYPES = (torch.float32, torch.float64)
# ... for inputs up to this size: there the Function's per-call Python cost (~40 µs) dominates; on
# larger ones its in-place accumulation of dx wins by a few percent (bench/results/speed.md, training).
_NATIVE_MAX_ELEMENTS = 1 << 18


def fused(x, weight, A, B, bias, row_index, col_index, diag, seed, scale: float, dropout: float) -> torch.Tensor:
    """The op without validation, for callers that validated once (modules, patched layers).

    Eager calls on plain tensors skip the dispatcher (:class:`_EagerFused`, autocast applied here by
    the same rule); under ``torch.compile``, functorch transforms or tensor subclasses the
    registered op runs. A quantized base (:class:`QuantizedWeight`) takes its own path.
    """
    if isinstance(weight, QuantizedWeight):
        return _quantized_lowrank_linear(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout)
    if (
        type(x) in _PLAIN
        and type(weight) in _PLAIN
        and type(A) in _PLAIN
        and type(B) in _PLAIN
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    ):
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x, weight, A, B, bias, diag = _autocast_inputs(device_type, x, weight, A, B, bias, diag)
            with torch.autocast(device_type, enabled=False):  # the kernels choose their own precision
                return _eager(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout)
        return _eager(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout)
    return _lowrank_linear_op(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout)[0]


def _eager(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout):
    if torch.is_grad_enabled() and (
        x.requires_grad
        or weight.requires_grad
        or A.requires_grad
        or B.requires_grad
        or (bias is not None and bias.requires_grad)
        or (diag is not None and diag.requires_grad)
    ):
        if (
            seed is None
            and row_index is None
            and col_index is None
            and x.dtype in _NATIVE_DTYPES
            and x.numel() <= _NATIVE_MAX_ELEMENTS
            and x.dtype == weight.dtype == A.dtype == B.dtype
            and (diag is None or diag.dtype == x.dtype)
            and (bias is None or bias.dtype == x.dtype)
            and _backend_for(x) == "torch"
        ):
            return torch_kernel.forward_autograd(x, weight, A, B, bias, diag, scale)
        return _EagerFused.apply(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout)
    return _run_forward(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout)[0]


def _register_autocast(device_type: str) -> None:
    """Autocast rule for ``device_type``: ``x``, ``weight``, ``bias`` to the autocast dtype (as
    ``nn.Linear``), fp32 factors kept; then the op runs with autocast excluded."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def cast_and_run(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout):
        with torch._C._ExcludeDispatchKeyGuard(keyset):
            x, weight, A, B, bias, diag = _autocast_inputs(device_type, x, weight, A, B, bias, diag)
            return _lowrank_linear_op(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout)

    op = torch.ops.corda_kernels.lowrank_linear.default
    op.py_impl(getattr(torch._C.DispatchKey, key))(cast_and_run)  # the Python dispatcher (torch.compile)
    _LIB.impl("lowrank_linear", lambda _keys, *args: cast_and_run(*args), key, with_keyset=True)


_LIB = torch.library.Library("corda_kernels", "FRAGMENT")  # noqa: TOR901 - holds the autocast kernels
for _device_type in ("cpu", "cuda"):
    _register_autocast(_device_type)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


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


_FACTORS = ("A", "B", "diag")


def _mixed_ok(factor_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """fp32 factors on a 16-bit weight (the training default) are accepted."""
    return factor_dtype == torch.float32 and weight_dtype in HALF_DTYPES


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
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lowrank_linear: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"lowrank_linear: {name} must be a float tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
        if t.dtype != weight.dtype and not (name in _FACTORS and _mixed_ok(t.dtype, weight.dtype)):
            allowed = "fp32 or weight's dtype" if name in _FACTORS and weight.dtype in HALF_DTYPES else "weight's dtype"
            raise TypeError(
                f"lowrank_linear: dtype mismatch: {name} is {t.dtype} but weight is {weight.dtype} "
                f"({name} must be {allowed})"
            )
        if t.device != weight.device:
            raise ValueError(
                f"lowrank_linear: device mismatch: {name} is on {t.device} but weight is on {weight.device}"
            )
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


def _autocasts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether autocast will bring ``x`` and ``weight`` to one dtype (fp64 is never cast)."""
    return (
        torch.is_autocast_enabled(x.device.type) and x.dtype in ACTIVATION_DTYPES and weight.dtype in ACTIVATION_DTYPES
    )


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
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lowrank_linear: x must be a float tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if x.dtype != weight.dtype and not _autocasts(x, weight):
        raise TypeError(f"lowrank_linear: dtype mismatch: x is {x.dtype} but weight is {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"lowrank_linear: device mismatch: x is on {x.device} but weight is on {weight.device}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"lowrank_linear: x {_shape(x)} must end in in_features={weight.shape[1]} (weight {_shape(weight)})"
        )
    dropout = check_dropout(dropout)
    scale = check_scale(scale)
    seed_t = _seed_tensor(seed, generator, x.device) if dropout > 0.0 else None
    return fused(x, weight, A, B, bias, row_index, col_index, diag, seed_t, scale, dropout)


def delta_weight(
    A: torch.Tensor,
    B: torch.Tensor,
    out_features: int,
    in_features: int,
    *,
    scale: float = 1.0,
    diag: Optional[torch.Tensor] = None,
    row_index: Optional[torch.Tensor] = None,
    col_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The dense fp32 ``(out, in)`` weight update ``scale · scatter(B · diag(d) · A)`` (no grad)."""
    with torch.no_grad():
        return reference.delta_weight(A, B, out_features, in_features, scale, diag, row_index, col_index)


def dropout_mask(seed: int, n_tokens: int, n_cols: int, p: float, device=None) -> torch.Tensor:
    """The ``(n_tokens, n_cols)`` bool keep-mask that :func:`lowrank_linear` uses for ``seed``
    (tokens are the rows of ``x.reshape(-1, in)``, columns the compact ``col_index`` positions)."""
    return reference.dropout_keep(seed, n_tokens, n_cols, p, device)


# --- Quantized base (a QuantizedWeight). W is frozen. Up to QUANT_IN_KERNEL_MAX_TOKENS tokens on
# Triton (or at any size with CORDA_KERNELS_BACKEND=triton) the fused GEMM dequantizes W tile by tile
# inside its K loop (no full-precision copy of W); otherwise W is dequantized once per call into a
# temporary, the dense path runs, and the backward dequantizes again (QLoRA's memory rule: nothing
# full precision is kept between forward and backward). Under torch.compile the registered op runs on
# the dequantized weight.


def _quantized_lowrank_linear(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout):
    tokens = x.numel() // max(x.shape[-1], 1)
    forced = _backend.requested_backend() == "triton"
    if _backend_for(x, False) == "triton" and (forced or tokens <= QUANT_IN_KERNEL_MAX_TOKENS):
        return _QuantizedTriton.apply(x, weight, A, B, bias, row_index, col_index, diag, seed, float(scale), dropout)
    eager = type(x) in _PLAIN and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
    if not eager:
        y, _ = _lowrank_linear_op(
            x, weight.dequantize(), A, B, bias, row_index, col_index, diag, seed, float(scale), float(dropout)
        )
        return y
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:
        x, _, A, B, bias, diag = _autocast_inputs(device_type, x, x, A, B, bias, diag)
        with torch.autocast(device_type, enabled=False):
            return _QuantizedDequantized.apply(
                x, weight, A, B, bias, row_index, col_index, diag, seed, float(scale), dropout
            )
    return _QuantizedDequantized.apply(x, weight, A, B, bias, row_index, col_index, diag, seed, float(scale), dropout)


def _dequantized_as(weight: QuantizedWeight, x: torch.Tensor) -> torch.Tensor:
    W = weight.dequantize()
    return W if W.dtype == x.dtype else W.to(x.dtype)


class _QuantizedDequantized(torch.autograd.Function):
    """Dense forward/backward on ``weight.dequantize()``, made afresh in each pass (gradients for x,
    A, B, diag, bias; none for the frozen quantized weight)."""

    @staticmethod
    def forward(ctx, x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout):
        y, u = _run_forward(x, _dequantized_as(weight, x), A, B, bias, row_index, col_index, diag, seed, scale, dropout)
        need_x, _, need_a, need_b, need_bias, _, _, need_d = ctx.needs_input_grad[:8]
        ctx.needs = [need_x, False, need_a, need_b, need_d, need_bias]
        ctx.weight, ctx.scale, ctx.dropout = weight, scale, dropout
        ctx.save_for_backward(
            x if need_a else None, A, B, diag, u if (need_b or need_d) else None, row_index, col_index, seed
        )
        return y

    @staticmethod
    def backward(ctx, dy):
        x, A, B, diag, u, row_index, col_index, seed = ctx.saved_tensors
        W = _dequantized_as(ctx.weight, dy)
        grads = _run_backward(dy, x, W, A, B, diag, u, row_index, col_index, seed, ctx.scale, ctx.dropout, ctx.needs)
        dx, _, dA, dB, ddiag, dbias = (gr if need else None for gr, need in zip(grads, ctx.needs))
        return dx, None, dA, dB, dbias, None, None, ddiag, None, None, None


class _QuantizedTriton(torch.autograd.Function):
    """The Triton forward/backward with a quantized frozen base (gradients for x, A, B, diag, bias)."""

    @staticmethod
    def forward(ctx, x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout):
        from ..kernels.triton import lowrank_linear as triton_kernel

        y, u = triton_kernel.forward(x, weight, A, B, bias, row_index, col_index, diag, seed, dropout, scale)
        ctx.weight, ctx.scale, ctx.dropout = weight, scale, dropout
        ctx.save_for_backward(x, A, B, diag, u, row_index, col_index, seed)
        return y

    @staticmethod
    def backward(ctx, dy):
        from ..kernels.triton import lowrank_linear as triton_kernel

        x, A, B, diag, u, row_index, col_index, seed = ctx.saved_tensors
        need_x, _, need_a, need_b, need_bias, _, _, need_d = ctx.needs_input_grad[:8]
        needs = (need_x, False, need_a, need_b, need_d, need_bias)
        dx, _, dA, dB, ddiag, dbias = triton_kernel.backward(
            dy.contiguous(), x, ctx.weight, A, B, diag, u, row_index, col_index, seed, ctx.dropout, ctx.scale, needs
        )
        return dx, None, dA, dB, dbias, None, None, ddiag, None, None, None
