"""ASVD: activation-scaled SVD, the CorDA paper's middle baseline between plain SVD and CO-SVD.

ASVD decomposes ``W·S`` with ``S = diag(s)`` a per-input-channel activation magnitude raised to
``alpha`` (0.5 in the ASVD paper) and folds ``S⁻¹`` back: ``W ≈ U·Σ·(Vᵀ·S⁻¹)``. ``mode="ipa"``
keeps the largest r components in the adapter, ``"kpa"`` the smallest. Two channel magnitudes:

- :class:`ASVD` takes the activation RMS, ``sqrt(diag(C))``, from the input covariance CorDA
  calibrates (no pass of its own).
- :class:`MeanAbsASVD` takes the ASVD paper's own magnitude, the mean ``|x|`` of each channel
  (recorded during calibration by :class:`~corda_kernels.calibration.mean_abs.MeanAbsInputs`),
  and keeps the smallest components: the ASVD of ``corda-kernels report``
  (:mod:`corda_kernels.cli.report`), so SVD, ASVD and CO-SVD see the same calibration passes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..linalg.exact_svd import smallest_singular_triplets
from ..linalg.randomized_svd import randomized_svd
from .base import InitMethod, LayerBatch, LayerInit, component_inits


class ASVD(InitMethod):
    name = "asvd"
    needs_covariance = True

    def __init__(self, mode: str = "ipa", alpha: float = 0.5, eps: float = 1e-6):
        if mode not in ("ipa", "kpa"):
            raise ValueError(f"ASVD mode must be 'ipa' (largest r) or 'kpa' (smallest r), got {mode!r}")
        self.mode, self.alpha, self.eps = mode, alpha, eps

    def init_batch(self, batch: LayerBatch) -> list[LayerInit]:
        weights, _, rank, scale, _, _ = batch
        covariances = batch.require_covariances("ASVD")
        rms = covariances.diagonals().clamp_min(0).sqrt()
        s = rms.clamp_min(self.eps * rms.amax(-1, keepdim=True).clamp_min(1e-30)).pow(self.alpha)  # (L, in)
        scaled = weights * s.unsqueeze(-2)
        if self.mode == "ipa":
            U, S, Vh = randomized_svd(scaled, rank, seed=batch.layer_seeds())
        else:
            U, S, Vh = smallest_singular_triplets(scaled, rank)
        return component_inits(U, S, Vh / s.unsqueeze(-2), scale, scaled.square().sum((-2, -1)))


class _Diagonals(NamedTuple):
    """What :meth:`ASVD.init_batch` reads of a covariance (``diagonals()``), holding the squared magnitudes."""

    squares: torch.Tensor  # (L, in)

    def diagonals(self) -> torch.Tensor:
        return self.squares


class MeanAbsASVD(ASVD):
    """ASVD (smallest components) with the ASVD paper's channel scale ``mean|x| ** alpha``, from
    ``magnitudes`` ``{layer: (in,) mean |x|}`` (recorded by
    :class:`~corda_kernels.calibration.mean_abs.MeanAbsInputs`) instead of the covariance."""

    needs_covariance = False

    def __init__(self, magnitudes: dict, alpha: float = 0.5):
        super().__init__(mode="kpa", alpha=alpha)
        self.magnitudes = magnitudes

    def init_batch(self, batch: LayerBatch) -> list[LayerInit]:
        m = torch.stack([self.magnitudes[n] for n in batch.names]).to(batch.weights.device, torch.float32)
        return super().init_batch(batch._replace(covariances=_Diagonals(m.square())))
