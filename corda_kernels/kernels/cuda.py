"""Glue to the compiled extension ``corda_kernels._C`` (cuBLAS through ``csrc/``)."""

from __future__ import annotations

import torch

from .. import _backend

# cuBLAS column-block width for the triangle decomposition (csrc/covariance_cuda.cu).
CUBLAS_BLOCK = 1024


def covariance_update(cov: torch.Tensor, x: torch.Tensor, token_mask, upper_only: bool) -> None:
    """``cov += x_selᵀx_sel`` with cuBLAS (fp32 out, beta = 1); ``x`` any ``(..., d)`` view. Rows of a
    ``token_mask`` are compacted first (one gather of the kept rows, one device sync for their count)."""
    rows = x.reshape(-1, x.shape[-1])
    if token_mask is not None:
        rows = rows.index_select(0, token_mask.reshape(-1).nonzero().squeeze(1))
    # cuBLAS reads rows with unit feature stride and a row stride >= d (expanded or overlapping rows,
    # e.g. from .expand(), are copied).
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]):
        rows = rows.contiguous()
    _backend.extension().covariance_update_cublas(cov, rows, upper_only, CUBLAS_BLOCK)
