"""The fused low-rank linear op: ``y = x·Wᵀ + b + s · scatter_rows((drop(x_c)·A_cᵀ ⊙ d) · B_rᵀ)``.

Public calls:

- :func:`lowrank_linear` ``(x, weight, A, B, *, scale, bias, row_index, col_index, diag, dropout,
  generator, seed, validate_indices) -> y``: ``x (..., in)``, ``weight (out, in)``, ``A (r, n_cols)``
  compact over ``col_index`` (input features; all when None), ``B (n_rows, r)`` compact over
  ``row_index`` (output features; all when None), ``diag (r,)``, ``bias (out,)``; all float tensors
  of one dtype (fp16/bf16/fp32/fp64) on one device, indices int64. Returns ``(..., out)``.
- :func:`check_factors`: the validation of everything but ``x`` (used by :class:`LowRankLinear`).
- :func:`delta_weight`: the dense fp32 update ``s · scatter(B · diag(d) · A)``.
- :func:`dropout_mask`: the keep-mask a given seed draws (to replay dropout in tests).

Autograd: only inputs that require grad get one. ``x`` is saved only when ``weight`` or ``A``
needs a gradient; ``u = drop(x_c)·Aᵀ`` (``(N, r)`` fp32) only when ``B`` or ``diag`` does. So
asymmetric LoRA (A frozen) keeps ``N·r`` numbers per layer, not ``N·in``. Dropout masks are a
counter-based hash of ``(seed, token, column)``, regenerated in the backward instead of saved, and
identical on every backend.

Backends (:mod:`corda_kernels._backend`): ``triton`` (CUDA fp16/bf16/fp32, or CPU fp16/fp32 under
the interpreter), ``torch`` (a torch composition that runs on any device) and ``reference``. The op
is registered as ``corda_kernels::lowrank_linear`` with its backward
``corda_kernels::lowrank_linear_backward``, both with fake implementations, so
``torch.compile(fullgraph=True)`` traces models that use it.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .. import _backend
from .._dtypes import ACTIVATION_DTYPES, FLOAT_DTYPES, accumulation_dtype
from ..kernels.reference import lowrank_linear as reference
from ..kernels.torch import lowrank_linear as torch_kernel
from .quantized import QuantizedWeight

_CUDA_PREFERENCE = ("triton", "torch", "reference")
_CPU_PREFERENCE = ("torch", "reference")
_SEED_RANGE = 2**31 - 1


def _available(x: torch.Tensor) -> dict[str, bool]:
    interpreted_bf16 = x.device.type == "cpu" and x.dtype == torch.bfloat16  # the interpreter cannot do bf16
    return {
        "triton": x.dtype in ACTIVATION_DTYPES and not interpreted_bf16 and _backend.triton_runs_on(x.device),
        "torch": True,
    }


def _backend_for(x: torch.Tensor) -> str:
    preference = _CUDA_PREFERENCE if x.device.type == "cuda" else _CPU_PREFERENCE
    return _backend.choose("lowrank_linear", x.device, _available(x), preference)


def _keep_mask(
    seed: Optional[torch.Tensor], dropout: float, n_tokens: int, n_cols: int, device
) -> Optional[torch.Tensor]:
    if seed is None or dropout == 0.0:
        return None
    return reference.dropout_keep(int(seed), n_tokens, n_cols, dropout, device)


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
    backend = _backend_for(x)
    if backend == "triton":
        from ..kernels.triton import lowrank_linear as triton_kernel

        return triton_kernel.forward(x, weight, A, B, bias, row_index, col_index, diag, seed, dropout, scale)
    n_tokens = math.prod(x.shape[:-1])
    keep = _keep_mask(seed, dropout, n_tokens, A.shape[1], x.device)
    impl = torch_kernel if backend == "torch" else reference
    return impl.forward(x, weight, A, B, bias, row_index, col_index, diag, keep, dropout, scale)


@_lowrank_linear_op.register_fake
def _(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout):
    n_tokens = math.prod(x.shape[:-1])
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    return y, x.new_empty(n_tokens, A.shape[0], dtype=accumulation_dtype(x.dtype))


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
    backend = _backend_for(dy)
    needs = tuple(needs)
    if backend == "triton":
        from ..kernels.triton import lowrank_linear as triton_kernel

        grads = triton_kernel.backward(dy, x, weight, A, B, diag, u, row_index, col_index, seed, dropout, scale, needs)
    else:
        keep = _keep_mask(seed, dropout, math.prod(dy.shape[:-1]), A.shape[1], dy.device)
        impl = torch_kernel if backend == "torch" else reference
        grads = impl.backward(dy, x, weight, A, B, diag, u, row_index, col_index, keep, dropout, scale, needs)
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
    return tuple(dy.new_empty(shape if need else (0,)) for shape, need in zip(shapes, needs))


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
        if t.dtype != weight.dtype:
            raise TypeError(f"lowrank_linear: dtype mismatch: {name} is {t.dtype} but weight is {weight.dtype}")
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
        row_index, col_index: optional distinct int64 feature indices (Partial-LoRA).
        diag: optional ``(r,)`` diagonal between the factors (SiVA).
        dropout: probability ``p`` in [0, 1) of zeroing an entry of ``x_c`` (kept ones scale by
            ``1/(1-p)``); applies to the low-rank path only, as in LoRA.
        generator, seed: the dropout seed (an int or int tensor); drawn from ``generator`` (or the
            default generator of ``x``'s device) when ``seed`` is None.
        validate_indices: check index range and uniqueness (reads the indices: a device sync on
            GPU; skipped under ``torch.compile``). Modules check once at construction instead.
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
    if x.dtype != weight.dtype:
        raise TypeError(f"lowrank_linear: dtype mismatch: x is {x.dtype} but weight is {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"lowrank_linear: device mismatch: x is on {x.device} but weight is on {weight.device}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"lowrank_linear: x {_shape(x)} must end in in_features={weight.shape[1]} (weight {_shape(weight)})"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lowrank_linear: dropout must be in [0, 1), got {dropout}")
    seed_t = _seed_tensor(seed, generator, x.device) if dropout > 0.0 else None
    if isinstance(weight, QuantizedWeight):
        return _quantized_lowrank_linear(x, weight, A, B, bias, row_index, col_index, diag, seed_t, scale, dropout)
    y, _ = _lowrank_linear_op(x, weight, A, B, bias, row_index, col_index, diag, seed_t, float(scale), float(dropout))
    return y


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


# --- Quantized base (a QuantizedWeight): W is dequantized per call on the torch/reference backends,
# tile by tile inside the fused GEMM's K loop on Triton (no full-precision copy of W). W is frozen.


def _quantized_lowrank_linear(x, weight, A, B, bias, row_index, col_index, diag, seed, scale, dropout):
    if _backend_for(x) == "triton":
        return _QuantizedTriton.apply(x, weight, A, B, bias, row_index, col_index, diag, seed, float(scale), dropout)
    y, _ = _lowrank_linear_op(
        x, weight.dequantize(), A, B, bias, row_index, col_index, diag, seed, float(scale), float(dropout)
    )
    return y


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
