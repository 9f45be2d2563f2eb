"""The segmented many-adapter low-rank op: one base layer, many adapters, each row of ``x`` using the
adapter its index names (Punica / S-LoRA style mixed batches), in one call::

    y[m] = x[m]·Wᵀ + bias + s_a · (x[m]·A_aᵀ)·B_aᵀ,   a = adapter_index[m]   (a = -1: no adapter term)

Public calls:

- :func:`lowrank_linear_segmented` ``(x, weight, A, B, adapter_index, *, scales, ranks, bias,
  validate_indices) -> y``: ``x (..., in)``; ``weight (out, in)``; ``A (n, r_max, in)`` and
  ``B (n, out, r_max)``, the ``n`` adapters' factors stacked and zero-padded to the largest rank
  (``ranks (n,)`` gives each adapter's own rank: padding never contributes and its gradient stays
  zero), or lists of per-adapter ``A_a (r_a, in)`` / ``B_a (out, r_a)`` of different ranks, packed
  here by :func:`pack_adapters` (differentiably: gradients reach the list's tensors);
  ``adapter_index`` int64/int32 of shape ``x.shape[:-1]`` (one adapter per token) or
  ``x.shape[:1]`` (one per sequence, broadcast over the other dims), values in ``[-1, n)``;
  ``scales`` one float for every adapter, ``n`` floats, or an ``(n,)`` float tensor (constants: they
  get no gradient); ``bias (out,)``. Float tensors of one dtype (fp16/bf16/fp32/fp64) on one device,
  except that ``A`` and ``B`` may be fp32 on a 16-bit ``weight`` (the rounding rule of
  :mod:`corda_kernels.kernels.reference.segmented`). Returns ``(..., out)`` in ``x``'s dtype.
- :func:`pack_adapters`: per-adapter factor lists -> ``(A, B, ranks)`` stacks.
- :func:`fused`: the op without validation on normalized arguments (those of the registered op,
  below), for callers that validated once (modules, patched layers).
- :func:`check_segmented`: the validation.
- :func:`slots_of_names` and :func:`pack_cached`: what every caller serving named adapters needs (one
  adapter slot per sequence from names; the packed stacks reused while no gradient is taken and no
  factor changed), shared by :class:`corda_kernels.LowRankLinear` and the PEFT patch.

Math, shapes and gradients: :mod:`corda_kernels.kernels.reference.segmented` (the specification).
Backends (:mod:`corda_kernels._backend`; ``CORDA_KERNELS_BACKEND`` forces one): ``triton`` (row tiles
grouped by adapter, Punica's SGMV idea: :mod:`corda_kernels.kernels.triton.segmented`; the CUDA
default, not yet measured on a GPU), ``torch`` (rows grouped by one ``argsort``, each adapter's
skinny GEMMs on its rows: :mod:`corda_kernels.kernels.torch.segmented`; the CPU default) and
``reference``. The base GEMM runs once per call on every backend.

Registered as ``corda_kernels::lowrank_linear_segmented`` (and ``..._backward``) with fake kernels,
autograd and autocast kernels, so ``torch.compile(fullgraph=True)`` traces it; in eager mode a plain
``autograd.Function`` runs the same bodies without the dispatcher (as
:mod:`corda_kernels.ops.lowrank_linear` does). The registered op takes the normalized arguments:
``adapter_index`` int64 ``(N,)`` for ``N = x.numel() / in``, ``scales`` fp32 ``(n,)``, ``ranks``
int64 ``(n,)`` or None, all on ``x``'s device.

Autograd: gradients for ``x``, ``weight``, ``A``, ``B`` and ``bias``, each only when it requires
one; ``x`` is saved only when ``weight`` or ``A`` needs a gradient, ``u = x·A_aᵀ`` (``(N, r_max)``
fp32) only when ``B`` does. Autocast (CPU and CUDA): ``x``, ``weight`` and ``bias`` are cast to the
autocast dtype, fp32 factors stay fp32 (rounded inside the kernels; fp32 gradients), other factors
are cast; the op then runs in that dtype accumulating in fp32. fp64 inputs are not cast.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch.nn import functional as F

from .. import _backend
from .._dtypes import accumulation_dtype
from ..kernels.reference import segmented as reference
from ..kernels.torch import segmented as torch_kernel
from ._checks import check_beside_weight, check_input
from ._checks import shape as _shape
from ._registry import needs, register_autocast, register_op

__all__ = [
    "lowrank_linear_segmented",
    "fused",
    "pack_adapters",
    "check_segmented",
    "slots_of_names",
    "pack_cached",
]

_NAME = "lowrank_linear_segmented"
# Backend preference, fastest first. CPU: the torch composition (grouping measured against a gather of
# per-row factors: kernels/torch/segmented.py). CUDA: Triton first, no host sync per call (the torch
# path reads the group sizes on the host); not measured on a GPU yet (bench/speed/bench_segmented.py
# times both there: the GPU check's `segmented` stage).
_CUDA_PREFERENCE = ("triton", "torch", "reference")
_CPU_PREFERENCE = ("torch", "reference")
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_INDEX_DTYPES = (torch.int64, torch.int32)


# ---------------------------------------------------------------------------------------------
# backend choice and the bodies every wrapper runs


_backend_for = _backend.TritonOrTorch(
    _NAME, "corda_kernels.kernels.triton.segmented", _CUDA_PREFERENCE, _CPU_PREFERENCE
)


def _kernels(backend: str):
    return _backend_for.kernels(backend, torch_kernel, reference)


def _forward(x, weight, A, B, index, scales, ranks, bias, keep_u=True):
    """``(y, u)`` of one call on the chosen backend (``u`` may be None when ``keep_u`` is False)."""
    return _kernels(_backend_for(x)).forward(x, weight, A, B, index, scales, ranks, bias, keep_u=keep_u)


def _backward(dy, x, weight, A, B, index, scales, ranks, u, needs):
    """``[dx, dweight, dA, dB, dbias]`` (None where ``needs`` says so)."""
    return _kernels(_backend_for(dy)).backward(dy, x, weight, A, B, index, scales, ranks, u, needs)


# ---------------------------------------------------------------------------------------------
# the registered op

_ARGS_SCHEMA = "Tensor weight, Tensor A, Tensor B, Tensor adapter_index, Tensor scales, Tensor? ranks"


def _op_forward(x, weight, A, B, index, scales, ranks, bias):
    return _forward(x, weight, A, B, index, scales, ranks, bias)


def _op_forward_fake(x, weight, A, B, index, scales, ranks, bias):
    n_rows = math.prod(x.shape[:-1])
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    return y, x.new_empty(n_rows, A.shape[1], dtype=accumulation_dtype(x.dtype))


def _op_backward(dy, x, weight, A, B, index, scales, ranks, u, needs):
    """``(dx, dweight, dA, dB, dbias)``; entries not flagged in ``needs`` are empty tensors."""
    grads = _backward(dy, x, weight, A, B, index, scales, ranks, u, needs)
    return tuple(dy.new_empty(0) if gr is None else gr for gr in grads)


def _op_backward_fake(dy, x, weight, A, B, index, scales, ranks, u, needs):
    out_f, in_f = weight.shape
    shapes = ((*dy.shape[:-1], in_f), tuple(weight.shape), tuple(A.shape), tuple(B.shape), (out_f,))
    like = (dy, weight, A, B, weight)
    return tuple(t.new_empty(s) if need else dy.new_empty(0) for t, s, need in zip(like, shapes, needs))


_segmented_op, _segmented_backward_op = register_op(
    _NAME,
    _op_forward,
    _op_forward_fake,
    f"(Tensor x, {_ARGS_SCHEMA}, Tensor? bias) -> (Tensor, Tensor)",
    _op_backward,
    _op_backward_fake,
    f"(Tensor dy, Tensor? x, {_ARGS_SCHEMA}, Tensor? u, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)


def _setup_context(ctx, inputs, output):
    x, weight, A, B, index, scales, ranks, bias = inputs
    g = ctx.needs_input_grad
    ctx.needs = needs(g[0], g[1], g[2], g[3], g[7])  # (x, weight, A, B, bias)
    need_x, need_w, need_a, need_b, _ = ctx.needs
    keep_x = x if (need_w or need_a) else None
    keep_u = output[1] if need_b else None
    ctx.save_for_backward(keep_x, weight, A, B, index, scales, ranks, keep_u)


def _backward_registered(ctx, dy, du):
    x, weight, A, B, index, scales, ranks, u = ctx.saved_tensors
    grads = _segmented_backward_op(dy, x, weight, A, B, index, scales, ranks, u, ctx.needs)
    dx, dw, dA, dB, dbias = (gr if need else None for gr, need in zip(grads, ctx.needs))
    return dx, dw, dA, dB, None, None, None, dbias


_segmented_op.register_autograd(_backward_registered, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# eager mode and autocast


class _EagerSegmented(torch.autograd.Function):
    """The op's forward/backward without the dispatcher (eager mode). Same bodies and saved tensors
    as the registered op."""

    @staticmethod
    def forward(ctx, x, weight, A, B, index, scales, ranks, bias):
        g = ctx.needs_input_grad
        ctx.needs = needs(g[0], g[1], g[2], g[3], g[7])  # (x, weight, A, B, bias)
        need_x, need_w, need_a, need_b, _ = ctx.needs
        y, u = _forward(x, weight, A, B, index, scales, ranks, bias, keep_u=need_b)
        keep_x = x if (need_w or need_a) else None
        keep_u = u if need_b else None
        ctx.save_for_backward(keep_x, weight, A, B, index, scales, ranks, keep_u)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, A, B, index, scales, ranks, u = ctx.saved_tensors
        if torch.is_autocast_enabled(dy.device.type):  # backward called inside an autocast region
            with torch.autocast(dy.device.type, enabled=False):
                grads = _backward(dy, x, weight, A, B, index, scales, ranks, u, ctx.needs)
        else:
            grads = _backward(dy, x, weight, A, B, index, scales, ranks, u, ctx.needs)
        dx, dw, dA, dB, dbias = (gr if need else None for gr, need in zip(grads, ctx.needs))
        return dx, dw, dA, dB, None, None, None, dbias


def _autocast_inputs(device_type, x, weight, A, B, bias):
    """``x``, ``weight``, ``bias`` to the autocast dtype; fp32 factors kept, others cast (fp64 inputs
    are left alone, as autocast leaves them)."""
    if x.dtype == torch.float64 or weight.dtype == torch.float64:
        return x, weight, A, B, bias
    dtype = torch.get_autocast_dtype(device_type)
    A = A if A.dtype in (torch.float32, dtype) else A.to(dtype)
    B = B if B.dtype in (torch.float32, dtype) else B.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return x.to(dtype), weight.to(dtype), A, B, bias


def _cast_and_run(device_type, x, weight, A, B, index, scales, ranks, bias):
    x, weight, A, B, bias = _autocast_inputs(device_type, x, weight, A, B, bias)
    return _segmented_op(x, weight, A, B, index, scales, ranks, bias)


register_autocast(_NAME, _cast_and_run)


def _eager_ok(*tensors) -> bool:
    return (
        all(t is None or type(t) in _PLAIN for t in tensors)
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
    )


def fused(x, weight, A, B, index, scales, ranks=None, bias=None) -> torch.Tensor:
    """The op without validation, on normalized arguments (those of the registered op: ``index``
    int64 ``(N,)``, ``scales`` fp32 ``(n,)``, ``ranks`` int64 ``(n,)`` or None, on ``x``'s device), for
    callers that validated once. The registered op when tracing or under tensor subclasses, else the
    eager ``autograd.Function`` (or no autograd when nothing requires a gradient)."""
    if not _eager_ok(x, weight, A, B, bias):
        return _segmented_op(x, weight, A, B, index, scales, ranks, bias)[0]
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        x, weight, A, B, bias = _autocast_inputs(device_type, x, weight, A, B, bias)
        with torch.autocast(device_type, enabled=False):  # the kernels choose their own precision
            return _eager(x, weight, A, B, index, scales, ranks, bias)
    return _eager(x, weight, A, B, index, scales, ranks, bias)


def _eager(x, weight, A, B, index, scales, ranks, bias) -> torch.Tensor:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, A, B, bias)):
        return _EagerSegmented.apply(x, weight, A, B, index, scales, ranks, bias)
    return _forward(x, weight, A, B, index, scales, ranks, bias, keep_u=False)[0]


# ---------------------------------------------------------------------------------------------
# validation, packing and the public entry


def pack_adapters(
    A: Sequence[torch.Tensor], B: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A_stack (n, r_max, in), B_stack (n, out, r_max), ranks (n,) int64)`` from per-adapter factors
    ``A[a] (r_a, in)`` / ``B[a] (out, r_a)``, zero-padded to the largest rank. Differentiable: the
    gradients of the stacks flow back to the listed tensors. All factors must share one dtype and
    one device (TypeError / ValueError naming the first that does not)."""
    if not isinstance(A, (list, tuple)) or not isinstance(B, (list, tuple)):
        raise TypeError(f"{_NAME}: pack_adapters takes lists of per-adapter A and B factors")
    if len(A) != len(B):
        raise ValueError(f"{_NAME}: {len(A)} A factors but {len(B)} B factors (one of each per adapter)")
    if not A:
        raise ValueError(f"{_NAME}: no adapters (empty lists of A and B factors)")
    first = A[0]
    for name, factors in (("A", A), ("B", B)):
        for i, t in enumerate(factors):
            what = f"{name}[{i}]"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_NAME}: {what} must be a tensor, got {type(t).__name__}")
            if t.dtype != first.dtype:
                raise TypeError(
                    f"{_NAME}: adapters of mixed dtypes: {what} is {t.dtype} but A[0] is {first.dtype} "
                    "(every adapter's factors must share one dtype)"
                )
            if t.device != first.device:
                raise ValueError(
                    f"{_NAME}: adapters on mixed devices: {what} is on {t.device} but A[0] is on {first.device}"
                )
            if t.dim() != 2:
                raise ValueError(f"{_NAME}: {what} must be 2-D, got shape {_shape(t)}")
    in_f, out_f = first.shape[1], B[0].shape[0]
    for i, (a, b) in enumerate(zip(A, B)):
        if a.shape[0] == 0:
            raise ValueError(f"{_NAME}: adapter {i} has rank 0 (A[{i}] {_shape(a)}); a low-rank adapter needs r >= 1")
        if a.shape[1] != in_f:
            raise ValueError(f"{_NAME}: A[{i}] {_shape(a)} has {a.shape[1]} columns but A[0] has {in_f}")
        if b.shape != (out_f, a.shape[0]):
            raise ValueError(
                f"{_NAME}: B[{i}] {_shape(b)} does not match A[{i}] {_shape(a)}: it must be ({out_f}, {a.shape[0]})"
            )
    ranks = [a.shape[0] for a in A]
    r_max = max(ranks)
    A_stack = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in A])
    B_stack = torch.stack([F.pad(b, (0, r_max - b.shape[1])) for b in B])
    return A_stack, B_stack, torch.tensor(ranks, dtype=torch.int64, device=first.device)


