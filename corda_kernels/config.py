"""What to adapt and how: :class:`AdaptConfig`, the one configuration of ``apply``, ``apply_blockwise``
and ``estimate_memory`` (the role PEFT's ``LoraConfig`` plays), validated in one place and
serializable (``report.json``, the decomposition cache's manifest).

The call-time parts stay arguments of each call (the covariances, progress bars, a process group,
a cache directory, and block-wise / estimate-specific settings); everything that decides the
adapters lives here. Keyword calls keep working: ``apply(model, "corda", rank=16, mode="kpa")``
builds ``AdaptConfig(method="corda", rank=16, method_options={"mode": "kpa"})``, and
``apply(model, config, rank=32)`` overrides one field of a given config.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional, Union

from .decomposition.refinement import check_quantize_iters
from .integrations import hf
from .methods import METHODS, InitMethod, make_method
from .ops.lowrank_linear import check_dropout
from .ops.quantized import check_format

__all__ = ["AdaptConfig"]

# The call that builds a config (its errors name it: "apply: dropout must be ..."); "AdaptConfig" when
# constructed directly.
# Methods DoRA is not defined for, and why (the error says it).
_NO_DORA = {
    "siva": "its adapter is a trainable diagonal between fixed singular vectors; DoRA adds no magnitude to it",
    "partial_lora": "its index sets update part of a row; DoRA's norm runs over whole rows",
}

_WHERE: contextvars.ContextVar[str] = contextvars.ContextVar("corda_kernels_config_where", default="AdaptConfig")


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """The adapters to build: method, rank/alpha and their per-layer patterns, targets, dtype policy
    and quantization of the residual.

    Attributes:
        method: ``"corda"``, ``"pissa"``, ``"milora"``, ``"lora"``, ``"asymmetric"``, ``"siva"``,
            ``"partial_lora"``, or a built :class:`~corda_kernels.methods.InitMethod`.
        method_options: the method's own options, e.g. ``{"mode": "kpa"}`` for CorDA (see the
            methods page); none with a built method.
        rank: adapter rank ``r`` (a positive int, at most each layer's smaller dimension).
        alpha: LoRA alpha (scaling ``alpha / rank``); None: ``rank`` (scaling 1, as the CorDA and
            PiSSA papers use; PEFT's default is 8). Positive and finite.
        rank_pattern: per-layer rank overrides, PEFT semantics (the first key matching the end of
            the layer name).
        alpha_pattern: per-layer alpha overrides, as ``rank_pattern``.
        use_rslora: scaling ``alpha / sqrt(rank)`` (rank-stabilized LoRA).
        target_modules: names (suffix match) or a regex (full match), as PEFT takes them; None: the
            calibrated layers (with covariances), else every linear layer in the block stacks.
        exclude_modules: names or a regex of layers to leave out.
        dropout: dropout probability in [0, 1) on the adapter input while training.
        seed: seed of randomized decompositions and random initializations.
        autocast_adapter_dtype: on a bf16/fp16 model keep the trainable factors in fp32 (as PEFT).
        quantize: ``"nf4"`` or ``"int8"``: store each frozen residual quantized (bitsandbytes).
        quantize_iters: LoftQ-style refinements of the factors and the quantized residual, an int in
            ``[0, 100]``.
        max_batch_bytes: working-set bound of one decomposition chunk (None: a quarter of free GPU
            memory, 2 GiB on CPU).
        dora: add a trainable DoRA magnitude to every adapter (PEFT's ``use_dora``), initialized
            to the adapted weight's row norms so the model's output is unchanged at init. Defined
            for LoRA, PiSSA, CorDA, MiLoRA and asymmetric LoRA; refused for SiVA and
            Partial-LoRA (their diagonal / index sets) and with ``quantize`` (DoRA needs a dense
            base here).

    Raises:
        ValueError: a field out of range (rank < 1, alpha not positive and finite, dropout outside
            [0, 1), an unknown method or quantization format, ``quantize_iters`` outside [0, 100]
            or without ``quantize``), options given with an already built method, or ``dora``
            with SiVA, Partial-LoRA or ``quantize``.
        TypeError: a field of the wrong type.
    """

    method: Union[str, InitMethod] = "corda"
    method_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rank: int = 8
    alpha: Optional[float] = None
    rank_pattern: Optional[Mapping[str, int]] = None
    alpha_pattern: Optional[Mapping[str, float]] = None
    use_rslora: bool = False
    target_modules: hf.TargetSpec = None
    exclude_modules: hf.TargetSpec = None
    dropout: float = 0.0
    seed: int = 0
    autocast_adapter_dtype: bool = True
    quantize: Optional[str] = None
    quantize_iters: int = 0
    max_batch_bytes: Optional[int] = None
    dora: bool = False

    def __post_init__(self) -> None:
        self.check(_WHERE.get())

    def check(self, where: str = "AdaptConfig") -> None:
        """Validate every field that does not depend on the model (per-layer checks, e.g. a rank
        within each layer's shape or the patterns' values, come when the targets are known)."""
        if isinstance(self.method, str):
            if self.method not in METHODS:
                raise ValueError(f"{where}: unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        elif not isinstance(self.method, InitMethod):
            raise TypeError(f"{where}: method must be a name or an InitMethod, got {type(self.method).__name__}")
        elif self.method_options:
            raise ValueError(
                f"{where}: options {sorted(self.method_options)} given with an already built method "
                f"{self.method.describe()}"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"{where}: rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, numbers.Real)):
            raise TypeError(f"{where}: alpha must be a positive number, got {type(self.alpha).__name__} {self.alpha!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(
                f"{where}: alpha must be a positive finite number (the LoRA scaling is alpha / rank), got {self.alpha}"
            )
        check_dropout(self.dropout, where)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"{where}: seed must be an int, got {type(self.seed).__name__} {self.seed!r}")
        check_format(self.quantize)
        check_quantize_iters(self.quantize_iters, self.quantize)
        for label, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if pattern is not None and not isinstance(pattern, Mapping):
                raise TypeError(f"{where}: {label} must be a mapping of name -> value, got {type(pattern).__name__}")
        if self.max_batch_bytes is not None and (
            isinstance(self.max_batch_bytes, bool)
            or not isinstance(self.max_batch_bytes, int)
            or self.max_batch_bytes < 1
        ):
            raise ValueError(f"{where}: max_batch_bytes must be a positive int or None, got {self.max_batch_bytes!r}")
        if not isinstance(self.dora, bool):
            raise TypeError(f"{where}: dora must be True or False, got {type(self.dora).__name__} {self.dora!r}")
        if self.dora:
            name = self.method if isinstance(self.method, str) else getattr(self.method, "name", "")
            if name in _NO_DORA:
                raise ValueError(
                    f"{where}: dora=True is not defined for method {name!r} ({_NO_DORA[name]}); use it with "
                    "lora, pissa, corda, milora or asymmetric"
                )
            if self.quantize is not None:
                raise ValueError(
                    f"{where}: dora=True cannot be combined with quantize={self.quantize!r} (DoRA needs a dense base)"
                )

    @classmethod
    def build(
        cls, config: Union[AdaptConfig, str, InitMethod, None] = None, *, where: str = "AdaptConfig", **options
    ) -> AdaptConfig:
        """A config from a config (fields overridden by ``options``), a method name or a built method;
        ``options`` that are not fields are the method's own (``mode="kpa"``). ``where`` names the
        call in error messages."""
        token = _WHERE.set(where)
        try:
            return cls._build(config, options)
        finally:
            _WHERE.reset(token)

    @classmethod
    def _build(cls, config, options: dict) -> AdaptConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        changes = {k: v for k, v in options.items() if k in fields}
        method_options = {k: v for k, v in options.items() if k not in fields}
        if isinstance(config, AdaptConfig):
            if method_options:
                changes["method_options"] = {**dict(config.method_options), **method_options}
            return dataclasses.replace(config, **changes) if changes else config
        if config is not None:
            changes.setdefault("method", config)
        if method_options:
            changes["method_options"] = {**dict(changes.get("method_options") or {}), **method_options}
        return cls(**changes)

    def replace(self, **changes) -> AdaptConfig:
        """A copy with ``changes`` (fields, or the method's options), validated."""
        return AdaptConfig.build(self, **changes)

    def make_method(self) -> InitMethod:
        """The initialization recipe this config names (a built method is returned as it is)."""
        return make_method(self.method, **dict(self.method_options))

    @property
    def method_name(self) -> str:
        return self.method if isinstance(self.method, str) else self.method.describe()

    def to_dict(self) -> dict:
        """The config as JSON-friendly values (a built method by its description)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "method":
                value = self.method_name
            else:
                value = _plain(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdaptConfig:
        """The inverse of :meth:`to_dict` for configs naming their method (unknown keys refused)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"AdaptConfig.from_dict: unknown keys {unknown}")
        return cls(**dict(data))


def _plain(value):
    """JSON-friendly: containers recursively, a tensor by its shape and dtype (few-shot batches are
    data, not settings), anything else by ``str``."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):
        return f"tensor{list(shape)} {str(value.dtype).replace('torch.', '')}"
    return str(value)
