"""``LowRankLinear``: a frozen linear layer plus a (partial, diagonal-scaled) low-rank adapter.

``y = x·Wᵀ + b + s · scatter_rows((drop(x[..., col_index])·Aᵀ ⊙ diag) · Bᵀ)`` through the fused
op :func:`corda_kernels.ops.lowrank_linear.lowrank_linear`. ``W`` is the frozen base (the residual
``W − s·B·A`` for CorDA / PiSSA / SiVA), ``A (r, n_cols)`` and ``B (n_rows, r)`` are compact over
the selected input / output features (Partial-LoRA), ``diag (r,)`` is SiVA's trainable diagonal.
With a ``magnitude (out,)`` (DoRA) the layer computes ``y = (m / n) ⊙ (x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b``
through :func:`corda_kernels.ops.dora.dora_linear`, ``n`` the adapted weight's row norms.
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.nn import functional as F

from .._dtypes import HALF_DTYPES
from ..ops import dora
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
        self.register_load_state_dict_post_hook(LowRankLinear._after_load)

    scale = _Checked(check_scale, "The adapter's multiplier (``alpha / r`` for LoRA); checked when set.")
    dropout = _Checked(check_dropout, "Dropout probability on the adapter's input while training; checked when set.")

    def __setstate__(self, state: dict) -> None:
        # modules pickled before scale/dropout became checked properties kept them as plain attributes
        for name in ("scale", "dropout"):
            if name in state:
                state["_" + name] = state.pop(name)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"LowRankLinear: input dtype {x.dtype} differs from the weight's {self.weight.dtype} "
                "(cast the input, or run under torch.autocast)"
            )
        # The factors were validated at construction / load: the op's unvalidated entry (per-call cost).
        p = self.dropout if self.training else 0.0
        if self.dora:
            return self._dora_forward(x, p)
        seed = draw_seed(x.device) if p > 0.0 else None
        opts = Options(self.scale, self.bias, self.row_index, self.col_index, self.diag, p, seed)
        return fused(x, self.weight, self.A, self.B, opts)

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
        _refuse_dora_options(self.row_index, self.col_index, self.diag, "LowRankLinear.enable_dora")
        n = self.dora_norm()
        self.magnitude = nn.Parameter(n.to(self.B.dtype if self.B.dtype == torch.float32 else self.weight.dtype))
        return self

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The dense fp32 ``(out, in)`` weight the layer computes with: ``W + s·delta``, times ``m / n``
        per row with DoRA (the current weight when merged)."""
        if self.merged:
            return self.weight.float()
        merged = self.weight.float() + self.delta_weight()
        if self.dora:
            merged *= dora.reference.factor(self.magnitude, self.dora_norm())[:, None]
        return merged

    def delta_weight(self, as_computed: bool = False) -> torch.Tensor:
        """The dense fp32 ``(out, in)`` update ``scale · scatter(B · diag · A)``; ``as_computed``
        rounds ``A`` and ``B`` to the weight's dtype first, as the forward uses them."""
        A, B = (self.A, self.B) if not as_computed else (self.A.to(self.weight.dtype), self.B.to(self.weight.dtype))
        return delta_weight(A, B, self.out_features, self.in_features, scale=self.scale, **self._sparsity())

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
        )
