"""``LowRankLinear``: a frozen linear layer plus a (partial, diagonal-scaled) low-rank adapter.

``y = x·Wᵀ + b + s · scatter_rows((drop(x[..., col_index])·Aᵀ ⊙ diag) · Bᵀ)`` through the fused
op :func:`corda_kernels.ops.lowrank_linear.lowrank_linear`. ``W`` is the frozen base (the residual
``W − s·B·A`` for CorDA / PiSSA / SiVA), ``A (r, n_cols)`` and ``B (n_rows, r)`` are compact over
the selected input / output features (Partial-LoRA), ``diag (r,)`` is SiVA's trainable diagonal.
With a ``magnitude (out,)`` (DoRA) the layer computes ``y = (m / n) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b``
through :func:`corda_kernels.ops.dora.dora_linear`, ``n`` the adapted weight's row norms.

Several named adapters on one base (:meth:`LowRankLinear.add_adapter`): the first one lives in the
layer's own tensors (``A``, ``B``, ...), each further one in an :class:`AdapterFactors` child
(``extra_adapters[name]``). The forward uses the active adapter (:meth:`LowRankLinear.set_adapter`),
or one adapter per row (``adapter_index``, or :func:`corda_kernels.adapter_rows` for a whole model)
through the segmented op in one call. All adapters then share the original weight: a subtractive
adapter (CorDA, PiSSA, MiLoRA, SiVA) keeps its frozen initial factors ``A0 (r0, in)``,
``B0 (out, r0)`` and serves as ``s·(B·A − B0·A0)`` (:func:`serving_factors`: rank ``r + r0``, the
conversion PEFT offers for PiSSA/CorDA).
"""

from __future__ import annotations

import functools
from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from .._dtypes import HALF_DTYPES
from ..ops import dora, segmented
from ..ops.lowrank_linear import (
    Options,
    check_dropout,
    check_factors,
    check_scale,
    delta_weight,
    draw_seed,
    fused,
)
from ..ops.quantized import QuantizedWeight, quantize_weight

_FACTORS = ("A", "B", "diag")
BASE_ONLY = "__base__"  # a row's adapter name for the base alone (PEFT's name); None works too
_ROWS = "_corda_kernels_rows"  # per-row adapter index set by corda_kernels.adapter_rows for one forward


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and alone in its storage (a copy when it is a strided view, e.g. a transposed
    factor, or a slice of a larger tensor, e.g. one layer of a batched decomposition). Stored
    tensors must be: safetensors and transformers' ``save_pretrained`` view them flat (a strided
    view fails when layers share a storage), and a slice would keep the whole batch alive."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def adapter_dtype(weight_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype trainable factors are stored in: fp32 on a 16-bit weight unless
    ``autocast_adapter_dtype`` is False, else the weight's dtype."""
    return torch.float32 if autocast_adapter_dtype and weight_dtype in HALF_DTYPES else weight_dtype


def _refuse_dora_options(row_index, col_index, diag, where: str) -> None:
    """DoRA's norm runs over whole rows of the full update: no index sets (Partial-LoRA) or diagonal (SiVA)."""
    for name, value in (("row_index", row_index), ("col_index", col_index), ("diag", diag)):
        if value is not None:
            raise ValueError(
                f"{where}: DoRA (magnitude) cannot be combined with {name} (Partial-LoRA index sets and SiVA's "
                "diagonal are not defined for DoRA)"
            )


def dense_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    out_features: int,
    in_features: int,
    *,
    diag: Optional[torch.Tensor] = None,
    row_index: Optional[torch.Tensor] = None,
    col_index: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense ``(r, in)`` / ``(out, r)`` factors of a compact adapter: ``diag`` folded into ``A``, the
    index sets scattered into zeros. Differentiable (gradients reach ``A``, ``B`` and ``diag``)."""
    if diag is not None:
        A = A * diag.unsqueeze(1)
    if col_index is not None:
        A = A.new_zeros(A.shape[0], in_features).index_copy(1, col_index, A)
    if row_index is not None:
        B = B.new_zeros(out_features, B.shape[1]).index_copy(0, row_index, B)
    return A, B


def with_initial(
    A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[A; A0]`` and ``[B, −B0]``: a subtractive adapter as a rank ``r + r0`` LoRA on the original
    weight (``B·A − B0·A0``), in the dtype the four promote to."""
    dtype = functools.reduce(torch.promote_types, (A.dtype, B.dtype, A0.dtype, B0.dtype))
    return torch.cat([A.to(dtype), A0.to(dtype)], 0), torch.cat([B.to(dtype), -B0.to(dtype)], 1)


