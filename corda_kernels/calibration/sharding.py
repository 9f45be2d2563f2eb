"""Data-parallel calibration: each rank streams its shard of the data, the sums are all-reduced.

Each rank runs its share of the batches (:func:`shard_batches`) into its own fp32 upper-triangle
accumulators; :func:`all_reduce_accumulators` then sums them (the upper triangle only, row block by
row block) and the token counts, so every rank finalizes the same
:class:`~corda_kernels.calibration.Calibration`. Checkpoints go to ``checkpoint_dir/rank-<r>``: a
rank's state is the sum over its own shard, so ranks may stop at different batches and each resumes
from its own state; the world size and shard mode are part of the checkpoint identity.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from .. import distributed
from ..ops.covariance import CovarianceAccumulator

SHARD_MODES = ("stride", "local")


class _Strided:
    """Batches ``rank, rank + world, ...`` of a shared iterable, within its first ``limit`` batches."""

    def __init__(self, batches: Iterable, rank: int, world: int, limit: Optional[int]):
        self.batches, self.rank, self.world, self.limit = batches, rank, world, limit

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            if self.limit is not None and index >= self.limit:
                return
            if index % self.world == self.rank:
                yield batch


class _SizedStrided(_Strided):
    def __len__(self) -> int:
        total = len(self.batches) if self.limit is None else min(len(self.batches), self.limit)
        return len(range(self.rank, total, self.world))


def shard_batches(
    batches: Iterable, group: dist.ProcessGroup, shard: str, max_batches: Optional[int]
) -> tuple[Iterable, Optional[int]]:
    """This rank's calibration batches and the per-rank ``max_batches``.

    ``shard="stride"``: every rank iterates the same ``batches`` and keeps batches ``rank, rank +
    world, ...`` of its first ``max_batches`` (the union over ranks is exactly what one process
    would use; each rank still reads, not runs, the others' batches). ``shard="local"``: ``batches``
    is already this rank's shard (e.g. a DataLoader with a ``DistributedSampler``); ``max_batches``
    limits each rank.
    """
    if shard not in SHARD_MODES:
        raise ValueError(f"shard must be one of {SHARD_MODES}, got {shard!r}")
    if shard == "local":
        return batches, max_batches
    from torch.utils.data import DistributedSampler

    samplers = (getattr(batches, "sampler", None), getattr(getattr(batches, "batch_sampler", None), "sampler", None))
    if any(isinstance(s, DistributedSampler) for s in samplers):
        raise ValueError(
            "batches come from a DataLoader with a DistributedSampler, i.e. already sharded per rank; pass "
            "shard='local' (shard='stride' would keep only 1/world of this rank's shard)"
        )
    rank, world = distributed.rank_and_world(group)
    cls = _SizedStrided if hasattr(batches, "__len__") else _Strided
    return cls(batches, rank, world, max_batches), None


def rank_checkpoint_dir(checkpoint_dir: Optional[str], group: Optional[dist.ProcessGroup]) -> Optional[str]:
    """``checkpoint_dir/rank-<r>`` under a group (each rank checkpoints its own shard)."""
    if checkpoint_dir is None or group is None:
        return checkpoint_dir
    return os.path.join(checkpoint_dir, f"rank-{dist.get_rank(group)}")


def checkpoint_identity(group: Optional[dist.ProcessGroup], shard: str) -> dict:
    """What a rank's checkpoint must match besides model and targets: its place in the sharding."""
    if group is None:
        return {}
    rank, world = distributed.rank_and_world(group)
    return {"world_size": world, "rank": rank, "shard": shard}


def all_reduce_accumulators(
    groups: Mapping[str, str],
    accumulators: Mapping[str, CovarianceAccumulator],
    order: Sequence[str],
    new_accumulator: Callable[[str, int], CovarianceAccumulator],
    group: dist.ProcessGroup,
    batches: int,
    tokens: int,
) -> tuple[dict[str, str], dict[str, CovarianceAccumulator], int, int]:
    """Sum every rank's accumulators; returns the agreed ``(groups, accumulators, batches, tokens)``.

    ``groups``: layer -> group and ``accumulators``: group -> accumulator, as this rank streamed
    them. Ranks first agree on the layer -> group map and each group's size (a rank that saw no
    batch takes them from the others, with zero accumulators from ``new_accumulator(group, dim)``);
    then every ``(d, d)`` fp32 accumulator is all-reduced (sum; only the upper triangle when it is
    upper-only) and the token counts are summed exactly (int). Groups come in ``order`` (the target
    layers), the same on every rank whatever it saw or resumed.
    """
    local = {
        "groups": dict(groups),
        "dims": {g: acc.dim for g, acc in accumulators.items()},
        "counts": {g: acc.count for g, acc in accumulators.items()},
        "batches": batches,
        "tokens": tokens,
    }
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, local, group=group)
    groups: dict[str, str] = {}
    dims: dict[str, int] = {}
    for rank, info in enumerate(gathered):
        for name, group_name in info["groups"].items():
            if groups.setdefault(name, group_name) != group_name:
                raise RuntimeError(
                    f"ranks disagree on input sharing: layer {name} is in group {groups[name]} on one rank and "
                    f"{group_name} on rank {rank}; do all ranks run the same model?"
                )
        for group_name, dim in info["dims"].items():
            if dims.setdefault(group_name, dim) != dim:
                raise RuntimeError(f"ranks disagree on the input size of {group_name}: {dims[group_name]} vs {dim}")
    reduced = {}
    position = {name: i for i, name in enumerate(order)}
    for group_name in sorted(dims, key=position.__getitem__):
        acc = accumulators.get(group_name) or new_accumulator(group_name, dims[group_name])
        _all_reduce_upper_(acc.cov, group, upper_only=acc.upper_only)
        acc.count = sum(info["counts"].get(group_name, 0) for info in gathered)
        reduced[group_name] = acc
    agreed = {name: groups[name] for name in sorted(groups, key=position.__getitem__)}
    return agreed, reduced, sum(info["batches"] for info in gathered), sum(info["tokens"] for info in gathered)


def _all_reduce_upper_(cov: torch.Tensor, group: dist.ProcessGroup, *, upper_only: bool) -> None:
    """Sum ``cov`` ``(d, d)`` over ranks in place, in row blocks; with ``upper_only`` each block
    ``[i0:i1, i0:]`` stops at the diagonal (about half the traffic; the strict lower triangle is
    mirrored from the upper one at finalization)."""
    d = cov.shape[0]
    device = distributed.comm_device(group, cov.device)
    rows = max(1, min(d, distributed.BUCKET_BYTES // (cov.element_size() * max(d, 1))))
    if upper_only:
        rows = min(rows, max(128, -(-d // 8)))  # at least 8 blocks on large matrices
    for i0 in range(0, d, rows):
        block = cov[i0 : i0 + rows, i0:] if upper_only else cov[i0 : i0 + rows]
        in_place = block.device == device and block.is_contiguous()
        buffer = block if in_place else block.to(device, memory_format=torch.contiguous_format, copy=True)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        if buffer is not block:
            block.copy_(buffer)
