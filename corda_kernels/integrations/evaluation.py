"""Next-token likelihood of a causal LM on tokenizer-style batches: the measure the discard report
(perplexity) and Partial-LoRA's few-shot ratio search (likelihood, accuracy) share."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from . import hf


def next_token_stats(model: nn.Module, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(summed NLL, correct argmax predictions, token count)`` of ``batch``'s next tokens.

    The NLL keeps its graph (SNIP differentiates it). Tokens are the positions whose label is
    not -100; labels default to ``input_ids`` with padding (``attention_mask == 0``) ignored.
    """
    device = hf.input_device(model)
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.to(device)
    labels = batch.get("labels")
    labels = ids.masked_fill(mask == 0, -100) if labels is None else labels.to(device)
    out = model(**hf.without_cache(model, {"input_ids": ids, "attention_mask": mask}))
    logits = getattr(out, "logits", None)
    if logits is None:
        raise TypeError(
            f"next-token metrics need a causal LM with .logits; {type(model).__name__} returned "
            f"{type(out).__name__}. For Partial-LoRA pass metric=callable(model, batches) (and loss= for score='snip')"
        )
    target = labels[:, 1:]
    keep = target != -100
    logits = logits[:, :-1][keep].float()
    target = target[keep]
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    correct = (logits.argmax(-1) == target).sum()
    return nll, correct, int(target.numel())


@torch.no_grad()
def next_token_totals(model: nn.Module, batches: Sequence[Mapping]) -> tuple[float, int, int]:
    """``(summed NLL, correct argmax predictions, tokens)`` over all ``batches``."""
    nll = correct = count = 0
    for batch in batches:
        b_nll, b_correct, b_count = next_token_stats(model, batch)
        nll, correct, count = nll + float(b_nll), correct + int(b_correct), count + b_count
    if count == 0:
        raise ValueError("the evaluation batches hold no next-token targets (all padding or -100)")
    return nll, correct, count


def builtin_metric(kind: str, model: nn.Module, batches: Sequence[Mapping]) -> float:
    """``"likelihood"``: ``exp(−mean NLL)``; ``"accuracy"``: argmax accuracy, over all tokens."""
    nll, correct, count = next_token_totals(model, batches)
    return math.exp(-nll / count) if kind == "likelihood" else correct / count


def perplexity(model: nn.Module, batches: Sequence[Mapping]) -> float:
    """``exp(mean next-token NLL)`` over the non-padding tokens of ``batches``."""
    nll, _, count = next_token_totals(model, batches)
    return math.exp(nll / count)
