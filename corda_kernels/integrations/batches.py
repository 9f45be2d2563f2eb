"""Checks of tokenized batches before a model runs on them (calibration, Partial-LoRA's few-shot
batches): each refusal names the batch and the key at fault instead of failing deep in the model."""

from __future__ import annotations

import numbers
from typing import Mapping, Optional

import torch
from torch import nn


def vocabulary_size(model: nn.Module) -> Optional[int]:
    """Rows of the model's input embedding (the valid token ids), or ``config.vocab_size``."""
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if isinstance(getattr(emb, "num_embeddings", None), int):
        return emb.num_embeddings
    return getattr(getattr(model, "config", None), "vocab_size", None)


# Embedding lookups take int64 / int32 indices; uint8 / int16 / int8 fail inside the model (and a
# uint8 tensor used as an index is a mask), so they are refused here.
ID_DTYPES = (torch.int64, torch.int32)


def _on_meta(tensor: torch.Tensor, key: str, index: int, what: str) -> None:
    if tensor.is_meta:
        raise ValueError(
            f"{what} {index}: {key} is on the meta device (a shape without values); calibration runs the model "
            "on real token ids: build the batch on the CPU or the model's device"
        )


def _check_ids(batch: Mapping, key: str, index: int, vocab: Optional[int], what: str) -> None:
    ids = batch[key]
    if not isinstance(ids, torch.Tensor) or ids.dtype not in ID_DTYPES:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(
            f"{what} {index}: {key} must be an integer tensor of token ids (int64 or int32, as tokenizers "
            f"return), got {got}"
        )
    _on_meta(ids, key, index, what)
    if ids.dim() != 2:
        raise ValueError(
            f"{what} {index}: {key} must be (batch, sequence) like a tokenizer's output, got shape {tuple(ids.shape)}"
        )
    if ids.numel() == 0:
        raise ValueError(
            f"{what} {index}: {key} of shape {tuple(ids.shape)} holds no tokens (sequences of length 0); "
            "drop empty texts before tokenizing"
        )
    if vocab is not None:
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"{what} {index}: {key} holds token id {lo if lo < 0 else hi}, outside the model's "
                f"vocabulary of {vocab} (ids 0..{vocab - 1}); was it tokenized for another model?"
            )


def _check_mask(batch: Mapping, key: str, ids_key: str, index: int, what: str) -> None:
    mask = batch.get(key)
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what} {index}: {key} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(batch[ids_key].shape):
        raise ValueError(
            f"{what} {index}: {key} has shape {tuple(mask.shape)} but {ids_key} has "
            f"{tuple(batch[ids_key].shape)}; they must match (1 = token, 0 = padding)"
        )
    _on_meta(mask, key, index, what)
    bad = (mask != 0) & (mask != 1)  # NaN too
    if bool(bad.any()):
        value = mask[bad][0].item()
        raise ValueError(f"{what} {index}: {key} holds {value}; it must hold 1 (token) and 0 (padding) only")


def check_batch(model: nn.Module, batch, index: int, what: str = "calibration batch") -> None:
    """Refuse a batch the model cannot run as meant, naming it (``what`` and ``index``): not a dict
    with ``input_ids``; ids not ``(batch, sequence)`` int64/int32, on the meta device, empty, or
    outside the vocabulary; an ``attention_mask`` (``decoder_attention_mask``) of another shape than
    its ids, on the meta device, or holding anything but 0 and 1 (NaN included); sequences longer
    than ``max_position_embeddings``."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            f"{what} {index} must be a dict with 'input_ids' (and 'attention_mask'), like a tokenizer's "
            f"output; got {type(batch).__name__}"
        )
    vocab = vocabulary_size(model)
    _check_ids(batch, "input_ids", index, vocab, what)
    _check_mask(batch, "attention_mask", "input_ids", index, what)
    if batch.get("decoder_input_ids") is not None:
        _check_ids(batch, "decoder_input_ids", index, vocab, what)
        _check_mask(batch, "decoder_attention_mask", "decoder_input_ids", index, what)
    ids = batch["input_ids"]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and ids.shape[-1] > limit:
        raise ValueError(
            f"{what} {index} has sequences of {ids.shape[-1]} tokens but the model allows at most {limit} "
            "(max_position_embeddings); truncate the text"
        )


def check_max_batches(max_batches, what: str = "calibrate") -> Optional[int]:
    """``max_batches``: None (every batch) or a positive integer (not a bool or a float)."""
    if max_batches is None:
        return None
    if isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral):
        raise TypeError(
            f"{what}: max_batches must be a positive integer (or None: every batch), got "
            f"{type(max_batches).__name__} {max_batches!r}"
        )
    if max_batches < 1:
        raise ValueError(f"{what}: max_batches must be a positive integer (or None: every batch), got {max_batches}")
    return int(max_batches)
