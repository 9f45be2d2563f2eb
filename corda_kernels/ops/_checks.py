"""Input checks shared by the low-rank ops: tensor kinds, dtypes and devices against the base weight.

Each op checks its own shapes (they differ: one adapter or a stack of them); what a tensor must be
to sit beside the base weight is the same for all, and lives here once.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch

from .._dtypes import ACTIVATION_DTYPES, FLOAT_DTYPES, HALF_DTYPES


def shape(t: torch.Tensor) -> tuple:
    """``t.shape`` as a plain tuple (for messages)."""
    return tuple(t.shape)


def mixed_ok(factor_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """fp32 factors on a 16-bit weight (the training default) are accepted."""
    return factor_dtype == torch.float32 and weight_dtype in HALF_DTYPES


def check_beside_weight(
    op: str, weight: torch.Tensor, named: Mapping[str, Optional[torch.Tensor]], factors: tuple[str, ...]
) -> None:
    """Raise naming ``op`` and the tensor unless every tensor of ``named`` (None: absent) is a float
    tensor of ``weight``'s dtype (or fp32 on a 16-bit weight, for the names in ``factors``) on
    ``weight``'s device.

    Raises:
        TypeError: not a tensor, not a float dtype, or a dtype that does not match the weight's.
        ValueError: a tensor on another device than the weight.
    """
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a float tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
        factor = name in factors
        if t.dtype != weight.dtype and not (factor and mixed_ok(t.dtype, weight.dtype)):
            allowed = "fp32 or weight's dtype" if factor and weight.dtype in HALF_DTYPES else "weight's dtype"
            raise TypeError(
                f"{op}: dtype mismatch: {name} is {t.dtype} but weight is {weight.dtype} ({name} must be {allowed})"
            )
        if t.device != weight.device:
            raise ValueError(f"{op}: device mismatch: {name} is on {t.device} but weight is on {weight.device}")


def autocasts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether autocast will bring ``x`` and ``weight`` to one dtype (fp64 is never cast)."""
    return (
        torch.is_autocast_enabled(x.device.type) and x.dtype in ACTIVATION_DTYPES and weight.dtype in ACTIVATION_DTYPES
    )


def check_input(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise naming ``op`` unless ``x`` is a float tensor of ``weight``'s dtype (or one autocast
    brings to it) on ``weight``'s device whose last dimension is ``in_features``.

    Raises:
        TypeError: ``x`` not a float tensor, or of another dtype outside autocast.
        ValueError: ``x`` on another device, or its last dimension is not ``weight.shape[1]``.
    """
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be a float tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if x.dtype != weight.dtype and not autocasts(x, weight):
        raise TypeError(f"{op}: dtype mismatch: x is {x.dtype} but weight is {weight.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{op}: device mismatch: x is on {x.device} but weight is on {weight.device}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{op}: x {shape(x)} must end in in_features={weight.shape[1]} (weight {shape(weight)})")
