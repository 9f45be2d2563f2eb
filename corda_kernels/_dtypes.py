"""The floating-point dtypes the package accepts, and the precision each computes in (one home)."""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)
# Activations and model weights: what covariance_update, the fused layer and target layers take.
ACTIVATION_DTYPES = (torch.float32, *HALF_DTYPES)
# Matrices the decompositions and the fused op's reference accept (fp64 for exact oracles).
FLOAT_DTYPES = (*ACTIVATION_DTYPES, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; bf16/fp16/fp32 accumulate (and are decomposed) in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