def slots_of_names(names: Sequence, slot_of, device) -> torch.Tensor:
    """One adapter slot per sequence as an int64 ``(len(names),)`` tensor on ``device``:
    ``slot_of(name)`` gives each name's slot (-1 for the base alone); the op broadcasts it over
    the sequence (``adapter_index`` of shape ``x.shape[:1]``)."""
    return torch.tensor([slot_of(name) for name in names], dtype=torch.int64, device=device)


def pack_cached(store: dict, key: tuple, tensors: Sequence[torch.Tensor], build):
    """``build()`` (packed stacks of named adapters), reused from ``store`` while no gradient is taken
    and none of ``tensors`` (the factors it reads) changed: same objects, storages, versions,
    devices and dtypes, and the same ``key`` (e.g. the adapters' names and scales). With a gradient it is built
    every call (differentiably)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return build()
    full = (key, tuple((id(t), t.data_ptr(), t._version, t.device, t.dtype, tuple(t.shape)) for t in tensors))
    cached = store.get("_corda_kernels_packed")
    if cached is not None and cached[0] == full:
        return cached[1]
    with torch.no_grad():
        packed = build()
    store["_corda_kernels_packed"] = (full, packed)
    return packed


def _scales_tensor(scales, n: int, device, check_values: bool) -> torch.Tensor:
    """``scales`` as an fp32 ``(n,)`` tensor on ``device`` (TypeError/ValueError naming it)."""
    if isinstance(scales, torch.Tensor):
        if not scales.dtype.is_floating_point:
            raise TypeError(f"{_NAME}: scales must be a float tensor, got {scales.dtype}")
        if scales.dim() > 1 or (scales.dim() == 1 and scales.numel() != n):
            raise ValueError(
                f"{_NAME}: scales has shape {_shape(scales)} but there are {n} adapters: pass one scale or ({n},)"
            )
        if check_values and not bool(torch.isfinite(scales).all()):
            raise ValueError(f"{_NAME}: scales must be finite, got {scales.tolist()}")
        return scales.detach().to(device=device, dtype=torch.float32).expand(n).contiguous()
    values = [scales] if isinstance(scales, numbers.Real) else scales
    if not isinstance(values, (list, tuple)):
        raise TypeError(f"{_NAME}: scales must be a real number, a sequence or a tensor, got {type(scales).__name__}")
    for s in values:
        if isinstance(s, bool) or not isinstance(s, numbers.Real):
            raise TypeError(f"{_NAME}: scales must hold real numbers, got {type(s).__name__} {s!r}")
        if not math.isfinite(s):
            raise ValueError(f"{_NAME}: scales must be finite, got {s}")
    if len(values) not in (1, n):
        raise ValueError(f"{_NAME}: scales has {len(values)} entries but there are {n} adapters")
    return torch.tensor([float(s) for s in values] * (n if len(values) == 1 else 1), dtype=torch.float32, device=device)


def _ranks_tensor(ranks, n: int, r_max: int, device, check_values: bool) -> Optional[torch.Tensor]:
    if ranks is None:
        return None
    if isinstance(ranks, (list, tuple)):
        if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in ranks):
            raise TypeError(f"{_NAME}: ranks must hold integers, got {list(ranks)!r}")
        ranks = torch.tensor(ranks, dtype=torch.int64)
    if not isinstance(ranks, torch.Tensor) or ranks.dtype not in _INDEX_DTYPES:
        got = ranks.dtype if isinstance(ranks, torch.Tensor) else type(ranks).__name__
        raise TypeError(f"{_NAME}: ranks must be an int64/int32 tensor or a list of ints, got {got}")
    if _shape(ranks) != (n,):
        raise ValueError(f"{_NAME}: ranks has shape {_shape(ranks)} but there are {n} adapters: it must be ({n},)")
    if check_values and n:
        lo, hi = (int(v) for v in torch.aminmax(ranks))
        if lo < 1 or hi > r_max:
            bad = lo if lo < 1 else hi
            raise ValueError(f"{_NAME}: ranks holds {bad}, out of range [1, {r_max}] (r_max = A.shape[1])")
    return ranks.to(device=device, dtype=torch.int64)


def _index_tensor(index, x: torch.Tensor, n: int, check_values: bool) -> torch.Tensor:
    """``adapter_index`` as int64 ``(N,)`` (a per-sequence index broadcast over the sequence dims)."""
    if not isinstance(index, torch.Tensor) or index.dtype not in _INDEX_DTYPES:
        got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(f"{_NAME}: adapter_index must be an int64 or int32 tensor, got {got}")
    if index.device != x.device:
        raise ValueError(f"{_NAME}: device mismatch: adapter_index is on {index.device} but x is on {x.device}")
    per_token, per_sequence = tuple(x.shape[:-1]), tuple(x.shape[:1])
    if _shape(index) == per_token:
        full = index
    elif x.dim() >= 2 and _shape(index) == per_sequence:
        full = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(per_token)
    else:
        raise ValueError(
            f"{_NAME}: adapter_index has shape {_shape(index)} but x {_shape(x)} needs x.shape[:-1] = "
            f"{per_token} (one adapter per token) or x.shape[:1] = {per_sequence} (one per sequence)"
        )
    if check_values and index.numel():
        lo, hi = (int(v) for v in torch.aminmax(index))
        if lo < -1 or hi >= n:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"{_NAME}: adapter_index holds {bad}, out of range for {n} adapters "
                f"(valid: 0..{n - 1}, or -1 for no adapter)"
            )
    return full.reshape(-1).to(torch.int64)


def check_segmented(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> None:
    """Raise TypeError/ValueError naming the offending tensor if the base and the stacked factors
    are inconsistent (dtypes, devices, shapes)."""
    check_beside_weight(_NAME, weight, {"weight": weight, "A": A, "B": B, "bias": bias}, factors=("A", "B"))
    if weight.dim() != 2:
        raise ValueError(f"{_NAME}: weight must be 2-D (out_features, in_features), got shape {_shape(weight)}")
    out_f, in_f = weight.shape
    if A.dim() != 3:
        raise ValueError(f"{_NAME}: A must be 3-D (n_adapters, r_max, in_features), got shape {_shape(A)}")
    if B.dim() != 3:
        raise ValueError(f"{_NAME}: B must be 3-D (n_adapters, out_features, r_max), got shape {_shape(B)}")
    n, r_max = A.shape[0], A.shape[1]
    if n == 0:
        raise ValueError(f"{_NAME}: A {_shape(A)} holds no adapters")
    if r_max == 0:
        raise ValueError(f"{_NAME}: rank r_max = A.shape[1] is 0; a low-rank adapter needs r >= 1")
    if B.shape[0] != n:
        raise ValueError(f"{_NAME}: A {_shape(A)} and B {_shape(B)} disagree on the number of adapters")
    if A.shape[2] != in_f:
        raise ValueError(f"{_NAME}: A {_shape(A)} has {A.shape[2]} columns but in_features is {in_f}")
    if B.shape[1] != out_f:
        raise ValueError(f"{_NAME}: B {_shape(B)} has {B.shape[1]} rows but out_features is {out_f}")
    if B.shape[2] != r_max:
        raise ValueError(
            f"{_NAME}: A {_shape(A)} and B {_shape(B)} disagree on the padded rank: B must be ({n}, {out_f}, {r_max})"
        )
    if bias is not None and _shape(bias) != (out_f,):
        raise ValueError(f"{_NAME}: bias must have shape ({out_f},), got {_shape(bias)}")


def lowrank_linear_segmented(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: Union[torch.Tensor, Sequence[torch.Tensor]],
    B: Union[torch.Tensor, Sequence[torch.Tensor]],
    adapter_index: torch.Tensor,
    *,
    scales: Union[float, Sequence[float], torch.Tensor] = 1.0,
    ranks: Union[torch.Tensor, Sequence[int], None] = None,
    bias: Optional[torch.Tensor] = None,
    validate_indices: bool = True,
) -> torch.Tensor:
    """Many low-rank adapters over one base layer, one adapter per row, in one call.

    ``y[m] = x[m]·weightᵀ + bias + scales[a]·(x[m]·A[a]ᵀ)·B[a]ᵀ`` with ``a = adapter_index[m]``;
    rows whose index is -1 get the base layer alone. Rows are grouped by adapter inside the op, so
    indices may come in any order and repeat.

    Args:
        x: ``(..., in)`` activations (fp16/bf16/fp32/fp64).
        weight: ``(out, in)`` base weight, ``x``'s dtype (under autocast both are cast); it may require grad.
        A: ``(n, r_max, in)`` stacked down projections zero-padded to the largest rank, or a list of
            ``n`` per-adapter ``(r_a, in)`` tensors (then packed by :func:`pack_adapters`). ``weight``'s
            dtype, or fp32 on a 16-bit ``weight`` (rounded to it at the products).
        B: ``(n, out, r_max)`` stacked up projections, or a list of ``(out, r_a)`` tensors; dtype as ``A``.
        adapter_index: int64 or int32 adapter of each row, shape ``x.shape[:-1]`` (per token) or
            ``x.shape[:1]`` (per sequence); values in ``[-1, n)``, -1 meaning no adapter.
        scales: every adapter's scale: one float for all, ``n`` floats, or an ``(n,)`` float tensor
            (constants: no gradient reaches them).
        ranks: each stacked adapter's own rank (``n`` ints or an int tensor, values in ``[1, r_max]``):
            rank components at or past it never contribute and get zero gradient. None: every adapter
            has rank ``r_max`` (or, for lists, their own).
        bias: optional ``(out,)``, ``weight``'s dtype.
        validate_indices: read ``adapter_index``, ``ranks`` and a ``scales`` tensor to check their
            values (a device sync on GPU; skipped under ``torch.compile``).

    Returns:
        ``(..., out)`` in ``x``'s dtype (the autocast dtype under autocast). Gradients reach ``x``,
        ``weight``, ``A``, ``B`` and ``bias`` where they require one.

    Raises:
        TypeError: a non-tensor or non-float input, an index of another dtype than int64/int32,
            factors whose dtype is neither ``weight``'s nor fp32 on a 16-bit ``weight``, listed
            adapters of mixed dtypes, bad ``scales`` / ``ranks`` types.
        ValueError: shapes that disagree (``x`` vs ``weight``, ``A`` vs ``B``, ``adapter_index`` vs
            ``x``, ``scales`` / ``ranks`` vs the number of adapters), tensors on different devices,
            index values outside ``[-1, n)``, ranks outside ``[1, r_max]`` (or given with lists), non-finite
            scales, a listed adapter of rank 0.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_NAME}: x must be a tensor, got {type(x).__name__}")
    check_values = validate_indices and not torch.compiler.is_compiling()
    if isinstance(A, (list, tuple)) or isinstance(B, (list, tuple)):
        if ranks is not None:
            raise ValueError(f"{_NAME}: ranks comes from the per-adapter lists; pass it only with stacked A and B")
        A, B, ranks = pack_adapters(A, B)
    check_segmented(weight, A, B, bias)
    check_input(_NAME, x, weight)
    n, r_max = A.shape[0], A.shape[1]
    index = _index_tensor(adapter_index, x, n, check_values)
    scales_t = _scales_tensor(scales, n, x.device, check_values)
    ranks_t = _ranks_tensor(ranks, n, r_max, x.device, check_values)
    return fused(x, weight, A, B, index, scales_t, ranks_t, bias)
