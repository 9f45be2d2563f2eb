"""CorDA: context-oriented decomposition adapters (NeurIPS 2024; PEFT ``init_lora_weights="corda"``).

With C the covariance of a layer's input and ``C_d`` its damped version, CorDA decomposes
``W·C_d = U·S·Vᵀ`` and uses ``W ≈ U·S·(Vᵀ·C_d⁻¹)``:

- ``mode="ipa"`` (instruction-previewed): the adapter holds the largest r components (randomized
  SVD), the frozen residual the rest;
- ``mode="kpa"`` (knowledge-preserved): the adapter holds the smallest r components (an exact
  method), so the components the calibration data uses most stay frozen.

Factors follow PEFT: ``A = sqrt(S/scale)·(C_d⁻¹V)ᵀ``, ``B = U·sqrt(S/scale)``, residual
``W − scale·B·A`` (formed later from these stored factors). ``stats["energy"]`` is the fraction
of ``‖W·C_d‖_F²`` held by the adapter.
"""

from __future__ import annotations

from ..linalg.co_svd import MODES, SVD_SOLVERS, co_svd
from .base import InitMethod, LayerBatch, LayerInit, component_inits

# Accepted spellings: the paper's IPA/KPA and PEFT's "ipm"/"kpm".
_ALIASES = {**{mode: mode for mode in MODES}, "ipm": "ipa", "kpm": "kpa"}


class CorDA(InitMethod):
    name = "corda"
    needs_covariance = True

    def __init__(self, mode: str = "ipa", damp: float = 0.01, svd: str = "randomized"):
        if mode not in _ALIASES:
            raise ValueError(
                f"CorDA mode must be 'ipa' (instruction-previewed) or 'kpa' (knowledge-preserved), got {mode!r}"
            )
        if svd not in SVD_SOLVERS:  # checked here, not after a calibration run
            raise ValueError(f"CorDA svd must be one of {', '.join(map(repr, SVD_SOLVERS))}, got {svd!r}")
        self.mode = _ALIASES[mode]
        self.damp = damp
        self.svd = svd

    def init_batch(self, batch: LayerBatch) -> list[LayerInit]:
        weights, _, rank, scale, names, _ = batch
        covariances = batch.require_covariances("CorDA", ": pass covariances=calibrate(model, ...)")
        solver = self.svd if self.mode == "ipa" else "exact"
        result = co_svd(
            weights,
            covariances.unique,
            rank,
            mode=self.mode,
            damp=self.damp,
            seed=batch.layer_seeds(),
            svd=solver,
            cov_index=covariances.index,
            name=names[0],
        )
        return component_inits(result.U, result.S, result.V.mT, scale, result.energy, damp=result.damp.tolist())