def serving_factors(owner: nn.Module, out_features: int, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense factors an adapter (a :class:`LowRankLinear`'s own, or an :class:`AdapterFactors`)
    computes with on the original weight: :func:`dense_factors`, then :func:`with_initial` when it
    keeps initial factors. Differentiable."""
    sparsity = {"diag": owner.diag, "row_index": owner.row_index, "col_index": owner.col_index}
    A, B = dense_factors(owner.A, owner.B, out_features, in_features, **sparsity)
    A0 = getattr(owner, "A0", None)
    return (A, B) if A0 is None else with_initial(A, B, A0, owner.B0)


def _factor_tensors(owner: nn.Module) -> list:
    """Every tensor the adapter's serving factors are computed from (a cache key)."""
    names = ("A", "B", "diag", "row_index", "col_index", "A0", "B0")
    return [t for t in (getattr(owner, n, None) for n in names) if t is not None]


def _check_initial(weight: torch.Tensor, A0, B0, where: str) -> None:
    """``A0 (r0, in)`` / ``B0 (out, r0)``: float, finite, on the weight's device."""
    out_f, in_f = weight.shape
    for name, t in (("A0", A0), ("B0", B0)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"{where}: initial factor {name} must be a float tensor, got {got}")
        if t.device != weight.device:
            raise ValueError(f"{where}: initial factor {name} is on {t.device}, the weight on {weight.device}")
    if A0.dim() != 2 or B0.dim() != 2 or A0.shape[1] != in_f or B0.shape != (out_f, A0.shape[0]):
        raise ValueError(
            f"{where}: initial factors A0 {tuple(A0.shape)} and B0 {tuple(B0.shape)} must be (r0, {in_f}) and "
            f"({out_f}, r0)"
        )
    if not (bool(torch.isfinite(A0).all()) and bool(torch.isfinite(B0).all())):
        raise FloatingPointError(f"{where}: initial factors hold NaN or Inf")


class AdapterFactors(nn.Module):
    """A further named adapter of a :class:`LowRankLinear` (its ``extra_adapters[name]``): the
    factors, index sets and options the layer's own adapter has, on the layer's weight.

    ``A``, ``B``, ``diag`` are parameters when named in ``trainable`` (fp32 on a 16-bit weight unless
    ``autocast_adapter_dtype`` is False) and buffers otherwise; ``row_index`` / ``col_index``
    int64 buffers; ``A0 (r0, in)`` / ``B0 (out, r0)`` frozen buffers (the initial factors of a
    subtractive adapter, stored as the trainable factors) or None. Validated as
    :class:`LowRankLinear` validates its own (errors prefixed by ``where``).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        *,
        scale: float = 1.0,
        diag: Optional[torch.Tensor] = None,
        row_index: Optional[torch.Tensor] = None,
        col_index: Optional[torch.Tensor] = None,
        trainable: Union[str, Iterable[str]] = ("A", "B"),
        dropout: float = 0.0,
        autocast_adapter_dtype: bool = True,
        initial: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        where: str = "AdapterFactors",
    ):
        super().__init__()
        trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
        unknown = [name for name in trainable if name not in _FACTORS]
        if unknown:
            raise ValueError(f"{where}: trainable may name {_FACTORS}, got {unknown}")
        if "diag" in trainable and diag is None:
            raise ValueError(f"{where}: trainable names 'diag' but no diag was given")
        self.dropout = check_dropout(dropout, where)
        self.scale = float(check_scale(scale, where))
        train_dtype = adapter_dtype(weight.dtype, autocast_adapter_dtype)
        A, B, diag = (
            None if t is None else _owned(t.detach().to(train_dtype if name in trainable else weight.dtype))
            for name, t in zip(_FACTORS, (A, B, diag))
        )
        row_index, col_index = (None if t is None else _owned(t) for t in (row_index, col_index))
        try:
            check_factors(weight, A, B, row_index=row_index, col_index=col_index, diag=diag)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None
        for name, tensor in zip(_FACTORS, (A, B, diag)):
            if tensor is not None and name in trainable:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)
        self.register_buffer("row_index", row_index)
        self.register_buffer("col_index", col_index)
        A0 = B0 = None
        if initial is not None:
            A0, B0 = initial
            _check_initial(weight, A0, B0, where)
            A0, B0 = (_owned(t.detach().to(train_dtype)) for t in (A0, B0))
        self.register_buffer("A0", A0)
        self.register_buffer("B0", B0)
        self.trainable = trainable

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}, scale={self.scale:g}, trainable={self.trainable}, dropout={self.dropout:g}, "
            f"initial={self.A0 is not None}"
        )


class _Checked:
    """A float attribute of a module validated on every assignment by ``check(value, where)`` (the
    constructor's check), stored as ``_<name>`` (so pickles keep it as a plain attribute)."""

    def __init__(self, check, doc: str):
        self.check, self.__doc__ = check, doc

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.slot = f"{owner.__name__}.{name}", "_" + name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__[self.slot]

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = self.check(value, self.name)


class LowRankLinear(nn.Module):
    """A linear layer ``(..., in) -> (..., out)`` with a fused low-rank adapter.

    State: ``weight (out, in)`` and ``bias (out,)`` are frozen parameters; ``A``, ``B`` and
    ``diag`` are trainable parameters when named in ``trainable`` and persistent buffers otherwise
    (asymmetric LoRA: ``trainable=("B",)``; SiVA: ``trainable=("diag",)``); ``row_index`` and
    ``col_index`` are persistent int64 buffers (or None); ``merged_state`` is a persistent bool
    buffer mirroring :attr:`merged`, so a merged module's state dict loads as merged.

    Dropout (probability ``dropout``) applies to the adapter's input in training mode only.

    Dtypes: on a bf16/fp16 ``weight`` the trainable factors are stored in fp32 by default
    (``autocast_adapter_dtype=True``, PEFT's name and default), so optimizers such as Adam see fp32
    parameters (in fp16 Adam's ``eps`` rounds to 0; in bf16 updates below 2⁻⁸ of a value are lost);
    the forward rounds them to the compute dtype where they enter a product (the op's rounding
    rule). ``autocast_adapter_dtype=False`` stores them in the weight's dtype. Frozen factors and the
    frozen ``weight`` / ``bias`` keep the weight's dtype. The forward takes ``x`` in the weight's
    dtype (any dtype under ``torch.autocast``) and raises ``TypeError`` otherwise.

    Args:
        weight: ``(out, in)`` frozen base (fp16/bf16/fp32/fp64).
        A: ``(r, n_cols)`` down projection over the input features ``col_index`` (all when None).
        B: ``(n_rows, r)`` up projection onto the output features ``row_index`` (all when None).
        bias: optional ``(out,)`` frozen bias.
        scale: the adapter's multiplier ``s`` (``alpha / r``); finite.
        diag: optional ``(r,)`` diagonal between the factors (SiVA).
        row_index: optional distinct int64 output features the adapter writes (Partial-LoRA).
        col_index: optional distinct int64 input features the adapter reads (Partial-LoRA).
        trainable: which of ``"A"``, ``"B"``, ``"diag"`` are parameters (the rest are buffers).
        dropout: probability in [0, 1) of dropping an adapter input entry while training.
        autocast_adapter_dtype: store trainable factors in fp32 on a 16-bit ``weight``.
        magnitude: optional ``(out,)`` DoRA magnitude (a trainable parameter, stored as the
            trainable factors are); see :meth:`enable_dora` to initialize it from the weight.
            Not combinable with ``row_index`` / ``col_index`` / ``diag`` (DoRA's norm is over
            whole rows of the full update). With dropout in training mode the layer follows PEFT's
            DoRA: ``x·Wᵀ + b + (m/n - 1) ⊙ (x_d·Wᵀ) + (m/n) ⊙ s·(x_d·Aᵀ)·Bᵀ`` for the dropped-out
            ``x_d`` (three base products, unfused).

    Raises:
        ValueError: ``trainable`` names something other than A, B, diag (or diag without a
            ``diag``); shapes disagree (rank, index lengths, bias, magnitude); an index is out of
            range or duplicated; ``scale`` is not finite or ``dropout`` outside [0, 1) (also when
            set later); ``magnitude`` is not finite or given with index sets or a diagonal.
        TypeError: a tensor is not a float tensor, a dtype differs from the weight's (factors and
            magnitude may be fp32 on a 16-bit weight), an index is not int64, or ``scale`` /
            ``dropout`` is not a number.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        *,
        bias: Optional[torch.Tensor] = None,
        scale: float = 1.0,
        diag: Optional[torch.Tensor] = None,
        row_index: Optional[torch.Tensor] = None,
        col_index: Optional[torch.Tensor] = None,
        trainable: Union[str, Iterable[str]] = ("A", "B"),
        dropout: float = 0.0,
        autocast_adapter_dtype: bool = True,
        magnitude: Optional[torch.Tensor] = None,
    ):
        super().__init__()
        trainable = (trainable,) if isinstance(trainable, str) else tuple(trainable)
        unknown = [name for name in trainable if name not in _FACTORS]
        if unknown:
            raise ValueError(f"LowRankLinear: trainable may name {_FACTORS}, got {unknown}")
        if "diag" in trainable and diag is None:
            raise ValueError("LowRankLinear: trainable names 'diag' but no diag was given")
        dropout = check_dropout(dropout, "LowRankLinear")
        scale = check_scale(scale, "LowRankLinear")
        train_dtype = adapter_dtype(weight.dtype, autocast_adapter_dtype)
        A, B, diag = (
            None if t is None else _owned(t.detach().to(train_dtype if name in trainable else weight.dtype))
            for name, t in zip(_FACTORS, (A, B, diag))
        )
        row_index, col_index = (None if t is None else _owned(t) for t in (row_index, col_index))
        check_factors(weight, A, B, bias=bias, row_index=row_index, col_index=col_index, diag=diag)
        if magnitude is not None:
            _refuse_dora_options(row_index, col_index, diag, "LowRankLinear")
            if isinstance(magnitude, torch.Tensor) and magnitude.dtype in (torch.float32, weight.dtype):
                magnitude = _owned(magnitude.detach().to(train_dtype))
            dora.check_dora(weight, A, B, magnitude, bias=bias, where="LowRankLinear")
        self.weight = nn.Parameter(_owned(weight.detach()), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(_owned(bias.detach()), requires_grad=False)
        for name, tensor in zip(_FACTORS, (A, B, diag)):
            if tensor is not None and name in trainable:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)
        self.register_buffer("row_index", row_index)
        self.register_buffer("col_index", col_index)
        self.register_buffer("merged_state", torch.zeros((), dtype=torch.bool, device=weight.device))
        self.register_parameter("magnitude", None if magnitude is None else nn.Parameter(magnitude))
        self._weight_sq_cache: Optional[tuple] = None
        self._dora_merge_factor: Optional[torch.Tensor] = None
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.trainable = trainable
        self.merged = False
        self.adapter_name = "default"
        self.active_adapter = "default"
        self.register_load_state_dict_post_hook(LowRankLinear._after_load)

    scale = _Checked(check_scale, "The adapter's multiplier (``alpha / r`` for LoRA); checked when set.")
    dropout = _Checked(check_dropout, "Dropout probability on the adapter's input while training; checked when set.")

    def __setstate__(self, state: dict) -> None:
        # modules pickled before scale/dropout became checked properties kept them as plain attributes
        for name in ("scale", "dropout"):
            if name in state:
                state["_" + name] = state.pop(name)
        state.setdefault("adapter_name", "default")  # modules pickled before named adapters
        state.setdefault("active_adapter", state["adapter_name"])
        super().__setstate__(state)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor, adapter_index=None) -> torch.Tensor:
        """``x (..., in) -> (..., out)`` with the active adapter, or with one adapter per row:
        ``adapter_index`` (or :func:`corda_kernels.adapter_rows` around a model's forward) is an
        int64/int32 tensor of shape ``x.shape[:1]`` (per sequence) or ``x.shape[:-1]`` (per token)
        indexing :attr:`adapter_names` (-1: the base alone), or a list of adapter names per sequence
        (None or ``"__base__"``: the base alone). Per-row batches run the segmented op in one call
        (gradients reach every adapter's trainable factors), without dropout."""
        rows = adapter_index if adapter_index is not None else self.__dict__.get(_ROWS)
        if self.merged:
            if rows is not None:
                raise ValueError(
                    f"{self._where()}: the layer is merged (adapter {self.active_adapter!r} is in its weight); "
                    "unmerge it to run one adapter per row"
                )
            return F.linear(x, self.weight, self.bias)
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"LowRankLinear: input dtype {x.dtype} differs from the weight's {self.weight.dtype} "
                "(cast the input, or run under torch.autocast)"
            )
        if rows is not None:
            return self._per_row(x, rows)
        # The factors were validated at construction / load: the op's unvalidated entry (per-call cost).
        if self.active_adapter != self.adapter_name:
            owner = self.extra_adapters[self.active_adapter]
            p = owner.dropout if self.training else 0.0
        else:
            owner, p = self, (self.dropout if self.training else 0.0)
            if self.dora:
                return self._dora_forward(x, p)
        seed = draw_seed(x.device) if p > 0.0 else None
        if getattr(owner, "A0", None) is None:
            opts = Options(owner.scale, self.bias, owner.row_index, owner.col_index, owner.diag, p, seed)
            return fused(x, self.weight, owner.A, owner.B, opts)
        A, B = serving_factors(owner, self.out_features, self.in_features)
        return fused(x, self.weight, A, B, Options(owner.scale, self.bias, dropout=p, seed=seed))

    # -- several named adapters ------------------------------------------------------------------

    def _where(self) -> str:
        name = self.__dict__.get("layer_name")
        return f"layer {name}" if name else "LowRankLinear"

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The layer's adapters: its own first, then the added ones in the order they were added."""
        extras = self._modules.get("extra_adapters")
        return (self.adapter_name, *(extras.keys() if extras is not None else ()))

    @property
    def on_original_base(self) -> bool:
        """Whether the weight is the original one with several adapters possible: the layer holds
        added adapters, or its own adapter keeps initial factors (:meth:`use_original_base`)."""
        return len(self.adapter_names) > 1 or getattr(self, "A0", None) is not None

    def adapter(self, name: Optional[str] = None) -> nn.Module:
        """The module holding adapter ``name``'s tensors (this layer for its own adapter, else an
        :class:`AdapterFactors`); the active adapter when None. ValueError naming the layer for an
        unknown name."""
        name = self.active_adapter if name is None else name
        if name == self.adapter_name:
            return self
        extras = self._modules.get("extra_adapters")
        if extras is None or not isinstance(name, str) or name not in extras:
            raise ValueError(f"{self._where()}: unknown adapter {name!r}; the layer holds {list(self.adapter_names)}")
        return extras[name]

    def set_adapter(self, name: str) -> LowRankLinear:
        """Make ``name`` the active adapter: the forward uses it, and only its trainable factors
        require grad (as PEFT's ``set_adapter``)."""
        if self.merged:
            raise ValueError(f"{self._where()}: set_adapter: the layer is merged; unmerge it first")
        owner = self.adapter(name)
        for other in (self.adapter(n) for n in self.adapter_names):
            for factor in other.trainable:
                tensor = getattr(other, factor)
                if isinstance(tensor, nn.Parameter):
                    tensor.requires_grad_(other is owner)
            if other is self and self.dora:
                self.magnitude.requires_grad_(other is owner)
        self.active_adapter = name
        return self

    def _check_addable(self, name, where: str) -> None:
        """Refuse a name or a layer state another adapter cannot be added with (nothing changed)."""
        if not isinstance(name, str) or not name or "." in name or name == BASE_ONLY:
            raise ValueError(f"{where}: an adapter name is a non-empty str without '.', not {BASE_ONLY!r}: {name!r}")
        if name in self.adapter_names:
            raise ValueError(f"{where}: the layer already holds an adapter named {name!r} ({list(self.adapter_names)})")
        self._check_multi(where)

    def _check_multi(self, where: str) -> None:
        if self.merged:
            raise ValueError(f"{where}: the layer is merged; unmerge it first")
        if isinstance(self.weight, QuantizedWeight):
            raise ValueError(f"{where}: the layer's base is quantized; several adapters share a dense original weight")
        if self.dora:
            raise ValueError(
                f"{where}: the layer uses DoRA; its magnitude rescales whole output rows, so DoRA adapters cannot "
                "share a layer with others"
            )

    def add_adapter(
        self,
        name: str,
        A: torch.Tensor,
        B: torch.Tensor,
        *,
        scale: float = 1.0,
        diag: Optional[torch.Tensor] = None,
        row_index: Optional[torch.Tensor] = None,
        col_index: Optional[torch.Tensor] = None,
        trainable: Union[str, Iterable[str]] = ("A", "B"),
        dropout: float = 0.0,
        autocast_adapter_dtype: bool = True,
        initial: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> LowRankLinear:
        """Add a further named adapter on this layer's weight (options as the constructor's);
        ``initial=(A0, B0)`` (dense ``(r0, in)``, ``(out, r0)``) makes it subtractive: it computes
        ``s·(scatter(B·diag·A) − B0·A0)``. The new adapter is inactive (:meth:`set_adapter`) and its
        factors do not require grad until it is set. Nothing changes when a check fails.

        Raises:
            ValueError: a bad or duplicate name; the layer is merged, quantized, uses DoRA, or its
                weight is a residual (call :meth:`use_original_base` first); bad shapes.
            TypeError: factors of another dtype than the layer's adapters (mixed dtypes) or than
                the constructor allows.
        """
        where = f"{self._where()}: add_adapter({name!r})"
        self._check_addable(name, where)
        if getattr(self, "base_changed", False) and getattr(self, "A0", None) is None:
            raise ValueError(
                f"{where}: the weight is adapter {self.adapter_name!r}'s residual W - s*B0*A0; restore the original "
                "weight first (use_original_base(A0, B0), or apply(..., initial=) for a model)"
            )
        adapter = AdapterFactors(
            self.weight,
            A,
            B,
            scale=scale,
            diag=diag,
            row_index=row_index,
            col_index=col_index,
            trainable=trainable,
            dropout=dropout,
            autocast_adapter_dtype=autocast_adapter_dtype,
            initial=initial,
            where=where,
        )
        ours, theirs = self._train_dtype(self), self._train_dtype(adapter)
        if None not in (ours, theirs) and ours != theirs:
            raise TypeError(
                f"{where}: adapters of mixed dtypes: the new adapter's trainable factors are {theirs}, the layer's "
                f"{ours} (autocast_adapter_dtype must match the first adapter's)"
            )
        adapter.requires_grad_(False)
        if "extra_adapters" not in self._modules:
            self.extra_adapters = nn.ModuleDict()
        self.extra_adapters[name] = adapter
        self.__dict__.pop("_corda_kernels_packed", None)
        return self

    @staticmethod
    def _train_dtype(owner: nn.Module) -> Optional[torch.dtype]:
        dtypes = {getattr(owner, n).dtype for n in owner.trainable if getattr(owner, n) is not None}
        return next(iter(dtypes)) if len(dtypes) == 1 else None

    def delete_adapter(self, name: str) -> LowRankLinear:
        """Remove an added adapter (the layer's own, first adapter stays); the active adapter falls
        back to the first one if it was ``name``."""
        if name == self.adapter_name:
            raise ValueError(f"{self._where()}: delete_adapter: {name!r} is the layer's own adapter; it stays")
        self.adapter(name)
        if self.merged:
            raise ValueError(f"{self._where()}: delete_adapter: the layer is merged; unmerge it first")
        del self.extra_adapters[name]
        if not len(self.extra_adapters):
            del self.extra_adapters
        if self.active_adapter == name:
            self.set_adapter(self.adapter_name)
        self.__dict__.pop("_corda_kernels_packed", None)
        return self

    @torch.no_grad()
    def use_original_base(self, A0: torch.Tensor, B0: torch.Tensor) -> LowRankLinear:
        """Turn a residual base ``W' = W − s·B0·A0`` back into the original ``W`` (fp32 / fp64 sum of the
        factors rounded as the forward rounds them, one cast) and keep ``A0 (r0, in)``,
        ``B0 (out, r0)`` (dense, e.g. the initial adapter ``save_peft_adapter`` wrote) as frozen
        buffers, so the layer's own adapter computes ``s·(B·A − B0·A0)`` on ``W``: its outputs are
        unchanged and further adapters can share ``W``. :meth:`restore_residual_base` undoes it."""
        where = f"{self._where()}: use_original_base"
        self._check_multi(where)
        if getattr(self, "A0", None) is not None:
            raise ValueError(f"{where}: the layer already holds its original weight and initial factors")
        _check_initial(self.weight, A0, B0, where)
        dtype = functools.reduce(torch.promote_types, (self.A.dtype, self.B.dtype))
        A0, B0 = (_owned(t.detach().to(dtype)) for t in (A0, B0))
        self.weight.copy_((self.weight.to(self._sum_dtype()) + self._initial_delta(A0, B0)).to(self.weight.dtype))
        self.register_buffer("A0", A0)
        self.register_buffer("B0", B0)
        self.base_changed = False
        self.__dict__.pop("_corda_kernels_packed", None)
        return self

    @torch.no_grad()
    def restore_residual_base(self) -> LowRankLinear:
        """Undo :meth:`use_original_base` (exact in fp32; one rounding in 16-bit dtypes); the layer
        must hold no added adapter."""
        if len(self.adapter_names) > 1 or getattr(self, "A0", None) is None:
            raise ValueError(f"{self._where()}: restore_residual_base: no initial factors, or added adapters remain")
        self.weight.copy_(self.residual_base())
        del self._buffers["A0"], self._buffers["B0"]
        self.base_changed = True
        return self

    @torch.no_grad()
    def residual_base(self) -> torch.Tensor:
        """``W − s·B0·A0`` in the weight's dtype, from the original weight and the own adapter's
        initial factors (what :meth:`restore_residual_base` stores; the layer is not changed)."""
        return (self.weight.to(self._sum_dtype()) - self._initial_delta(self.A0, self.B0)).to(self.weight.dtype)

    def _sum_dtype(self) -> torch.dtype:
        """fp32, or fp64 for an fp64 weight: where base and update are summed."""
        return torch.promote_types(self.weight.dtype, torch.float32)

    def _initial_delta(self, A0: torch.Tensor, B0: torch.Tensor) -> torch.Tensor:
        """``s·B0·A0`` (fp32, fp64 on an fp64 weight) from the factors rounded to the weight's dtype
        (as the forward uses them)."""
        dtype, acc = self.weight.dtype, self._sum_dtype()
        return self.scale * (B0.to(dtype).to(acc) @ A0.to(dtype).to(acc))

    def _per_row(self, x: torch.Tensor, rows) -> torch.Tensor:
        """One adapter per row through the segmented op (see :meth:`forward`)."""
        where = self._where()
        if self.dora:
            raise ValueError(f"{where}: one adapter per row is not defined for DoRA (its magnitude scales whole rows)")
        if isinstance(self.weight, QuantizedWeight):
            raise ValueError(f"{where}: one adapter per row needs a dense base; this layer's base is quantized")
        names = self.adapter_names
        owners = [self.adapter(n) for n in names]
        if self.training and any(o.dropout > 0.0 for o in owners):
            raise ValueError(
                f"{where}: one adapter per row runs without dropout; call model.eval() or set the adapters' "
                "dropout to 0"
            )
        if isinstance(rows, (list, tuple)):
            slots = {n: i for i, n in enumerate(names)}

            def slot_of(name) -> int:
                if name is None or name == BASE_ONLY:
                    return -1
                if name not in slots:
                    raise ValueError(
                        f"{where}: adapter_names holds {name!r}; the layer's adapters are {list(names)} "
                        f"(None or {BASE_ONLY!r}: the base alone)"
                    )
                return slots[name]

            rows = segmented.slots_of_names(rows, slot_of, x.device)
        tensors = [t for o in owners for t in _factor_tensors(o)]
        out_f, in_f = self.out_features, self.in_features

        def build():
            factors = [serving_factors(o, out_f, in_f) for o in owners]
            dtype = functools.reduce(torch.promote_types, [t.dtype for pair in factors for t in pair])
            return segmented.pack_adapters([a.to(dtype) for a, _ in factors], [b.to(dtype) for _, b in factors])

        A, B, ranks = segmented.pack_cached(self.__dict__, names, tensors, build)
        scales = [float(o.scale) for o in owners]
        try:
            return segmented.lowrank_linear_segmented(
                x, self.weight, A, B, rows, scales=scales, ranks=ranks, bias=self.bias
            )
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None

    @property
    def dora(self) -> bool:
        """Whether the layer carries a DoRA magnitude."""
        return getattr(self, "magnitude", None) is not None

    def _weight_sq(self) -> Optional[torch.Tensor]:
        """``‖W_o‖²`` of the frozen weight, cached until the weight changes (its storage or version)."""
        w = self.weight
        if torch.compiler.is_compiling():
            return None
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        cached = getattr(self, "_weight_sq_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, dora.weight_sq_norm(w))
            self._weight_sq_cache = cached
        return cached[1]

    def _dora_forward(self, x: torch.Tensor, p: float) -> torch.Tensor:
        opts = dora.DoraOptions(self.scale, None if p > 0.0 else self.bias, self._weight_sq())
        if p == 0.0:
            return dora.fused(x, self.weight, self.A, self.B, self.magnitude, opts)
        # PEFT's DoRA under dropout: the dropped-out input feeds the low-rank term and a second base product
        xd = F.dropout(x, p, training=True)
        low = dora.fused(xd, self.weight, self.A, self.B, self.magnitude, opts)
        return F.linear(x, self.weight, self.bias) - F.linear(xd, self.weight) + low

    @torch.no_grad()
    def dora_norm(self) -> torch.Tensor:
        """DoRA's row norms ``n_o = ‖W_o + s·(B·A)_o‖`` of the current factors (fp32; ``A`` and ``B``
        rounded to the weight's dtype, as the forward uses them)."""
        if self.merged:
            raise ValueError("LowRankLinear.dora_norm: the layer is merged (its weight holds the update)")
        if isinstance(self.weight, QuantizedWeight):
            raise ValueError("LowRankLinear: DoRA needs a dense base; this layer's base is quantized")
        return dora.weight_norm(self.weight, self.A, self.B, scale=self.scale, weight_sq=self._weight_sq())

    @torch.no_grad()
    def enable_dora(self) -> LowRankLinear:
        """Add a trainable DoRA magnitude initialized to the adapted weight's row norms, so the
        layer's output is unchanged (``m / n = 1``). Stored as ``B`` is (fp32 on a 16-bit weight by
        default).

        Raises:
            ValueError: the layer has index sets or a diagonal (Partial-LoRA, SiVA), a quantized
                base, is merged, or already has a magnitude.
        """
        if self.dora:
            raise ValueError("LowRankLinear.enable_dora: the layer already has a magnitude")
        if self.on_original_base:
            raise ValueError(f"{self._where()}: enable_dora: the layer holds several adapters (DoRA runs alone)")
        _refuse_dora_options(self.row_index, self.col_index, self.diag, "LowRankLinear.enable_dora")
        n = self.dora_norm()
        self.magnitude = nn.Parameter(n.to(self.B.dtype if self.B.dtype == torch.float32 else self.weight.dtype))
        return self

    @torch.no_grad()
    def merged_weight(self, adapter: Optional[str] = None) -> torch.Tensor:
        """The dense fp32 ``(out, in)`` weight the layer computes with: ``W + s·delta`` of the active
        adapter (or ``adapter``), times ``m / n`` per row with DoRA (the current weight when merged)."""
        if self.merged:
            return self.weight.float()
        merged = self.weight.float() + self.delta_weight(adapter=adapter)
        if self.dora:
            merged *= dora.reference.factor(self.magnitude, self.dora_norm())[:, None]
        return merged

    def delta_weight(self, as_computed: bool = False, adapter: Optional[str] = None) -> torch.Tensor:
        """The dense fp32 ``(out, in)`` update ``scale · scatter(B · diag · A)`` of the active adapter
        (or ``adapter``), minus ``scale · B0 · A0`` when it keeps initial factors; ``as_computed``
        rounds ``A`` and ``B`` to the weight's dtype first, as the forward uses them."""
        owner = self.adapter(adapter)
        dtype = self.weight.dtype
        A, B = (owner.A, owner.B) if not as_computed else (owner.A.to(dtype), owner.B.to(dtype))
        sparsity = {"row_index": owner.row_index, "col_index": owner.col_index, "diag": owner.diag}
        delta = delta_weight(A, B, self.out_features, self.in_features, scale=owner.scale, **sparsity)
        if getattr(owner, "A0", None) is not None:
            with torch.no_grad():
                A0, B0 = (owner.A0, owner.B0) if not as_computed else (owner.A0.to(dtype), owner.B0.to(dtype))
                delta -= owner.scale * (B0.float() @ A0.float())
        return delta

    def _sparsity(self) -> dict:
        """The index sets and diagonal, as the op's keyword arguments."""
        return {"row_index": self.row_index, "col_index": self.col_index, "diag": self.diag}

    @torch.no_grad()
    def quantize_base(self, quantized: Union[str, QuantizedWeight]) -> LowRankLinear:
        """Hold the frozen base quantized: ``"nf4"`` / ``"int8"`` quantizes the current ``weight`` with
        bitsandbytes (:mod:`corda_kernels.ops.quantized`), or pass a :class:`QuantizedWeight` of the
        weight's shape and dtype. The factors keep their precision; the op dequantizes the base.
        A quantized base cannot be merged into (``to_linear`` dequantizes)."""
        if self.merged or isinstance(self.weight, QuantizedWeight):
            raise ValueError("LowRankLinear.quantize_base: the base is merged or already quantized")
        if self.dora:
            raise ValueError(
                "LowRankLinear.quantize_base: DoRA (magnitude) layers keep a dense base (not supported yet)"
            )
        if self.on_original_base:
            raise ValueError(f"{self._where()}: quantize_base: several adapters share a dense original weight")
        if isinstance(quantized, str):
            quantized = quantize_weight(self.weight, quantized)
        if quantized.shape != self.weight.shape or quantized.dtype != self.weight.dtype:
            raise ValueError(
                f"LowRankLinear.quantize_base: quantized base is {quantized.dtype} {tuple(quantized.shape)}, "
                f"the weight {self.weight.dtype} {tuple(self.weight.shape)}"
            )
        del self.weight
        self.weight = quantized.to(self.A.device)
        return self

    @torch.no_grad()
    def merge(self) -> LowRankLinear:
        """Add the update into ``weight`` in place (fp32 sum, one cast); forward becomes plain linear."""
        if isinstance(self.weight, QuantizedWeight):
            raise ValueError("LowRankLinear.merge: the base is quantized; to_linear() builds a dequantized merged one")
        if not self.merged:
            if self.dora:
                self._dora_merge_factor = dora.reference.factor(self.magnitude, self.dora_norm())
            self.weight.copy_(self.merged_weight())
            self._set_merged(True)
        return self

    @torch.no_grad()
    def unmerge(self) -> LowRankLinear:
        """Subtract the update from ``weight`` again (exact in fp32; one rounding in 16-bit dtypes)."""
        if self.merged:
            if not self.dora:
                self.weight.copy_(self.weight.float() - self.delta_weight())
            else:
                f = getattr(self, "_dora_merge_factor", None)
                if f is None or not bool((f != 0).all()):
                    raise ValueError(
                        "LowRankLinear.unmerge: a DoRA layer unmerges with the m / n it merged with; this one "
                        "was merged elsewhere (loaded merged) or has a zero scale on some row"
                    )
                self.weight.copy_(self.weight.float() / f[:, None] - self.delta_weight())
                self._dora_merge_factor = None
            self._set_merged(False)
        return self

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A new ``nn.Linear`` holding the merged weight (this module is left as it is)."""
        merged = self.merged_weight()
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        linear.weight.copy_(merged)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, A: torch.Tensor, B: torch.Tensor, *, residual: Optional[torch.Tensor] = None, **kwargs
    ) -> LowRankLinear:
        """Wrap ``linear``: its weight (or ``residual``, e.g. ``W − s·B·A``) becomes the frozen base and
        its bias the frozen bias; ``kwargs`` are the other constructor options."""
        if residual is not None and tuple(residual.shape) != tuple(linear.weight.shape):
            raise ValueError(
                f"LowRankLinear.from_linear: residual {tuple(residual.shape)} must have the linear's weight shape "
                f"{tuple(linear.weight.shape)}"
            )
        weight = linear.weight if residual is None else residual
        return cls(weight, A, B, bias=linear.bias, **kwargs)

    def _set_merged(self, merged: bool) -> None:
        self.merged = merged
        self.merged_state.fill_(merged)

    @staticmethod
    def _after_load(module: LowRankLinear, incompatible_keys) -> None:
        # load_state_dict(assign=True) puts the given tensors in place, in whatever layout they came
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if isinstance(tensor, torch.Tensor):
                owned = _owned(tensor.data)
                if owned is not tensor.data:
                    tensor.data = owned
        check_factors(module.weight, module.A, module.B, bias=module.bias, **module._sparsity())
        if module.dora:
            dora.check_dora(
                module.weight, module.A, module.B, module.magnitude, bias=module.bias, where="LowRankLinear"
            )
        extras = module._modules.get("extra_adapters")
        for name, extra in extras.items() if extras is not None else ():
            try:
                sparsity = {"row_index": extra.row_index, "col_index": extra.col_index, "diag": extra.diag}
                check_factors(module.weight, extra.A, extra.B, **sparsity)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{module._where()}: adapter {name!r}: {err}") from None
        module.merged = bool(module.merged_state)

    def _adapter_dtype_name(self) -> str:
        dtypes = {getattr(self, n).dtype for n in self.trainable if getattr(self, n) is not None}
        return ",".join(sorted(str(d).replace("torch.", "") for d in dtypes)) or "none"

    def extra_repr(self) -> str:
        rows = "all" if self.row_index is None else f"{self.row_index.numel()}/{self.out_features}"
        cols = "all" if self.col_index is None else f"{self.col_index.numel()}/{self.in_features}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"scale={self.scale:g}, rows={rows}, cols={cols}, diag={self.diag is not None}, "
            f"trainable={self.trainable}, dora={self.dora}, dropout={self.dropout:g}, bias={self.bias is not None}, "
            f"merged={self.merged}, adapter_dtype={self._adapter_dtype_name()}"
            + (f", adapters={list(self.adapter_names)}, active={self.active_adapter!r}" * self.on_original_base)
        )
