"""Reference (specification) of the covariance update.

``cov += x_selᵀ x_sel`` where ``x_sel`` are the rows of ``x.reshape(-1, d)`` whose token mask is
True, accumulated in ``cov``'s dtype (fp32, or fp64 when tests ask for an exact oracle).
With ``upper_only`` only entries on or above the diagonal change; the strict lower triangle is
left as it was (the fast kernels compute only those tiles; :func:`corda_kernels.ops.covariance.symmetrize_`
completes it).
"""

from __future__ import annotations

from typing import Optional

import torch


def covariance_update(
    cov: torch.Tensor, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None, upper_only: bool = True
) -> None:
    rows = x.reshape(-1, x.shape[-1])
    if token_mask is not None:
        rows = rows[token_mask.reshape(-1)]
    rows = rows.to(cov.dtype)
    gram = rows.t() @ rows
    cov.add_(gram.triu() if upper_only else gram)
