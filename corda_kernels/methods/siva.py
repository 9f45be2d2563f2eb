"""SiVA, singular value adaptation: train only the smallest singular values of W.

One SVD per layer, ``W = U·diag(S)·Vᵀ``. The ``k`` smallest triplets ``(U_k, S_k, V_k)`` (exact
bottom-k solver) form the adapter; only their singular values train:

    W' = W − U_k·diag(S_k)·V_kᵀ   (frozen residual, the top min(out, in) − k components)
    y  = x·W'ᵀ + scale · x·V_k·diag(d)·U_kᵀ,   d = S_k / scale at init (trainable, ``diag``)

so ``A = V_kᵀ (k, in)`` and ``B = U_k (out, k)`` are frozen buffers and the layer trains ``k``
numbers; training moves ``scale·d`` away from ``S_k``, i.e. learns offsets of the smallest
singular values with the singular vectors kept. ``k`` is ``apply``'s ``rank``, or
``max(1, round(perc · min(out, in)))`` with ``perc`` (the paper's fraction). Note that weight
decay on ``diag`` pulls those singular values towards 0, not towards ``S_k``.
``stats["energy"]``: the fraction of ``‖W‖_F²`` in the adapter.
"""

from __future__ import annotations

from typing import Optional

from ..linalg.exact_svd import smallest_singular_triplets
from .base import InitMethod, LayerBatch, LayerInit, energy_fraction


class SiVA(InitMethod):
    """Adapter = the ``k`` smallest singular triplets of W; only the singular values train."""

    name = "siva"

    def __init__(self, perc: Optional[float] = None):
        if perc is not None and (isinstance(perc, bool) or not isinstance(perc, (int, float)) or not 0 < perc <= 1):
            raise ValueError(f"SiVA perc (fraction of singular values to train) must be in (0, 1], got {perc!r}")
        self.perc = perc

    def describe(self) -> str:
        return "siva" if self.perc is None else f"siva-perc{self.perc:g}"

    def n_values(self, out_features: int, in_features: int, rank: int) -> int:
        """``k``, the number of trained singular values of an ``(out, in)`` layer."""
        if self.perc is None:
            return rank
        return max(1, round(self.perc * min(out_features, in_features)))

    def init_batch(self, batch: LayerBatch) -> list[LayerInit]:
        weights, scale = batch.weights, batch.scale
        k = self.n_values(weights.shape[1], weights.shape[2], batch.rank)
        U, S, Vh = smallest_singular_triplets(weights, k)
        energy = energy_fraction(S, batch.squared_norms())
        return [
            LayerInit(
                A=Vh[i].float().contiguous(),
                B=U[i].float().contiguous(),
                scale=scale,
                diag=(S[i] / scale).float(),
                trainable=("diag",),
                stats={"energy": energy[i], "k": k},
            )
            for i in range(len(batch.names))
        ]
