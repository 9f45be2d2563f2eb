"""What decomposition will do, before doing it: each layer's job, the batches of layers decomposed
together, how many fit in memory, and the covariances each batch reads.

Layers with the same weight shape, rank, scaling and device are stacked and decomposed together
(one batched randomized SVD / eigensolver call instead of one per layer), in chunks whose working
set stays under a byte budget.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from typing import Mapping, NamedTuple, Optional

import torch
from torch import nn

from ..integrations import hf
from ..methods.base import LayerCovariances

# Default working-set bound per chunk: this fraction of free GPU memory, or this many bytes on CPU.
GPU_FRACTION = 0.25
CPU_BYTES = 2 << 30


class LayerJob(NamedTuple):
    """One layer to decompose: its module, rank and LoRA scaling."""

    module: nn.Module
    rank: int
    scale: float

    @property
    def weight(self) -> torch.Tensor:
        return hf.weight_matrix(self.module)


def scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """LoRA scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), as PEFT defines it."""
    return alpha / (rank**0.5 if use_rslora else rank)


def check_rank(name: str, module: nn.Module, rank: int) -> None:
    in_f, out_f = hf.in_out_features(module)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r} for layer {name}")
    if rank > min(in_f, out_f):
        raise ValueError(
            f"rank {rank} exceeds layer {name}'s smaller dimension ({out_f}x{in_f}); use rank <= {min(in_f, out_f)} "
            "or a rank_pattern for that layer"
        )


def check_alpha(name: str, alpha, option: str = "alpha") -> None:
    """Refuse a LoRA alpha that gives no usable adapter: 0 (infinite factors: ``sqrt(S/scale)``),
    negative (factors clamped to 0: nothing to train), NaN or infinite, or not a number.
    ``option`` names where the value came from (``alpha`` or ``alpha_pattern``)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{option} must be a positive number, got {type(alpha).__name__} {alpha!r} for layer {name}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(
            f"{option} must be a positive finite number (the LoRA scaling is alpha / rank), got {alpha} for layer "
            f"{name}"
        )


def plan_layers(
    targets: Mapping[str, nn.Module], ranks: Mapping[str, int], alphas: Mapping[str, float], use_rslora: bool = False
) -> dict[str, LayerJob]:
    """Every target's :class:`LayerJob` (ranks checked against the layer's shape)."""
    jobs = {}
    for name, module in targets.items():
        check_rank(name, module, ranks[name])
        check_alpha(name, alphas[name])
        jobs[name] = LayerJob(module, ranks[name], scaling(alphas[name], ranks[name], use_rslora))
    return jobs


def bucket_layers(jobs: Mapping[str, LayerJob]) -> dict[tuple, list[str]]:
    """``(shape, rank, scale, device) -> names``: the layers one batched call can decompose."""
    buckets: dict[tuple, list[str]] = defaultdict(list)
    for name, job in jobs.items():
        w = job.weight
        buckets[(tuple(w.shape), job.rank, job.scale, w.device)].append(name)
    return buckets


def bytes_per_layer(out_f: int, in_f: int, with_cov: bool) -> int:
    """Working set of one ``(out_f, in_f)`` layer in a chunk (bytes; fp32 words fitted to peak RSS
    measured on CPU, ``tests/test_memory.py``): with a covariance (CorDA: the stacked W, W·C_d and
    its fp64 copies (the energy; kpa's solver), the stacked C and C_d, which the fp64 Cholesky
    factor replaces after the solver) ``5·out·in + 3·in²``, between ipa's and kpa's; without (the
    SVD of W; MiLoRA's fp64 Gram) ``6·out·in + 4·min(out, in)²``. (With a covariance it was
    ``6·out·in + 8·in²``, plus ``2·in²`` per chunk, while the damping kept an fp32 factor and built
    identity matrices, the solves copied the factor and both factors were alive during the solver.)"""
    if with_cov:
        return 4 * (5 * out_f * in_f + 3 * in_f * in_f)
    return 4 * (6 * out_f * in_f + 4 * min(out_f, in_f) ** 2)


def bytes_per_chunk(out_f: int, in_f: int, with_cov: bool) -> int:
    """Per-chunk extras (bytes): an unpacked covariance in flight (``in²``)."""
    return 4 * in_f * in_f if with_cov else 0


def chunk_layers(out_f: int, in_f: int, with_cov: bool, budget: int) -> int:
    """How many ``(out_f, in_f)`` layers one decomposition chunk holds under ``budget`` bytes (>= 1)."""
    return max(1, (budget - bytes_per_chunk(out_f, in_f, with_cov)) // bytes_per_layer(out_f, in_f, with_cov))


def budget(device: torch.device, max_batch_bytes: Optional[int]) -> int:
    """The chunk budget on ``device``: ``max_batch_bytes``, or a share of free GPU memory / CPU_BYTES."""
    if max_batch_bytes is not None:
        return max_batch_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_FRACTION)
    return CPU_BYTES


def covariance_for(covariances, name: str) -> torch.Tensor:
    """Layer ``name``'s full covariance from a Calibration or a ``{name: C}`` mapping."""
    if isinstance(covariances, Mapping):
        if name not in covariances:
            raise KeyError(f"no covariance for layer {name!r}; covariances has {hf.named(covariances)}")
        return covariances[name]
    return covariances.covariance(name)


def layer_covariances(covariances, names, in_features: int, device) -> LayerCovariances:
    """The layers' covariances as fp32 on ``device``, each shared one stored (and so damped) once:
    layers of one calibration group (q/k/v, gate/up), or for a plain ``{name: C}`` mapping layers
    given the same tensor. Packed / offloaded covariances are expanded one at a time."""
    grouped = hasattr(covariances, "group")
    firsts: dict = {}  # shared input -> (slot, first layer, its tensor when already fetched)
    index = []
    for name in names:
        c = None
        if grouped:
            key = covariances.group(name)
        else:
            c = covariance_for(covariances, name)
            key = id(c)
        if key not in firsts:
            firsts[key] = (len(firsts), name, c)
        index.append(firsts[key][0])
    stacked = torch.empty(len(firsts), in_features, in_features, dtype=torch.float32, device=device)
    for slot, name, c in firsts.values():
        c = covariances.covariance(name, device) if c is None else c
        if tuple(c.shape) != (in_features, in_features):
            raise ValueError(
                f"covariance of {name} is {tuple(c.shape[-2:])} but the layer has {in_features} input features; "
                "were the covariances collected on another model?"
            )
        stacked[slot].copy_(c)
    return LayerCovariances(stacked, torch.tensor(index, dtype=torch.int64, device=device))
