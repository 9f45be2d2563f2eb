"""Input validation shared by the decompositions (randomized_svd, exact_svd, co_svd)."""

from __future__ import annotations

import torch

from .._dtypes import FLOAT_DTYPES, accumulation_dtype


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; bf16/fp16/fp32 are computed (and returned) in fp32."""
    return accumulation_dtype(x.dtype)


def name_suffix(name: str) -> str:
    """``" (name)"`` for an error message's ``op (name): ...``, or "" without a name."""
    return f" ({name})" if name else ""


def check_matrix(x, op: str, arg: str = "A", name: str = "") -> None:
    """``x`` must be a non-empty ``(..., m, n)`` floating-point tensor."""
    where = name_suffix(name)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}{where}: {arg} must be a tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}{where}: {arg} must be a bf16, fp16, fp32 or fp64 tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{op}{where}: {arg} must have shape (..., m, n), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{op}{where}: {arg} is empty (shape {tuple(x.shape)})")


def check_rank(rank, shape: torch.Size, op: str, arg: str = "A", name: str = "") -> None:
    """``rank`` must be an int in ``1..min(m, n)`` for a ``(..., m, n)`` matrix."""
    k = min(shape[-2], shape[-1])
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise ValueError(
            f"{op}{name_suffix(name)}: rank must be an int in 1..min(m, n) = 1..{k} for {arg} of shape "
            f"{tuple(shape)}, got {rank!r}"
        )


def check_finite(x: torch.Tensor, op: str, arg: str = "A", name: str = "") -> None:
    """Raise :class:`FloatingPointError` naming the first matrix of the batch that holds NaN/Inf.

    Read through each matrix's ``amax`` and ``amin`` (NaN propagates through both, ``±Inf`` shows in
    one): two reductions without the bool copy of ``isfinite(x)``, ten times faster on a CPU."""
    if x.numel() == 0:
        return
    dims = (-2, -1)
    finite = torch.isfinite(x.amax(dim=dims)) & torch.isfinite(x.amin(dim=dims))
    if not bool(finite.all()):
        where = ""
        if finite.dim():
            bad = (~finite).nonzero()
            where = f" in {bad.shape[0]} of {finite.numel()} matrices (first at batch index {tuple(bad[0].tolist())})"
        raise FloatingPointError(f"{op}{name_suffix(name)}: {arg} of shape {tuple(x.shape)} holds NaN or Inf{where}")
