"""ASVD: activation-scaled SVD, the CorDA paper's middle baseline between plain SVD and CO-SVD.

ASVD decomposes ``W·S`` with ``S = diag(s)`` a per-input-channel activation magnitude raised to
``alpha`` (0.5 in the ASVD paper) and folds ``S⁻¹`` back: ``W ≈ U·Σ·(Vᵀ·S⁻¹)``. We take the channel
magnitude as the activation RMS, ``sqrt(diag(C))``, from the same covariance CorDA uses, so the
three methods of the report see identical calibration data. ``mode="ipa"`` keeps the largest r
components in the adapter, ``"kpa"`` the smallest.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..linalg.exact_svd import smallest_singular_triplets
from ..linalg.randomized_svd import randomized_svd
from .base import InitMethod, LayerCovariances, LayerInit, component_inits, layer_seed


class ASVD(InitMethod):
    name = "asvd"
    needs_covariance = True

    def __init__(self, mode: str = "ipa", alpha: float = 0.5, eps: float = 1e-6):
        if mode not in ("ipa", "kpa"):
            raise ValueError(f"ASVD mode must be 'ipa' (largest r) or 'kpa' (smallest r), got {mode!r}")
        self.mode, self.alpha, self.eps = mode, alpha, eps

    def describe(self) -> str:
        return f"asvd-{self.mode}"

    def init_batch(
        self,
        weights: torch.Tensor,
        covariances: Optional[LayerCovariances],
        rank: int,
        scale: float,
        names: Sequence[str],
        seed: int,
    ) -> list[LayerInit]:
        if covariances is None:
            raise ValueError(f"ASVD needs the input covariance of {names[0]}")
        rms = covariances.diagonals().clamp_min(0).sqrt()
        s = rms.clamp_min(self.eps * rms.amax(-1, keepdim=True).clamp_min(1e-30)).pow(self.alpha)  # (L, in)
        scaled = weights * s.unsqueeze(-2)
        if self.mode == "ipa":
            U, S, Vh = randomized_svd(scaled, rank, seed=[layer_seed(seed, n) for n in names])
        else:
            U, S, Vh = smallest_singular_triplets(scaled, rank)
        return component_inits(U, S, Vh / s.unsqueeze(-2), scale, scaled.square().sum((-2, -1)))
