"""Partial-LoRA's per-layer ratios, derived on a few-shot subset (paper 003, our reading; see
:mod:`corda_kernels.methods.partial_lora` for the method). Kept apart from the layer recipe: this
part evaluates the model.

- :func:`svd_ratios`: per layer alone, the smallest rank-k SVD approximation keeping
  ``metric >= margin · metric(unpruned)``, found by bisection; ratio ``k / min(out, in)``.
- :func:`snip_ratios`: the smallest fraction of a layer's entries holding ``margin`` of its SNIP
  score mass ``|W ⊙ ∂L/∂W|``.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..integrations import hf
from ..integrations.evaluation import builtin_metric, next_token_stats


def evaluator(metric, batches: Sequence[Mapping]) -> Callable[[nn.Module], float]:
    """``model -> float``: a built-in metric name (``"likelihood"``, ``"accuracy"``) or a callable
    ``metric(model, batches)``, on the few-shot ``batches``."""
    if callable(metric):
        return lambda model: float(metric(model, batches))
    return lambda model: builtin_metric(metric, model, batches)


def smallest_passing(holds: Callable[[int], bool], n: int) -> int:
    """The smallest ``k`` in ``[1, n]`` with ``holds(k)`` (``holds`` monotone; ``n`` assumed to hold)."""
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def mass_fraction(scores: torch.Tensor, margin: float) -> float:
    """The smallest fraction of ``scores``' entries whose sum holds ``margin`` of the total."""
    ordered = scores.flatten().double().sort(descending=True).values
    cum = ordered.cumsum(0)
    k = int(torch.searchsorted(cum, margin * cum[-1])) + 1
    return min(k, ordered.numel()) / ordered.numel()


@torch.no_grad()
def svd_ratios(
    model: nn.Module, targets: Mapping[str, nn.Module], evaluate: Callable[[nn.Module], float], margin: float
) -> tuple[dict[str, float], dict[str, int], float]:
    """``(ratios, subspace ranks k, unpruned metric)``: each layer alone replaced by its rank-k SVD
    approximation, ``k`` the smallest keeping ``evaluate(model) >= margin · evaluate(unpruned)``
    (bisection over ``[1, min(out, in)]``, assuming the metric grows with k)."""
    base = evaluate(model)
    if not base > 0:
        raise ValueError(
            f"Partial-LoRA: the unpruned model scores {base!r} on the few-shot batches; the margin rule "
            "needs a positive metric (use metric='likelihood', another metric, or densities=)"
        )
    goal = margin * base
    ratios, ranks = {}, {}
    for name, module in targets.items():
        weight = hf.weight_matrix(module)
        original = weight.detach().clone()
        U, S, Vh = torch.linalg.svd(original.float(), full_matrices=False)

        def holds(k: int, weight=weight, U=U, S=S, Vh=Vh) -> bool:
            weight.copy_(((U[:, :k] * S[:k]) @ Vh[:k]).to(weight.dtype))
            return evaluate(model) >= goal

        try:
            k = smallest_passing(holds, S.numel())
        finally:
            weight.copy_(original)
        ranks[name] = k
        ratios[name] = k / S.numel()
    return ratios, ranks, base


def snip_ratios(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    batches: Sequence[Mapping],
    margin: float,
    loss: Optional[Callable] = None,
) -> dict[str, float]:
    """Per layer, the smallest fraction of its entries whose SNIP scores ``|W ⊙ ∂L/∂W|`` hold
    ``margin`` of the total (``L``: the few-shot loss summed over ``batches``: ``loss(model, batch)``
    or the summed next-token NLL). Gradients and ``requires_grad`` flags are restored afterwards."""
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    weights = {name: module.weight for name, module in targets.items()}
    try:
        for p, _, _ in saved:
            p.requires_grad_(False)
            p.grad = None
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            value = loss(model, batch) if loss is not None else next_token_stats(model, batch)[0]
            value.backward()
        ratios = {}
        for name, w in weights.items():
            if w.grad is None or not bool(w.grad.any()):
                raise ValueError(f"Partial-LoRA SNIP: layer {name} gets no gradient from the few-shot loss")
            ratios[name] = mass_fraction((w.detach().float() * w.grad.float()).abs(), margin)
    finally:
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
    return ratios
