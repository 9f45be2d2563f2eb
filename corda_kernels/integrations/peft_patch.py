"""Run an existing PEFT LoRA model on corda_kernels' fused low-rank ops, in place.

:func:`patch_peft` gives each PEFT LoRA ``Linear`` layer of a ``PeftModel`` (``peft.tuners.lora.layer.Linear``
over an ``nn.Linear`` / ``Conv1D``, and PEFT's bitsandbytes layers ``peft.tuners.lora.bnb.Linear4bit`` /
``Linear8bitLt``) an instance ``forward`` (a bound method shadowing the class's) that computes, for
the active adapter ``a``::

    y = x·Wᵀ + b + scaling[a] · B_a·A_a·drop(x)      (W, b: the base layer's)

with one call of :func:`corda_kernels.ops.lowrank_linear.fused` on PEFT's own tensors
(``lora_A[a].weight``, ``lora_B[a].weight``, the base weight and bias: nothing is copied), so
gradients land on PEFT's parameters and training, ``save_pretrained``, loading and merging stay
PEFT's. Per layer, :func:`patch_layer` is the entry point (it patches one PEFT LoRA layer or says
why not, as an :class:`Unpatched` record); :func:`patch_peft` runs it on every LoRA layer of a model
and returns a :class:`PatchReport`.

Bases. A dense base weight is passed as it is (a ``Conv1D``'s transposed). A bitsandbytes base is
read in place from bitsandbytes' own storage (NF4 codes with double-quantized block absmax; int8
codes with row scales: :mod:`corda_kernels.integrations.bnb_storage`) as the op's quantized base,
dequantized inside the op; no full-precision copy of W is kept. A ``Linear4bit`` whose
``compute_dtype`` differs from its input's dtype (outside autocast) runs PEFT's forward with an
adapter: bitsandbytes computes the base in ``compute_dtype`` but PEFT adds the LoRA term in the
input's precision, which one fused call in one dtype would not reproduce (the base alone, adapters
disabled, is still computed from the storage in ``compute_dtype``, as bitsandbytes does).

Several adapters. Several active adapters (``set_adapter([...])``) are summed in one call of the
same op: their factors concatenated along the rank (``A = [A_1; A_2; ...]``, ``B = [B_1, B_2, ...]``,
each adapter's scaling on the diagonal between them), which is exactly ``Σ_a s_a·B_a·A_a·x``.
Mixed batches (PEFT's ``adapter_names=``, one adapter per sequence, ``"__base__"`` for none) run
through the segmented op :func:`corda_kernels.ops.segmented.fused`: the named adapters' factors
packed by :func:`~corda_kernels.ops.segmented.pack_adapters` (cached while they do not change and
no gradient is taken), one base GEMM, rows grouped by adapter. On a bitsandbytes base a mixed batch
without gradients dequantizes the base for the call (the segmented op takes a dense base; nothing
keeps it); with gradients it runs PEFT's forward.

Dropout: PEFT's ``lora_dropout[a]`` (``nn.Dropout`` in training mode gives our op its ``p``;
``nn.Identity`` or eval mode gives 0). The op draws its own dropout mask (a counter hash seeded from
torch's default generator), so with ``p > 0`` the random mask differs from ``nn.Dropout``'s; the
distribution is the same. Several adapters and mixed batches run fused without dropout only.

Checks that cannot change while the model runs (variants, ``lora_bias``, base layer kind and
storage, dropout module) are made once per adapter at patch time (and on the first call of an
adapter added later) and cached; the per-call path only reads flags and dtypes.

Per call, the layer falls back to PEFT's own forward when the fused path does not apply: adapters
disabled or merged, extra arguments, no active adapter held by the layer, an adapter that cannot
run fused, dropout with several adapters, an input dtype other than the base weight's outside
autocast (dense bases), adapter factors of another dtype than the base's (or fp32 on a 16-bit
one), a bitsandbytes weight repacked for its CPU inference kernel since. Under ``torch.autocast`` it
runs fused: the op's autocast rule casts ``x``, a dense base weight and bias to the autocast dtype.
Adapter factors may be fp32 on a 16-bit base (PEFT's ``autocast_adapter_dtype``, its default): the
op reads them as they are, rounds them where they enter its products and returns fp32 gradients.

DoRA. A DoRA adapter (``use_dora``) on a dense base runs on
:func:`corda_kernels.ops.dora.dora_linear`, with PEFT's ``lora_magnitude_vector[a].weight`` as the
magnitude and ``‖W_o‖²`` cached until the base weight changes; under dropout in training mode PEFT's
own ``lora_dropout[a]`` module drops ``x`` for the DoRA term and the base output is corrected as PEFT
does (``(m/n - 1)·(x_d·Wᵀ)``), so the mask and the result are PEFT's. DoRA adapters run alone: with
other active adapters or in a mixed batch the layer runs PEFT's forward.

What is refused and what is left. :func:`patch_peft` refuses (ValueError naming the layer, nothing
changed) layers it would never run fused: a LoRA variant other than DoRA (or DoRA on a bitsandbytes
base), ``lora_bias``, a base layer
that is neither linear nor a covered bitsandbytes layer, bitsandbytes storage it cannot read (another
quant type or block size, no double quantization, fp16 weights, ...), a dropout module other than
``nn.Dropout`` / ``nn.Identity``. It leaves on PEFT's forward, and reports, LoRA layers that are not
``Linear`` (embeddings, convolutions, other quantization backends). Layers that do not hold the
active adapter (adapters covering only some layers) are patched: they run PEFT's forward while such
an adapter is active, the fused op once one they hold is. :func:`unpatch_peft` restores. The patched
forward is a ``functools.partial`` of a module-level function, so patched models pickle
(``torch.save`` / ``torch.load``) and ``copy.deepcopy`` with the patch in place.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .._dtypes import ACTIVATION_DTYPES, HALF_DTYPES
from ..ops import dora, segmented
from ..ops.lowrank_linear import Options, draw_seed, fused
from . import bnb_storage, hf

logger = logging.getLogger(__name__)

_MARK = "_corda_kernels_patched"
_PLANS = "_corda_kernels_plans"  # {adapter: True when it can run fused}, filled lazily
_BASE = "_corda_kernels_base"  # the base's kind: "dense", "conv1d", "nf4" or "int8"
_PACKED = "_corda_kernels_packed"  # segmented.pack_cached's slot: the last mixed batch's packed factors
_NAME = "_corda_kernels_name"  # the layer's name in the model, for messages
_QUANTIZED = ("nf4", "int8")


def _lora_classes() -> tuple[type, tuple]:
    """``(LoRA Linear class, (PEFT's bitsandbytes LoRA classes present)...)``."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("patch_peft needs `pip install peft`") from exc
    bnb_classes: tuple = ()
    try:
        from peft.tuners.lora import bnb as peft_bnb

        bnb_classes = tuple(
            c for c in (getattr(peft_bnb, "Linear8bitLt", None), getattr(peft_bnb, "Linear4bit", None)) if c
        )
    except ImportError:  # pragma: no cover - bitsandbytes missing
        pass
    return Linear, bnb_classes


def _lora_layer_class():
    from peft.tuners.lora.layer import LoraLayer

    return LoraLayer


# PEFT's variant classes by the names its docs use (others print as their class name, shortened).
_VARIANT_NAMES = {
    "ALora": "aLoRA",
    "Kasa": "KaSA",
    "Velora": "VeLoRA",
    "BdLora": "BD-LoRA",
    "QALora": "QA-LoRA",
    "Monteclora": "MonteCLoRA",
    "MiCA": "MiCA",
    "Arrow": "Arrow",
}


def _variant_name(layer: nn.Module, adapter: str) -> str:
    """The LoRA variant of ``adapter`` as users know it ("" for plain LoRA)."""
    if layer.use_dora.get(adapter, False):
        return "DoRA"
    variant = layer.lora_variant.get(adapter)
    if variant is None:
        return ""
    name = type(variant).__name__
    short = name.removesuffix("LinearVariant").removesuffix("Variant") or name
    return f"{_VARIANT_NAMES.get(short, short)} ({name})"


def _adapter_refusal(name: str, layer: nn.Module, adapter: str) -> str:
    """Why ``adapter`` of ``layer`` cannot run fused (empty string when it can)."""
    if adapter not in layer.lora_A:
        return f"layer {name} has no LoRA weights for its active adapter {adapter!r}"
    variant = _variant_name(layer, adapter)
    if variant == "DoRA" and _base_kind(layer) in _QUANTIZED:
        return (
            f"layer {name} uses DoRA for adapter {adapter!r} on a bitsandbytes base; "
            "patch_peft runs DoRA on dense bases only"
        )
    if variant and variant != "DoRA":  # DoRA runs on the fused DoRA op
        return (
            f"layer {name} uses the LoRA variant {variant} for adapter {adapter!r}; "
            f"patch_peft runs plain LoRA and DoRA only, not {variant}"
        )
    if layer.lora_bias.get(adapter, False):
        return f"layer {name} has lora_bias=True for adapter {adapter!r}; the fused op has no adapter bias"
    if not isinstance(layer.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
        return (
            f"layer {name}'s lora_dropout is a {type(layer.lora_dropout[adapter]).__name__}, "
            "not nn.Dropout / nn.Identity"
        )
    return ""


def _base_kind(layer: nn.Module) -> Optional[str]:
    """``"nf4"`` / ``"int8"`` (bitsandbytes), ``"conv1d"``, ``"dense"`` (nn.Linear), or None."""
    base = layer.base_layer
    kind = bnb_storage.fmt(base)
    if kind is not None:
        return kind
    if hf.is_linear_like(base):
        return "conv1d" if hf.is_conv1d(base) else "dense"
    return None


def _base_refusal(name: str, layer: nn.Module) -> str:
    """Why ``layer``'s base layer cannot be the op's base (empty string when it can)."""
    base = layer.base_layer
    kind = _base_kind(layer)
    if kind in _QUANTIZED:
        return bnb_storage.refusal(name, base)
    if kind is None:
        return (
            f"layer {name}'s base layer is a {type(base).__name__}, not an nn.Linear / Conv1D or a bitsandbytes "
            "Linear4bit / Linear8bitLt"
        )
    if base.weight.dtype not in ACTIVATION_DTYPES:
        return f"layer {name}'s base weight has dtype {base.weight.dtype}; the fused op needs fp32/fp16/bf16"
    return ""


class Unpatched(NamedTuple):
    """A LoRA layer :func:`patch_layer` did not patch: its name, the reason's category (``why``: one of
    :data:`REASONS`), the full message naming the layer, and whether :func:`patch_peft` refuses the
    model for it (``refused``) or leaves the layer on PEFT's forward and reports it."""

    layer: str
    why: str
    message: str
    refused: bool


# The categories of Unpatched.why.
REASONS = {
    "layer type": "not a LoRA Linear layer (embedding, convolution, another quantization backend)",
    "base layer": "a base layer the op cannot take (not linear, unreadable bitsandbytes storage or options)",
    "adapter": "an active adapter the op cannot run (LoRA variant, lora_bias, dropout module)",
}


def check_layer(layer: nn.Module, name: str = "") -> Optional[Unpatched]:
    """Why ``layer`` (a PEFT LoRA layer) cannot be patched, or None when it can (nothing is changed)."""
    linear_cls, bnb_classes = _lora_classes()
    if not isinstance(layer, (linear_cls, *bnb_classes)):
        return Unpatched(
            name,
            "layer type",
            f"layer {name} is a PEFT {type(layer).__module__}.{type(layer).__name__}, not a LoRA Linear layer",
            False,
        )
    reason = _base_refusal(name, layer)
    if reason:
        return Unpatched(name, "base layer", reason, True)
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            reason = _adapter_refusal(name, layer, adapter)
            if reason:
                return Unpatched(name, "adapter", reason, True)
    return None


def _install(layer: nn.Module, name: str) -> None:
    layer.__dict__[_NAME] = name
    layer.__dict__[_PLANS] = {}
    layer.__dict__[_BASE] = _base_kind(layer)
    layer.__dict__.pop(_PACKED, None)
    layer.forward = functools.partial(_fused_forward, layer)
    setattr(layer, _MARK, True)


def patch_layer(layer: nn.Module, name: str = "") -> Optional[Unpatched]:
    """Patch one PEFT LoRA layer in place (the per-layer entry point of :func:`patch_peft`).

    Args:
        layer: a PEFT LoRA layer (any ``peft.tuners.lora.layer.LoraLayer``).
        name: its name in the model, for messages.

    Returns:
        None when ``layer`` runs on the fused ops now (also when it already did), else an
        :class:`Unpatched` record saying why not; the layer is then left unchanged.
    """
    if is_patched(layer):
        return None
    unpatched = check_layer(layer, name)
    if unpatched is None:
        _install(layer, name)
    return unpatched


class PatchReport(list):
    """What :func:`patch_peft` did: the list of the patched layers' names (as before this record
    existed: ``len``, iteration and indexing are the names'), plus ``left``, the
    :class:`Unpatched` records of the LoRA layers left on PEFT's forward."""

    def __init__(self, patched, left=()):
        super().__init__(patched)
        self.left: list[Unpatched] = list(left)

    @property
    def patched(self) -> list[str]:
        return list(self)

    def by_reason(self) -> dict[str, list[str]]:
        """``{why: [layer names]}`` of the layers left on PEFT's forward."""
        grouped: dict[str, list[str]] = {}
        for record in self.left:
            grouped.setdefault(record.why, []).append(record.layer)
        return grouped

    def summary(self) -> str:
        total = len(self) + len(self.left)
        text = f"patch_peft: {len(self)} of {total} LoRA layers run fused"
        for why, names in self.by_reason().items():
            shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
            text += f"; left on PEFT's forward ({why}): {shown}"
        return text

    def __repr__(self) -> str:
        return f"PatchReport(patched={list(self)!r}, left={self.left!r})"


def _runs_fused(layer: nn.Module, adapter: str) -> bool:
    plans = layer.__dict__.setdefault(_PLANS, {})
    ok = plans.get(adapter)
    if ok is None:
        ok = plans[adapter] = not _adapter_refusal("", layer, adapter)
    return ok


def _factor_ok(factor: torch.Tensor, dtype: torch.dtype) -> bool:
    return factor.dtype == dtype or (factor.dtype == torch.float32 and dtype in HALF_DTYPES)


def _peft(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return type(layer).forward(layer, x, *args, **kwargs)


def _dropout_p(layer: nn.Module, adapter: str) -> float:
    drop = layer.lora_dropout[adapter]
    return drop.p if drop.training and type(drop) is not nn.Identity else 0.0


def _base_operand(layer: nn.Module, x: torch.Tensor, autocast: bool):
    """``(x, weight, bias, dtype)`` for the op: ``x`` in the dtype the base multiplies in, the base
    weight (dense, or bitsandbytes' storage as quantized codes) and bias, and that dtype; None when
    the fused path does not apply to this call."""
    kind = layer.__dict__.get(_BASE)
    base = layer.base_layer
    bias = base.bias
    if kind in _QUANTIZED:
        weight = bnb_storage.codes(base, kind)
        if weight is None:
            return None
        if autocast:
            return x, weight, bias, torch.get_autocast_dtype(x.device.type)
        dtype = bnb_storage.compute_dtype(base, kind, x.dtype)
        if dtype not in ACTIVATION_DTYPES:
            return None
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        return x.to(dtype), weight, bias, dtype
    weight = base.weight.t() if kind == "conv1d" else base.weight
    if x.dtype != weight.dtype and not autocast:
        return None
    return x, weight, bias, weight.dtype


def _base_only(layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The base layer's output for a bitsandbytes base, from its storage (so bitsandbytes' own forward,
    which repacks an NF4 weight for its CPU inference kernel in eval mode, never runs), or None (a
    dense base: PEFT's forward computes it as cheaply)."""
    if layer.__dict__.get(_BASE) not in _QUANTIZED:
        return None
    autocast = torch.is_autocast_enabled(x.device.type)
    operand = _base_operand(layer, x, autocast)
    if operand is None:
        return None
    xin, codes, bias, dtype = operand
    if autocast:
        xin, bias = xin.to(dtype), None if bias is None else bias.to(dtype)
    y = F.linear(xin, codes.dequantize(dtype), bias)
    return y.to(x.dtype) if layer.__dict__.get(_BASE) == "nf4" or not autocast else y


def _fused_forward(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Forward of a patched PEFT LoRA layer (see the module docstring)."""
    if args or layer.merged:
        return _peft(layer, x, *args, **kwargs)
    names = None
    if kwargs:
        names = kwargs.get("adapter_names")
        if any(v is not None for k, v in kwargs.items() if k != "adapter_names"):
            return _peft(layer, x, *args, **kwargs)
    if layer.disable_adapters:
        y = None if kwargs else _base_only(layer, x)
        return _peft(layer, x, *args, **kwargs) if y is None else y
    if names is not None:
        try:
            layer._check_forward_args(x, adapter_names=names)  # PEFT's own checks of adapter_names
        except ValueError as err:
            raise ValueError(f"layer {layer.__dict__.get(_NAME, '')}: {err}") from None
        y = _mixed_batch(layer, x, list(names))
        return _peft(layer, x, *args, **kwargs) if y is None else y
    held = [a for a in layer.active_adapters if a in layer.lora_A]
    if not held:
        y = _base_only(layer, x)
        return _peft(layer, x, *args, **kwargs) if y is None else y
    if not all(_runs_fused(layer, a) for a in held):
        return _peft(layer, x, *args, **kwargs)
    autocast = torch.is_autocast_enabled(x.device.type)
    operand = _base_operand(layer, x, autocast)
    if operand is None or not (autocast or operand[3] == x.dtype):
        return _peft(layer, x, *args, **kwargs)  # see "Bases" in the module docstring
    xin, weight, bias, dtype = operand
    if len(held) == 1:
        adapter = held[0]
        A = layer.lora_A[adapter].weight
        B = layer.lora_B[adapter].weight
        p = _dropout_p(layer, adapter)
        if not (autocast or (_factor_ok(A, dtype) and _factor_ok(B, dtype))) or p >= 1.0:
            return _peft(layer, x, *args, **kwargs)
        if layer.use_dora.get(adapter, False):
            y = _dora_forward(layer, adapter, xin, weight, A, B, bias, p)
            return _peft(layer, x, *args, **kwargs) if y is None else y
        seed = draw_seed(x.device) if p > 0.0 else None
        opts = Options(float(layer.scaling[adapter]), bias, dropout=float(p), seed=seed)
    else:
        A, B, opts = _summed(layer, held, bias)
        if A is None or not (autocast or (_factor_ok(A, dtype) and _factor_ok(B, dtype))):
            return _peft(layer, x, *args, **kwargs)
    y = fused(xin, weight, A, B, opts)
    # bitsandbytes' Linear4bit returns its input's dtype (also under autocast)
    return y.to(x.dtype) if layer.__dict__.get(_BASE) == "nf4" or not autocast else y


def _dora_forward(layer: nn.Module, adapter: str, x, weight, A, B, bias, p: float) -> Optional[torch.Tensor]:
    """A DoRA adapter's forward on the fused DoRA op (see the module docstring), or None when its
    magnitude's dtype does not fit the base; ``‖W_o‖²`` cached in the layer until the base weight
    changes (its storage or version: merges write it in place)."""
    magnitude = layer.lora_magnitude_vector[adapter].weight
    if not _factor_ok(magnitude, weight.dtype):
        return None
    key = (weight.data_ptr(), weight._version, weight.dtype)
    cached = layer.__dict__.get("_corda_kernels_weight_sq")
    if cached is None or cached[0] != key:
        cached = layer.__dict__["_corda_kernels_weight_sq"] = (key, dora.weight_sq_norm(weight))
    scale = float(layer.scaling[adapter])
    if p == 0.0:
        return dora.fused(x, weight, A, B, magnitude, dora.DoraOptions(scale, bias, cached[1]))
    xd = layer.lora_dropout[adapter](x)
    low = dora.fused(xd, weight, A, B, magnitude, dora.DoraOptions(scale, None, cached[1]))
    return F.linear(x, weight, bias) - F.linear(xd, weight) + low


def _summed(layer: nn.Module, adapters: list, bias):
    """``(A, B, opts)`` for the sum of several adapters as one of their total rank (factors
    concatenated, each adapter's scaling on the diagonal), or ``(None, None, None)`` when that does
    not apply (dropout, factors of different dtypes)."""
    if any(_dropout_p(layer, a) > 0.0 or layer.use_dora.get(a, False) for a in adapters):
        return None, None, None
    As = [layer.lora_A[a].weight for a in adapters]
    Bs = [layer.lora_B[a].weight for a in adapters]
    if len({t.dtype for t in As + Bs}) != 1:
        return None, None, None
    scales = [float(layer.scaling[a]) for a in adapters]
    A, B = torch.cat(As, 0), torch.cat(Bs, 1)
    if len(set(scales)) == 1:
        return A, B, Options(scales[0], bias)
    diag = torch.tensor([s for s, t in zip(scales, As) for _ in range(t.shape[0])], dtype=A.dtype, device=A.device)
    return A, B, Options(1.0, bias, diag=diag)


def _packed(layer: nn.Module, adapters: list):
    """``(A_stack, B_stack, ranks)`` of ``adapters`` (:func:`~corda_kernels.ops.segmented.pack_adapters`),
    reused from the previous call while no gradient is taken and no factor changed."""
    As = [layer.lora_A[a].weight for a in adapters]
    Bs = [layer.lora_B[a].weight for a in adapters]
    return segmented.pack_cached(layer.__dict__, tuple(adapters), As + Bs, lambda: segmented.pack_adapters(As, Bs))


def _mixed_batch(layer: nn.Module, x: torch.Tensor, names: list) -> Optional[torch.Tensor]:
    """A mixed batch (one adapter per sequence, PEFT's ``adapter_names``) on the segmented op, or None
    when that does not apply (dropout, an adapter that cannot run fused, factors of different dtypes,
    an input dtype other than the base weight's outside autocast, a bitsandbytes base while a
    gradient is taken). A bitsandbytes base is dequantized for the call (a temporary: the segmented op
    takes a dense base; without gradients nothing keeps it)."""
    kind = layer.__dict__.get(_BASE)
    if x.dim() < 2:
        return None
    slots: dict[str, int] = {}

    def slot_of(name) -> int:  # PEFT adds nothing for "__base__" or an adapter the layer does not hold
        return -1 if name == "__base__" or name not in layer.lora_A else slots.setdefault(name, len(slots))

    per_sequence = segmented.slots_of_names(names, slot_of, x.device)
    adapters = list(slots)
    if not adapters:
        return _base_only(layer, x)
    if not all(_runs_fused(layer, a) and _dropout_p(layer, a) == 0.0 and not layer.use_dora.get(a) for a in adapters):
        return None
    factors = [layer.lora_A[a].weight for a in adapters] + [layer.lora_B[a].weight for a in adapters]
    if kind in _QUANTIZED and torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in factors)):
        return None
    autocast = torch.is_autocast_enabled(x.device.type)
    operand = _base_operand(layer, x, autocast)
    if operand is None or not (autocast or operand[3] == x.dtype):
        return None
    xin, weight, bias, dtype = operand
    if len({t.dtype for t in factors}) != 1 or not (autocast or _factor_ok(factors[0], dtype)):
        return None
    if kind in _QUANTIZED:
        weight = weight.dequantize(dtype)
    A, B, ranks = _packed(layer, adapters)
    rows = per_sequence.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1]).reshape(-1)
    scales = torch.tensor([float(layer.scaling[a]) for a in adapters], dtype=torch.float32, device=x.device)
    y = segmented.fused(xin, weight, A, B, rows, scales, ranks, bias)
    return y.to(x.dtype) if kind == "nf4" or not autocast else y


def patch_peft(peft_model: nn.Module) -> PatchReport:
    """Make every PEFT LoRA ``Linear`` layer of ``peft_model`` run on the fused ops, in place.

    Each layer's forward becomes one call of the fused low-rank op on PEFT's own tensors (nothing
    is copied; a bitsandbytes base is read from its quantized storage), so training,
    ``save_pretrained``, loading and merging stay PEFT's. Several active adapters and mixed
    batches (``adapter_names=``) run fused too. Per call it falls back to PEFT's forward where the
    fused path does not apply (module docstring). Idempotent; patched models pickle and deep-copy.
    :func:`unpatch_peft` restores. The report is also logged (logger
    ``corda_kernels.integrations.peft_patch``, level INFO).

    Args:
        peft_model: a ``peft.PeftModel`` (or any module) holding PEFT LoRA layers.

    Returns:
        A :class:`PatchReport`: the list of the patched layers' names (what this function returned
        before the report existed), with ``left`` (:class:`Unpatched` records of the LoRA layers
        left on PEFT's forward), ``by_reason()`` and ``summary()``.

    Raises:
        ValueError: the model has no PEFT LoRA layer or none that can be patched, or a layer has a
            configuration it would never run fused (a LoRA variant other than DoRA, ``lora_bias``, a
            base layer that is neither linear nor a readable bitsandbytes NF4 / int8 layer, a dropout
            module other than ``nn.Dropout`` / ``nn.Identity``); the message names the layer.
            Nothing is patched then.
        ImportError: peft is not installed.
    """
    _lora_classes()
    lora_layer = _lora_layer_class()
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, lora_layer)}
    if not layers:
        raise ValueError(f"{type(peft_model).__name__} has no PEFT LoRA layers to patch (is it a LoRA PeftModel?)")
    checked = {name: None if is_patched(layer) else check_layer(layer, name) for name, layer in layers.items()}
    refused = [u for u in checked.values() if u is not None and u.refused]
    if refused:
        raise ValueError(f"patch_peft: {refused[0].message}")
    left = [u for u in checked.values() if u is not None]
    if len(left) == len(layers):
        kinds = sorted({type(layers[u.layer]).__name__ for u in left})
        raise ValueError(
            f"{type(peft_model).__name__} has no PEFT LoRA Linear layers to patch: its {len(layers)} LoRA layers "
            f"are {', '.join(kinds)}"
        )
    for name, layer in layers.items():
        if checked[name] is None and not is_patched(layer):
            _install(layer, name)
    report = PatchReport([n for n in layers if checked[n] is None], left)
    logger.info(report.summary())
    return report


def unpatch_peft(peft_model: nn.Module) -> list[str]:
    """Restore PEFT's forward on every layer :func:`patch_peft` patched, in place.

    Args:
        peft_model: a model :func:`patch_peft` patched (an unpatched one is left as it is).

    Returns:
        The names of the restored layers (empty when none was patched).
    """
    restored = []
    for name, module in peft_model.named_modules():
        if getattr(module, _MARK, False):
            del module.forward
            delattr(module, _MARK)
            for key in (_PLANS, _BASE, _PACKED, _NAME):
                module.__dict__.pop(key, None)
            restored.append(name)
    return restored


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` (a PEFT LoRA layer) runs on the fused op."""
    return bool(getattr(module, _MARK, False))
