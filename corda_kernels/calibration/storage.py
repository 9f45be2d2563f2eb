"""How a finalized covariance is kept between calibration and decomposition.

- ``storage="full"``: the symmetric ``(d, d)`` fp32 matrix (default).
- ``storage="packed"``: its upper triangle only, row by row, as a 1-D fp32 tensor of
  ``d (d + 1) / 2`` elements (half the bytes); :func:`unpack` rebuilds the full matrix, bit for bit.
- ``device="cpu"`` (``calibrate(covariance_device="cpu")``): the stored tensor lives in CPU memory
  (pinned when CUDA is available, so the copy back to the GPU per decomposition chunk is fast);
  default (None): where it was accumulated.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..ops.covariance import symmetrize_

STORAGES = ("full", "packed")
DEVICES = (None, "cpu")
# Rows per block when packing / unpacking: the extra memory is one (ROWS, d) bool mask.
ROWS = 512


def check_options(storage: str, device: Optional[str]) -> None:
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if device not in DEVICES:
        raise ValueError(
            f"covariance_device must be None or 'cpu' (where finalized covariances are kept), got {device!r}"
        )


def packed_size(d: int) -> int:
    """Elements of a packed ``(d, d)`` upper triangle: ``d (d + 1) / 2``."""
    return d * (d + 1) // 2


def packed_dim(n: int) -> int:
    """``d`` such that ``packed_size(d) == n``; ValueError when ``n`` is no triangular number."""
    d = (math.isqrt(8 * n + 1) - 1) // 2
    if packed_size(d) != n:
        raise ValueError(f"a packed covariance has d(d+1)/2 elements; {n} is not of that form")
    return d


def _offset(row: int, d: int) -> int:
    """Index in the packed vector of element ``(row, row)``."""
    return row * d - row * (row - 1) // 2


def _upper_mask(i0: int, i1: int, d: int, device) -> torch.Tensor:
    rows = torch.arange(i0, i1, device=device)[:, None]
    return torch.arange(d, device=device)[None, :] >= rows


def upper_segments(C: torch.Tensor, storage: str = "full"):
    """Yield a covariance's upper triangle, row-major, in pieces of at most ``ROWS`` rows (1-D
    tensors whose concatenation is :func:`pack` ``(C)``), for a full or an already packed ``C``."""
    if storage == "packed":
        d = packed_dim(C.numel())
        for i0 in range(0, d, ROWS):
            yield C[_offset(i0, d) : _offset(min(d, i0 + ROWS), d)]
        return
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"pack: expected a square (d, d) matrix, got {tuple(C.shape)}")
    d = C.shape[0]
    for i0 in range(0, d, ROWS):
        i1 = min(d, i0 + ROWS)
        yield C[i0:i1][_upper_mask(i0, i1, d, C.device)]


def pack(C: torch.Tensor) -> torch.Tensor:
    """The upper triangle (diagonal included) of a square ``(d, d)`` matrix, row-major, 1-D."""
    out = C.new_empty(packed_size(C.shape[0]) if C.dim() == 2 else 0)
    start = 0
    for segment in upper_segments(C):
        out[start : start + segment.numel()] = segment
        start += segment.numel()
    return out


def unpack(packed: torch.Tensor, device=None) -> torch.Tensor:
    """The symmetric ``(d, d)`` matrix of a :func:`pack` ed upper triangle, on ``device`` (default:
    where ``packed`` is; the packed vector is moved first, then expanded there)."""
    d = packed_dim(packed.numel())
    packed = packed.to(device) if device is not None else packed
    C = packed.new_empty(d, d)
    for i0 in range(0, d, ROWS):
        i1 = min(d, i0 + ROWS)
        C[i0:i1].masked_scatter_(_upper_mask(i0, i1, d, C.device), packed[_offset(i0, d) : _offset(i1, d)])
    return symmetrize_(C)  # overwrites the lower triangle (never read before)


def keep(C: torch.Tensor, storage: str, device: Optional[str]) -> torch.Tensor:
    """The stored form of a finalized ``(d, d)`` covariance (see the module docstring)."""
    stored = pack(C) if storage == "packed" else C
    if device == "cpu":
        stored = stored.to("cpu")
        if torch.cuda.is_available():
            stored = stored.pin_memory()
    return stored


def expand(stored: torch.Tensor, storage: str, device=None) -> torch.Tensor:
    """The full ``(d, d)`` matrix of a stored covariance, on ``device`` (default: where it is kept).
    A full one on its own device is returned as is (no copy)."""
    if storage == "packed":
        return unpack(stored, device)
    return stored if device is None else stored.to(device)
