"""The fused DoRA op: ``y = (m / n) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b``, ``n_o = ‖W_o + s·(B·A)_o‖₂``.

Public calls:

- :func:`dora_linear` ``(x, weight, A, B, magnitude, *, scale, bias, weight_sq) -> y``: ``x (..., in)``,
  ``weight (out, in)`` (frozen: no gradient), ``A (r, in)``, ``B (out, r)``, ``magnitude (out,)``,
  ``bias (out,)``, ``weight_sq (out,)`` the cached ``‖W_o‖²`` (fp32; fp64 for fp64 inputs). Float
  tensors of one dtype on one device, except that ``A``, ``B`` and ``magnitude`` may be fp32 on a
  16-bit ``weight``. Returns ``(..., out)`` in ``x``'s dtype.
- :func:`fused` ``(x, weight, A, B, magnitude, opts)``: the same without validation, the optional parts
  as one :class:`~corda_kernels.kernels.reference.dora.DoraOptions` record (modules, patched layers).
- :func:`weight_norm`: the closed-form norm ``n`` (no gradient), for initializing the magnitude and
  for merging; :func:`weight_sq_norm`: the cacheable ``‖W_o‖²``.
- :func:`check_dora`: the validation.

Math, the closed-form norm, its cancellation guard and the gradients:
:mod:`corda_kernels.kernels.reference.dora` (the specification). The norm is never formed from an
``(out, in)`` matrix: ``P = W·Aᵀ`` ``(out, r)`` and ``A·Aᵀ`` ``(r, r)``. It is detached in the backward
(DoRA's paper, PEFT); gradients flow to ``x``, ``A``, ``B``, ``magnitude`` and ``bias``, each only
when it requires one. ``x`` is saved only when ``A`` needs a gradient, ``u = x·Aᵀ`` only for ``B``,
the unscaled output ``z`` only for ``magnitude``.

Backends (:mod:`corda_kernels._backend`; ``CORDA_KERNELS_BACKEND`` forces one): ``triton`` (the scale
``m/n`` and bias as the fused GEMM's epilogue, ``P`` and ``‖W_o‖²`` from one pass over ``W``:
:mod:`corda_kernels.kernels.triton.dora`; the CUDA default, not yet measured on a GPU), ``torch`` (the
CPU default) and ``reference``. Registered as ``corda_kernels::dora_linear`` (and ``..._backward``) with
fake kernels, autograd and autocast kernels, so ``torch.compile`` traces it; in eager mode a plain
``autograd.Function`` runs the same bodies without the dispatcher, as
:mod:`corda_kernels.ops.lowrank_linear` does. Autocast (CPU and CUDA): ``x``, ``weight`` and ``bias``
to the autocast dtype, fp32 ``A`` / ``B`` / ``magnitude`` kept (others cast); fp64 inputs are not cast.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _backend
from .._dtypes import accumulation_dtype
from ..kernels.reference import dora as reference
from ..kernels.reference.dora import DoraOptions
from ..kernels.torch import dora as torch_kernel
from ._checks import check_beside_weight, check_input
from ._checks import shape as _shape
from ._registry import needs, register_autocast, register_op
from .lowrank_linear import check_factors, check_scale

__all__ = ["DoraOptions", "dora_linear", "fused", "weight_norm", "weight_sq_norm", "check_dora"]

_NAME = "dora_linear"
# CPU: the torch composition. CUDA: Triton first (the epilogue scale saves a pass over the output);
# not measured on a GPU yet (the GPU check's `dora` stage times it).
_CUDA_PREFERENCE = ("triton", "torch", "reference")
_CPU_PREFERENCE = ("torch", "reference")
_PLAIN = (torch.Tensor, torch.nn.Parameter)


# ---------------------------------------------------------------------------------------------
# the one place that chooses how a call runs

_plan = _backend.TritonOrTorch(_NAME, "corda_kernels.kernels.triton.dora", _CUDA_PREFERENCE, _CPU_PREFERENCE)


def _kernels(backend: str):
    return _plan.kernels(backend, torch_kernel, reference)


def _forward(x, weight, A, B, magnitude, opts: DoraOptions, keep_z: bool = True):
    """``(y, z, u, n)`` of one call on the chosen backend."""
    backend = _plan(x)
    if backend == "reference":
        return reference.forward(x, weight, A, B, magnitude, opts)
    return _kernels(backend).forward(x, weight, A, B, magnitude, opts, keep_z=keep_z)


def _backward(dy, x, weight, A, B, magnitude, z, u, n, opts: DoraOptions, needs):
    """``[dx, dA, dB, dmagnitude, dbias]`` (None where ``needs`` says so)."""
    return _kernels(_plan(dy)).backward(dy, x, weight, A, B, magnitude, z, u, n, opts, needs)


# ---------------------------------------------------------------------------------------------
# the registered op

_ARGS_SCHEMA = "Tensor weight, Tensor A, Tensor B, Tensor magnitude, float scale, Tensor? bias, Tensor? weight_sq"


def _op_forward(x, weight, A, B, magnitude, scale, bias, weight_sq):
    y, z, u, n = _forward(x, weight, A, B, magnitude, DoraOptions(scale, bias, weight_sq))
    return y, z.reshape(-1, weight.shape[0]), u, n


def _op_forward_fake(x, weight, A, B, magnitude, scale, bias, weight_sq):
    n_tokens = math.prod(x.shape[:-1])
    acc = accumulation_dtype(x.dtype)
    out_f = weight.shape[0]
    return (
        x.new_empty(*x.shape[:-1], out_f),
        x.new_empty(n_tokens, out_f),
        x.new_empty(n_tokens, A.shape[0], dtype=acc),
        x.new_empty(out_f, dtype=acc),
    )


def _op_backward(dy, x, weight, A, B, magnitude, z, u, n, scale, bias, weight_sq, needs):
    """``(dx, dA, dB, dmagnitude, dbias)``; entries not flagged in ``needs`` are empty tensors."""
    grads = _backward(dy, x, weight, A, B, magnitude, z, u, n, DoraOptions(scale, bias, weight_sq), needs)
    return tuple(dy.new_empty(0) if gr is None else gr for gr in grads)


def _op_backward_fake(dy, x, weight, A, B, magnitude, z, u, n, scale, bias, weight_sq, needs):
    in_f = weight.shape[1]
    shapes = ((*dy.shape[:-1], in_f), tuple(A.shape), tuple(B.shape), tuple(magnitude.shape), (weight.shape[0],))
    like = (dy, A, B, magnitude, dy)
    return tuple(t.new_empty(s) if need else dy.new_empty(0) for t, s, need in zip(like, shapes, needs))


_dora_op, _dora_backward_op = register_op(
    _NAME,
    _op_forward,
    _op_forward_fake,
    f"(Tensor x, {_ARGS_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor)",
    _op_backward,
    _op_backward_fake,
    "(Tensor dy, Tensor? x, Tensor weight, Tensor A, Tensor B, Tensor magnitude, Tensor? z, Tensor? u, "
    "Tensor n, float scale, Tensor? bias, Tensor? weight_sq, bool[] needs) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor)",
)


def _setup_context(ctx, inputs, output):
    x, weight, A, B, magnitude, scale, bias, weight_sq = inputs
    g = ctx.needs_input_grad
    ctx.needs = needs(g[0], g[2], g[3], g[4], g[6])  # (x, A, B, magnitude, bias)
    _, need_a, need_b, need_m, _ = ctx.needs
    ctx.scale = scale
    keep_x = x if need_a else None
    keep_z = output[1] if need_m else None
    keep_u = output[2] if need_b else None
    ctx.save_for_backward(keep_x, weight, A, B, magnitude, keep_z, keep_u, output[3], bias, weight_sq)


def _backward_registered(ctx, dy, dz, du, dn):
    x, weight, A, B, magnitude, z, u, n, bias, weight_sq = ctx.saved_tensors
    grads = _dora_backward_op(dy, x, weight, A, B, magnitude, z, u, n, ctx.scale, bias, weight_sq, ctx.needs)
    dx, dA, dB, dm, dbias = (gr if need else None for gr, need in zip(grads, ctx.needs))
    return dx, None, dA, dB, dm, None, dbias, None


_dora_op.register_autograd(_backward_registered, setup_context=_setup_context)


def _registered(x, weight, A, B, magnitude, opts: DoraOptions) -> torch.Tensor:
    return _dora_op(x, weight, A, B, magnitude, *opts)[0]


# ---------------------------------------------------------------------------------------------
# eager mode and autocast


class _EagerDora(torch.autograd.Function):
    """The op's forward/backward without the dispatcher (eager mode's hot path); same bodies and
    saved tensors as the registered op."""

    @staticmethod
    def forward(ctx, x, weight, A, B, magnitude, scale, bias, weight_sq):
        g = ctx.needs_input_grad
        ctx.needs = needs(g[0], g[2], g[3], g[4], g[6])  # (x, A, B, magnitude, bias)
        _, need_a, need_b, need_m, _ = ctx.needs
        y, z, u, n = _forward(x, weight, A, B, magnitude, DoraOptions(scale, bias, weight_sq), keep_z=need_m)
        ctx.scale = scale
        ctx.save_for_backward(
            x if need_a else None, weight, A, B, magnitude, z if need_m else None, u if need_b else None, n
        )
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, magnitude, z, u, n = ctx.saved_tensors
        opts = DoraOptions(ctx.scale)
        if torch.is_autocast_enabled(dy.device.type):  # backward called inside an autocast region
            with torch.autocast(dy.device.type, enabled=False):
                grads = _backward(dy, x, weight, A, B, magnitude, z, u, n, opts, ctx.needs)
        else:
            grads = _backward(dy, x, weight, A, B, magnitude, z, u, n, opts, ctx.needs)
        dx, dA, dB, dm, dbias = (gr if need else None for gr, need in zip(grads, ctx.needs))
        return dx, None, dA, dB, dm, None, dbias, None


def _keep_fp32(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype in (torch.float32, dtype) else t.to(dtype)


def _autocast_inputs(device_type, x, weight, A, B, magnitude, opts: DoraOptions):
    """``x``, ``weight``, ``bias`` to the autocast dtype; fp32 ``A`` / ``B`` / ``magnitude`` kept,
    others cast (fp64 inputs are left alone, as autocast leaves them)."""
    if x.dtype == torch.float64 or weight.dtype == torch.float64:
        return x, weight, A, B, magnitude, opts
    dtype = torch.get_autocast_dtype(device_type)
    bias = None if opts.bias is None else opts.bias.to(dtype)
    weight_sq = opts.weight_sq if weight.dtype == dtype else None  # cached for another dtype of W
    opts = opts._replace(bias=bias, weight_sq=weight_sq)
    return (
        x.to(dtype),
        weight.to(dtype),
        _keep_fp32(A, dtype),
        _keep_fp32(B, dtype),
        _keep_fp32(magnitude, dtype),
        opts,
    )


def _cast_and_run(device_type, x, weight, A, B, magnitude, scale, bias, weight_sq):
    opts = DoraOptions(scale, bias, weight_sq)
    x, weight, A, B, magnitude, opts = _autocast_inputs(device_type, x, weight, A, B, magnitude, opts)
    return _dora_op(x, weight, A, B, magnitude, *opts)


register_autocast(_NAME, _cast_and_run)


def _eager_ok(*tensors) -> bool:
    return (
        all(t is None or type(t) in _PLAIN for t in tensors)
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


def fused(x, weight, A, B, magnitude, opts: DoraOptions) -> torch.Tensor:
    """The op without validation, for callers that validated once (modules, patched layers): the
    registered op when tracing or under tensor subclasses, else the eager ``autograd.Function``."""
    if not _eager_ok(x, weight, A, B, magnitude, opts.bias):
        return _registered(x, weight, A, B, magnitude, opts)
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x, weight, A, B, magnitude, opts = _autocast_inputs(device_type, x, weight, A, B, magnitude, opts)
        with torch.autocast(device_type, enabled=False):  # the kernels choose their own precision
            return _eager(x, weight, A, B, magnitude, opts)
    return _eager(x, weight, A, B, magnitude, opts)


def _eager(x, weight, A, B, magnitude, opts: DoraOptions) -> torch.Tensor:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A, B, magnitude, opts.bias)):
        return _EagerDora.apply(x, weight, A, B, magnitude, *opts)
    return _forward(x, weight, A, B, magnitude, opts, keep_z=False)[0]


# ---------------------------------------------------------------------------------------------
# validation and the public entry


def check_dora(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    weight_sq: Optional[torch.Tensor] = None,
    where: str = _NAME,
    finite: bool = True,
) -> None:
    """Raise TypeError/ValueError, prefixed with ``where`` and naming the offending tensor, if the
    DoRA factors are inconsistent: those of :func:`~corda_kernels.ops.lowrank_linear.check_factors`
    (no index sets or diagonal: DoRA's norm covers the whole weight), and ``magnitude`` a float
    ``(out,)`` tensor in fp32 or the weight's dtype on the weight's device, finite when ``finite``
    (reads its values: a device sync on GPU)."""
    try:
        check_factors(weight, A, B, bias=bias)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("lowrank_linear:", f"{where}:", 1)) from None
    out_f = weight.shape[0]
    check_beside_weight(where, weight, {"magnitude": magnitude}, factors=("magnitude",))
    if _shape(magnitude) != (out_f,):
        raise ValueError(f"{where}: magnitude must have shape ({out_f},) (out_features), got {_shape(magnitude)}")
    if finite and not bool(torch.isfinite(magnitude).all()):
        raise ValueError(f"{where}: magnitude holds non-finite values (NaN or inf)")
    if weight_sq is not None:
        acc = accumulation_dtype(weight.dtype)
        if not isinstance(weight_sq, torch.Tensor) or weight_sq.dtype != acc or _shape(weight_sq) != (out_f,):
            got = f"{weight_sq.dtype} {_shape(weight_sq)}" if isinstance(weight_sq, torch.Tensor) else type(weight_sq)
            raise ValueError(f"{where}: weight_sq must be a {acc} tensor of shape ({out_f},), got {got}")
        if weight_sq.device != weight.device:
            raise ValueError(f"{where}: device mismatch: weight_sq is on {weight_sq.device}, weight on {weight.device}")


def weight_sq_norm(weight: torch.Tensor) -> torch.Tensor:
    """``‖W_o‖²`` (out,) in fp32 (fp64 for an fp64 ``weight``): the cacheable part of the norm.

    Args:
        weight: ``(out, in)`` float tensor.

    Returns:
        The squared row norms, accumulated without a widened copy of ``weight``.
    """
    with torch.no_grad():
        return reference.weight_sq_norm(weight)


def weight_norm(
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    *,
    scale: float = 1.0,
    weight_sq: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DoRA's row norm ``n_o = ‖W_o + s·(B·A)_o‖₂`` in closed form, without gradient.

    Args:
        weight: ``(out, in)`` base.
        A: ``(r, in)`` down projection.
        B: ``(out, r)`` up projection.
        scale: the adapter scale ``s``.
        weight_sq: optional cached ``‖W_o‖²`` (:func:`weight_sq_norm`).

    Returns:
        ``(out,)`` in fp32 (fp64 for fp64 weights); ``A`` and ``B`` rounded to the weight's dtype
        first, as the forward uses them.
    """
    with torch.no_grad():
        backend = _plan(weight)
        if backend == "reference":
            return reference.weight_norm(weight, A, B, scale, weight_sq, weight.dtype)
        return _kernels(backend).weight_norm(weight, A, B, scale, weight_sq, weight.dtype)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    magnitude: torch.Tensor,
    *,
    scale: float = 1.0,
    bias: Optional[torch.Tensor] = None,
    weight_sq: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DoRA's linear ``y = (m / n) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + bias`` with ``n_o = ‖W_o + s·(B·A)_o‖₂``.

    The norm is computed in closed form from ``W·Aᵀ`` and ``A·Aᵀ`` (never an ``(out, in)``
    temporary) and is a constant in the backward (detached, as DoRA's paper and PEFT do). Rows whose
    adapted weight is exactly zero output ``bias`` (PEFT returns NaN there).

    Args:
        x: ``(..., in)`` activations.
        weight: ``(out, in)`` frozen base (gets no gradient; it must not require one).
        A: ``(r, in)`` down projection.
        B: ``(out, r)`` up projection.
        magnitude: ``(out,)`` DoRA magnitude ``m``.
        scale: the adapter scale ``s``.
        bias: optional ``(out,)``.
        weight_sq: optional cached ``‖W_o‖²`` (:func:`weight_sq_norm`, fp32; fp64 for fp64
            weights), to skip one reduction over ``weight`` per call.

    Returns:
        ``y`` ``(..., out)`` in ``x``'s dtype (the autocast dtype under ``torch.autocast``).
        Gradients flow to whichever of ``x``, ``A``, ``B``, ``magnitude``, ``bias`` require them.
        Registered as ``torch.ops.corda_kernels.dora_linear``.

    Raises:
        TypeError: a tensor is not a float tensor, or dtypes disagree (``A``, ``B`` and
            ``magnitude`` may be fp32 on a 16-bit weight; ``x`` may differ from ``weight`` only
            under autocast).
        ValueError: shapes or devices disagree, the rank is 0, ``magnitude`` is not finite,
            ``scale`` is not finite, or ``weight`` requires a gradient.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_NAME}: x must be a tensor, got {type(x).__name__}")
    check_dora(weight, A, B, magnitude, bias=bias, weight_sq=weight_sq, finite=not torch.compiler.is_compiling())
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{_NAME}: weight requires a gradient, but DoRA's base is frozen (detach it)")
    check_input(_NAME, x, weight)
    scale = check_scale(scale, _NAME)
    return fused(x, weight, A, B, magnitude, DoraOptions(scale, bias, weight_sq))
