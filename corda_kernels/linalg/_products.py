"""fp64 products of fp32 (or fp64) data without a full fp64 copy, and Gram matrices for ``eigh``.

- :func:`times_fp64` ``(L, R)``: ``L @ R.double()`` by column panels of ``R`` (work space ``n x``
  :data:`FP64_PANEL`, not a copy of ``R``).
- :func:`gram_lower` ``(A, rows=..., dtype=...)``: ``AᵀA`` or ``AAᵀ`` in ``dtype``, only the lower
  triangle (what ``eigh`` reads): BLAS ``?syrk`` through SciPy on a CPU (half the flops of a GEMM),
  an fp32 ``A`` converted to fp64 a panel at a time.

Besides the memory, a fresh fp64 copy of a weight is written once and read once: on a CPU the
panels stay in cache and reuse one buffer.
"""

from __future__ import annotations

from typing import Optional

import torch

FP64_PANEL = 256  # columns (rows) of an fp32 operand converted to fp64 at a time
SYRK_MIN_SIDE = 64  # below this Gram side torch's GEMM is as fast as BLAS ?syrk


def times_fp64(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``L @ R.double()`` for an fp64 ``L`` (batch dims broadcast), ``R`` converted by column
    panels (each output column the same dot products; BLAS may block them differently, fp64
    rounding: bit-equal at 256-column panels on the shapes checked, 2e-14 relative at 7)."""
    if R.dtype == torch.float64:
        return L @ R
    n = R.shape[-1]
    batch = torch.broadcast_shapes(L.shape[:-2], R.shape[:-2])
    out = torch.empty(*batch, L.shape[-2], n, dtype=torch.float64, device=L.device)
    for j in range(0, n, FP64_PANEL):
        out[..., j : j + FP64_PANEL] = L @ R[..., j : j + FP64_PANEL].double()
    return out


def gram_lower(A: torch.Tensor, *, rows: bool = False, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``Aᵀ A`` (``rows=False``, ``(..., n, n)``) or ``A Aᵀ`` (``rows=True``, ``(..., m, m)``) of
    each fp32 / fp64 ``(..., m, n)`` ``A``, in ``dtype`` (default ``A``'s), for ``eigh``: only the
    lower triangle is defined. On a CPU BLAS ``?syrk`` forms only that triangle (the same dot
    products), an fp32 ``A`` with an fp64 ``dtype`` converted :data:`FP64_PANEL` rows of the summed
    dimension at a time into one reused buffer; elsewhere, for small or other dtypes, the full
    product of ``A.to(dtype)``."""
    dtype = A.dtype if dtype is None else dtype
    if rows:  # A Aᵀ is the Gram matrix of Aᵀ
        A = A.mT
    side = A.shape[-1]
    floats = (torch.float32, torch.float64)
    syrk = A.device.type == "cpu" and side >= SYRK_MIN_SIDE and A.dtype in floats and dtype in floats
    if syrk:
        try:
            from scipy.linalg import blas
        except ImportError:  # SciPy is a dependency; a broken install still gets the right answer
            syrk = False
    if not syrk or A.requires_grad:
        Ad = A.to(dtype)
        return Ad.mT @ Ad
    routine = blas.dsyrk if dtype == torch.float64 else blas.ssyrk
    flat = A.detach().reshape(-1, *A.shape[-2:])
    out = torch.empty(flat.shape[0], side, side, dtype=dtype)
    for i, a in enumerate(flat):
        if a.dtype == dtype:
            # ?syrk forms B·Bᵀ (trans=0) or Bᵀ·B (trans=1); B = aᵀ or a, whichever is Fortran-ordered
            # (read in place).
            g = routine(1.0, a.mT.numpy(), lower=1) if a.is_contiguous() else routine(1.0, a.numpy(), trans=1, lower=1)
        else:
            g = None
            buffer = torch.empty(FP64_PANEL, side, dtype=dtype)
            for j in range(0, a.shape[-2], FP64_PANEL):
                b = buffer[: min(FP64_PANEL, a.shape[-2] - j)]
                b.copy_(a[j : j + FP64_PANEL])  # rows j.. of a, then bᵀ·b
                if g is None:
                    g = routine(1.0, b.mT.numpy(), lower=1)
                else:
                    g = routine(1.0, b.mT.numpy(), beta=1.0, c=g, lower=1, overwrite_c=1)
        out[i] = torch.from_numpy(g)
    return out.reshape(*A.shape[:-2], side, side)
