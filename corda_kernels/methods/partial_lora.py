"""Partial-LoRA ("The Quest for Winning Tickets in Low-Rank Adapters", ICLR 2025 submission).

``ΔW = (u_row ∘ B)(u_col ∘ A)``: random Bernoulli masks on the rows of B and the columns of A, at
a per-layer ratio derived from a few-shot subset of the task. Only the kept rows of ``B`` and
columns of ``A`` exist (``row_index`` / ``col_index``, compact factors), so a layer trains
``kept_rows·r + r·kept_cols`` numbers instead of dense LoRA's ``(out + in)·r``.

No code is public; this is our reading of the reviews and author answers (paper 003). The ratio
search lives in :mod:`corda_kernels.methods.partial_lora_ratios`:

- **Ratio, SVD-based (default, forward-only).** Each target layer is treated alone (q, k, v
  separately; the other layers intact). With ``W = U·diag(S)·Vᵀ`` and ``m = min(out, in)``, the
  layer's weight is replaced by its rank-k approximation ``W_k``; ``k_l`` is the smallest k for
  which ``metric(model with W_k) >= margin · metric(unpruned model)`` (``margin = 0.9``, the
  intrinsic-dimension "90% of the accuracy" rule), found by bisection over ``k in [1, m]``
  (about ``log2 m`` evaluations per layer, assuming the metric grows with k). Ratio
  ``p_l = k_l / m``: the fraction of the layer's spectrum the task needs.
- **Ratio, SNIP (``score="snip"``).** ``s = |W ⊙ ∂L/∂W|`` with ``L`` the few-shot loss summed over
  the batches; ``p_l`` is the smallest fraction of the entries of W whose scores hold ``margin``
  of the layer's total score mass.
- **Masks.** Rows of B are kept with probability ``p_l`` and columns of A with probability
  ``p_l`` (independent Bernoulli draws from a generator seeded by ``(seed, layer name)``, at
  least one of each kept), so the trainable parameters are ``≈ p_l`` times dense LoRA's. The
  paper finds random masks as good as targeted ones, so the ratio, not the positions, carries
  the few-shot information. Init is LoRA's on the kept entries: ``A`` is PEFT's Kaiming-uniform
  ``(r, in)`` draw restricted to the kept columns, ``B = 0``; the base weight is unchanged.

Metric (higher is better, must be positive on the unpruned model): ``"likelihood"`` (default),
``exp(−mean next-token NLL)`` over the non-padding tokens of the few-shot batches (the geometric
mean probability of the correct next token: a soft accuracy that stays informative where
argmax accuracy is near 0, and a 0.9 margin means at most ~11% higher perplexity);
``"accuracy"``, next-token argmax accuracy; or a callable ``metric(model, batches) -> float``.
Batches are dicts with ``input_ids`` and optionally ``attention_mask`` and ``labels`` (HF
convention: aligned with ``input_ids``, ``-100`` ignored; default: the non-padding input ids).
SNIP uses the summed next-token NLL, or ``loss(model, batch) -> scalar tensor``.

Options: ``few_shot=batches``, ``margin=0.9``, ``score="svd"|"snip"``, ``metric``, ``loss``, or
``densities=`` a ratio in (0, 1] (uniform) or ``{layer name: ratio}`` to skip the derivation.
After ``prepare`` the method keeps ``ratios`` ({name: p_l}), and for SVD ``subspace_ranks``
({name: k_l}) and ``base_metric``; each adapted layer also carries ``init_stats["density"]``.
:func:`corda_kernels.methods.parameters.trainable_parameter_report` compares the trainable
parameters with dense LoRA's.
"""

from __future__ import annotations

from numbers import Real
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..integrations import hf
from ..integrations.batches import check_batch
from . import partial_lora_ratios as ratio_search
from .base import InitMethod, LayerBatch, LayerInit
from .lora import kaiming_A, layer_generator

SCORES = ("svd", "snip")
METRICS = ("likelihood", "accuracy")


