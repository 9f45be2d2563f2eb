"""Asymmetric LoRA (Zhu et al., ICML 2024): a frozen random orthonormal ``A``, only ``B`` trains.

``A (r, in)`` has orthonormal rows (``A·Aᵀ = I_r``): the transposed Q factor of the QR of a
Gaussian ``(in, r)`` matrix, signs fixed by ``diag(R) > 0`` so it is Haar-distributed, computed in
fp64 and drawn from a generator seeded by ``(seed, layer name)``. ``B (out, r)`` starts at zero
and is the only trainable tensor (``A`` is a buffer: no gradient computed or stored for it);
the base weight is unchanged. Trainable parameters per layer: ``out·r``.
"""

from __future__ import annotations

import torch

from .lora import LoRA


def orthonormal_rows(rank: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``(rank, in_features)`` fp32 CPU matrix with orthonormal rows (``rank <= in``)."""
    gauss = torch.randn(in_features, rank, generator=generator, dtype=torch.float64)
    Q, R = torch.linalg.qr(gauss)
    signs = torch.sign(torch.diagonal(R))
    signs[signs == 0] = 1
    return (Q * signs).T.contiguous().float()


class Asymmetric(LoRA):
    """``ΔW = scale·B·A`` with ``A`` frozen random orthonormal rows and ``B = 0`` trained."""

    name = "asymmetric"
    trainable = ("B",)
    draw_A = staticmethod(orthonormal_rows)
