"""What an initialization method decides for a layer, and the interface every method implements.

A method sees a *batch* of same-shape layers at once (weights stacked ``(L, out, in)`` in fp32 on
their device, and their input covariances when it needs them) and returns one :class:`LayerInit`
per layer. The engine in :mod:`corda_kernels.decomposition` does the batching, memory bounds and
progress; the adapter module swap happens in :mod:`corda_kernels.adapt`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Optional, Sequence

import torch


@dataclass
class LayerInit:
    """Initial adapter of one layer (fp32 tensors on the layer's device).

    The adapted layer computes ``x·W'ᵀ + scale·scatter_rows((gather_cols(x)·Aᵀ ⊙ diag)·Bᵀ)`` where
    ``W' = W − scale·delta`` when ``subtract`` (CorDA, PiSSA, MiLoRA, SiVA: the adapter carries a
    part of W and the model is unchanged at init) and ``W' = W`` otherwise (LoRA-style, delta = 0).
    """

    A: torch.Tensor  # (r, n_cols)
    B: torch.Tensor  # (n_rows, r)
    scale: float
    subtract: bool = True
    diag: Optional[torch.Tensor] = None  # (r,)
    row_index: Optional[torch.Tensor] = None  # (n_rows,) int64 output features
    col_index: Optional[torch.Tensor] = None  # (n_cols,) int64 input features
    trainable: tuple[str, ...] = ("A", "B")
    stats: dict = field(default_factory=dict)  # e.g. {"energy": fraction of energy in the adapter}
    # The frozen base when decomposition already formed it (a quantized residual, refined with the
    # factors above); None: adapt forms ``W' = W − scale·delta`` (or keeps W) itself.
    residual: Optional[object] = None


class LayerCovariances(NamedTuple):
    """Input covariances of a batch of L layers, each distinct one stored once.

    ``unique (G, in, in)`` fp32 and ``index (L,)`` int64: layer ``i`` has covariance
    ``unique[index[i]]`` (q/k/v share one, gate/up share one).
    """

    unique: torch.Tensor
    index: torch.Tensor

    def diagonals(self) -> torch.Tensor:
        """``(L, in)``: each layer's covariance diagonal (per-channel mean square)."""
        return self.unique.diagonal(dim1=-2, dim2=-1)[self.index]


class LayerBatch(NamedTuple):
    """One call's work for a method: ``L`` same-shape layers decomposed together.

    ``weights (L, out, in)`` fp32 on the layers' device; ``covariances`` their
    :class:`LayerCovariances` (None unless the method ``needs_covariance``); ``rank`` and ``scale``
    (the LoRA scaling ``alpha / rank``) shared by the batch; ``names`` the layers' names, which with
    ``seed`` give each layer its own random stream (:meth:`layer_seeds`).
    """

    weights: torch.Tensor
    covariances: Optional[LayerCovariances]
    rank: int
    scale: float
    names: Sequence[str]
    seed: int

    def require_covariances(self, method: str, hint: str = "") -> LayerCovariances:
        """The batch's covariances; ValueError naming the method and the first layer when absent."""
        if self.covariances is None:
            raise ValueError(f"{method} needs the input covariance of {self.names[0]}{hint}")
        return self.covariances

    def layer_seeds(self) -> list[int]:
        """Each layer's :func:`layer_seed`, in order."""
        return [layer_seed(self.seed, n) for n in self.names]

    def squared_norms(self) -> torch.Tensor:
        """``(L,)``: each weight's squared Frobenius norm (the energy the adapter's share is of)."""
        return self.weights.square().sum((-2, -1))


class InitMethod(ABC):
    """Base class of initialization recipes; subclasses set ``name`` and implement ``init_batch``."""

    name: ClassVar[str] = ""
    needs_covariance: ClassVar[bool] = False
    subtracts: ClassVar[bool] = True

    def prepare(self, model, targets) -> None:  # noqa: B027 (an optional hook: no-op by default)
        """Model-level work before decomposition (e.g. Partial-LoRA's few-shot sparsity ratios).

        ``targets``: name -> module of the layers to adapt. Default: nothing.
        """

    @abstractmethod
    def init_batch(self, batch: LayerBatch) -> list[LayerInit]:
        """One :class:`LayerInit` per layer of ``batch``, in its order."""

    def describe(self) -> str:
        """The method as reports name it: ``name``, or ``name-mode`` for methods with modes."""
        mode = getattr(self, "mode", None)
        return f"{self.name}-{mode}" if mode else self.name


def split_singular_values(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, scale: float):
    """PEFT's factor split of ``U·diag(S)·Vh`` for a layer with LoRA scaling ``scale``.

    ``A = sqrt(S/scale)·Vh`` ``(…, r, in)`` and ``B = U·sqrt(S/scale)`` ``(…, out, r)``, so that
    ``scale·B·A = U·diag(S)·Vh``.
    """
    root = (S / scale).clamp_min(0).sqrt()
    return root.unsqueeze(-1) * Vh, U * root.unsqueeze(-2)


def component_inits(U, S, Vh, scale: float, total: torch.Tensor, **stats: list) -> list[LayerInit]:
    """One :class:`LayerInit` per matrix of a batch adapted with the components ``U·diag(S)·Vh``
    (``(L, out, r)``, ``(L, r)``, ``(L, r, in)``): PEFT's split (:func:`split_singular_values`),
    ``stats["energy"]`` the share ``Σ S² / total`` (``total (L,)``: squared Frobenius norms), and any
    further per-matrix ``stats`` lists."""
    A, B = split_singular_values(U, S, Vh, scale)
    energy = energy_fraction(S, total)
    # contiguous: Vh may be a transposed view (CorDA's V.mT), and A[i] would keep its strides
    return [
        LayerInit(
            A=A[i].contiguous(),
            B=B[i].contiguous(),
            scale=scale,
            stats={"energy": energy[i], **{k: v[i] for k, v in stats.items()}},
        )
        for i in range(A.shape[0])
    ]


def energy_fraction(S: torch.Tensor, total: torch.Tensor) -> list[float]:
    """Per-matrix ``Σ S² / total`` where ``total`` is the squared Frobenius norm of the matrix."""
    return (S.double().square().sum(-1) / total.double().clamp_min(1e-300)).tolist()


def layer_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one layer: hash of ``(seed, name)``. Randomized steps seeded this
    way give a layer the same result whichever other layers share its batch, process or block."""
    digest = hashlib.blake2b(f"{int(seed)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