def _is_ratio(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and 0 < value <= 1


def _mask_index(n: int, density: float, generator: torch.Generator) -> Optional[torch.Tensor]:
    """Bernoulli(``density``) keep-draw over ``n`` features (at least one kept) as sorted int64
    indices, or None when every feature is kept."""
    draw = torch.rand(n, generator=generator)
    keep = draw < density
    if not keep.any():
        keep[draw.argmin()] = True
    return None if keep.all() else keep.nonzero().squeeze(1)


class PartialLoRA(InitMethod):
    """LoRA with per-layer random row/column masks at few-shot-derived ratios (module docstring)."""

    name = "partial_lora"
    subtracts = False

    def __init__(
        self,
        few_shot: Optional[Sequence[Mapping]] = None,
        *,
        margin: float = 0.9,
        score: str = "svd",
        metric: Union[str, Callable] = "likelihood",
        loss: Optional[Callable] = None,
        densities: Union[float, Mapping[str, float], None] = None,
    ):
        if not _is_ratio(margin):
            raise ValueError(
                f"Partial-LoRA margin must be in (0, 1] (fraction of the unpruned metric to keep), got {margin!r}"
            )
        if score not in SCORES:
            raise ValueError(f"Partial-LoRA score must be one of {SCORES}, got {score!r}")
        if not callable(metric) and metric not in METRICS:
            raise ValueError(
                f"Partial-LoRA metric must be one of {METRICS} or a callable(model, batches) -> float, got {metric!r}"
            )
        if densities is None:
            if isinstance(few_shot, Mapping):
                few_shot = [few_shot]
            if not few_shot:
                raise ValueError(
                    "Partial-LoRA needs few_shot=[batch, ...] (dicts with input_ids) to derive per-layer ratios, "
                    "or densities= a ratio / {layer name: ratio} to skip the derivation"
                )
        elif isinstance(densities, Mapping):
            bad = {n: v for n, v in densities.items() if not _is_ratio(v)}
            if bad:
                name, value = next(iter(bad.items()))
                raise ValueError(f"Partial-LoRA density of layer {name} must be in (0, 1], got {value!r}")
        elif not _is_ratio(densities):
            raise ValueError(
                f"Partial-LoRA densities must be a ratio in (0, 1] or {{layer name: ratio}}, got {densities!r}"
            )
        self.few_shot = None if few_shot is None else list(few_shot)
        self.margin, self.score, self.metric, self.loss, self.densities = margin, score, metric, loss, densities
        self.ratios: dict[str, float] = {}
        self.subspace_ranks: dict[str, int] = {}
        self.base_metric: Optional[float] = None

    def describe(self) -> str:
        how = "given" if self.densities is not None else self.score
        return f"partial_lora-{how}"

    # -- ratios -------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, targets: Mapping[str, nn.Module]) -> None:
        """Fill :attr:`ratios` for ``targets`` (given densities, or derived on the few-shot batches)."""
        if self.densities is not None:
            self.ratios = self._given(targets)
            return
        builtin = not callable(self.metric) if self.score == "svd" else self.loss is None
        if builtin and hf.is_encoder_decoder(model):
            what = f"metric={self.metric!r}" if self.score == "svd" else "the default SNIP loss"
            option = "metric=callable(model, batches)" if self.score == "svd" else "loss=callable(model, batch)"
            raise ValueError(
                f"Partial-LoRA's {what} is a causal LM's next-token measure; {type(model).__name__} is an "
                f"encoder-decoder model: pass {option}, or densities= to skip the derivation"
            )
        if builtin:  # our next-token measures run the model on them: refuse what it cannot run, by batch
            for index, batch in enumerate(self.few_shot):
                check_batch(model, batch, index, "Partial-LoRA few-shot batch")
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            if self.score == "svd":
                evaluate = ratio_search.evaluator(self.metric, self.few_shot)
                self.ratios, self.subspace_ranks, self.base_metric = ratio_search.svd_ratios(
                    model, targets, evaluate, self.margin
                )
            else:
                self.ratios = ratio_search.snip_ratios(model, targets, self.few_shot, self.margin, self.loss)
        finally:
            for module, mode in modes:
                module.training = mode

    def _given(self, targets: Mapping[str, nn.Module]) -> dict[str, float]:
        if not isinstance(self.densities, Mapping):
            return {name: float(self.densities) for name in targets}
        missing = [n for n in targets if n not in self.densities]
        extra = [n for n in self.densities if n not in targets]
        if missing or extra:
            raise ValueError(
                f"Partial-LoRA densities must name exactly the target layers: missing {hf.named(missing) or 'none'}, "
                f"not targets {hf.named(extra) or 'none'}"
            )
        return {name: float(self.densities[name]) for name in targets}

    # -- factors ------------------------------------------------------------------------------

    def init_batch(self, batch: LayerBatch) -> list[LayerInit]:
        weights, _, rank, scale, names, seed = batch
        _, out_f, in_f = weights.shape
        inits = []
        for name in names:
            if name not in self.ratios:
                raise ValueError(
                    f"Partial-LoRA has no ratio for layer {name}: run prepare(model, targets) first (apply does)"
                )
            density = self.ratios[name]
            g = layer_generator(seed, name)
            rows, cols = _mask_index(out_f, density, g), _mask_index(in_f, density, g)
            A = kaiming_A(rank, in_f, g)
            A = A if cols is None else A[:, cols]
            n_rows = out_f if rows is None else rows.numel()
            inits.append(
                LayerInit(
                    A=A.contiguous().to(weights.device),
                    B=weights.new_zeros(n_rows, rank),
                    scale=scale,
                    subtract=False,
                    row_index=None if rows is None else rows.to(weights.device),
                    col_index=None if cols is None else cols.to(weights.device),
                    stats={"density": density},
                )
            )
        return inits
