"""PiSSA and MiLoRA: adapters from the plain SVD of W (PEFT ``init_lora_weights="pissa"``).

PiSSA puts the largest r singular triplets of W in the adapter: randomized SVD (default),
``svd="exact"`` (a full SVD, cropped), or ``svd="top"`` (:func:`~corda_kernels.linalg.top_singular_triplets`:
the top r to an fp32 SVD's accuracy without a full SVD, which is PEFT's ``"pissa"`` contract); MiLoRA
the smallest r (an exact method). Factors: ``A = sqrt(S/scale)·Vh_r``, ``B = U_r·sqrt(S/scale)``,
residual ``W − scale·B·A``. ``stats["energy"]`` is the fraction of ``‖W‖_F²`` held by the adapter.
"""

from __future__ import annotations

from ..linalg.exact_svd import largest_singular_triplets, smallest_singular_triplets
from ..linalg.randomized_svd import randomized_svd
from ..linalg.top_svd import top_singular_triplets
from .base import InitMethod, LayerBatch, LayerInit, component_inits

SOLVERS = ("randomized", "exact", "top")


class _SVDInit(InitMethod):
    largest: bool = True

    def __init__(self, svd: str = "randomized"):
        if svd not in SOLVERS:
            raise ValueError(f"svd must be 'randomized', 'exact' or 'top', got {svd!r}")
        self.svd = svd

    def init_batch(self, batch: LayerBatch) -> list[LayerInit]:
        weights, rank = batch.weights, batch.rank
        if not self.largest:
            U, S, Vh = smallest_singular_triplets(weights, rank)
        elif self.svd == "exact":
            U, S, Vh = largest_singular_triplets(weights, rank)
        elif self.svd == "top":
            U, S, Vh = top_singular_triplets(weights, rank)
        else:
            U, S, Vh = randomized_svd(weights, rank, seed=batch.layer_seeds())
        return component_inits(U, S, Vh, batch.scale, batch.squared_norms())


class PiSSA(_SVDInit):
    name = "pissa"
    largest = True


class MiLoRA(_SVDInit):
    name = "milora"
    largest = False

    def __init__(self):
        super().__init__(svd="exact")
