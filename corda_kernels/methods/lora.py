"""Plain LoRA with PEFT's default initialization (``init_lora_weights=True``).

``A (r, in)`` is drawn as PEFT's ``reset_lora_parameters`` does, ``kaiming_uniform_(A, a=√5)``,
i.e. ``U(−1/√in, 1/√in)``; ``B (out, r)`` is zero; the base weight is left as it is
(``subtract=False``), so the adapted model equals the original at init. Draws come from a
generator seeded by ``(seed, layer name)`` (:func:`layer_generator`), so a layer's factors do
not depend on which other layers are adapted or on the global RNG state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import InitMethod, LayerBatch, LayerInit, layer_seed


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded by :func:`~corda_kernels.methods.base.layer_seed`."""
    return torch.Generator().manual_seed(layer_seed(seed, name))


def kaiming_A(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's default LoRA ``A``: ``(rank, in_features)`` fp32 on CPU, ``kaiming_uniform_(a=√5)``."""
    A = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    return A


class LoRA(InitMethod):
    """``ΔW = scale·B·A`` with ``A`` Kaiming-uniform and ``B = 0``; both trained.

    Subclasses that keep ``B = 0`` and the base weight change ``draw_A`` (``(rank, in_features,
    generator) -> (rank, in_features)`` fp32 CPU) and ``trainable``."""

    name = "lora"
    subtracts = False
    trainable: tuple[str, ...] = ("A", "B")
    draw_A = staticmethod(kaiming_A)

    def init_batch(self, batch: LayerBatch) -> list[LayerInit]:
        weights, _, rank, scale, names, seed = batch
        _, out_f, in_f = weights.shape
        return [
            LayerInit(
                A=self.draw_A(rank, in_f, layer_generator(seed, name)).to(weights.device),
                B=weights.new_zeros(out_f, rank),
                scale=scale,
                subtract=False,
                trainable=self.trainable,
            )
            for name in names
        ]
