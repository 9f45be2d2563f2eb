"""Many GPUs, many machines: data-parallel calibration and layer-sharded decomposition.

Both stages run on every rank of a ``torch.distributed`` process group (``torchrun``: the default
group, or any group passed as ``process_group=``) with whatever backend it uses: NCCL (tensors on
the rank's current CUDA device; call ``torch.cuda.set_device(local_rank)`` first) or gloo (CPU).
Every call is collective: all ranks of the group must make it, with the same model and options.

- Calibration (:func:`corda_kernels.calibrate`): each rank streams its shard of the data
  (:func:`shard_batches`) into its own fp32 upper-triangle accumulators; :func:`all_reduce_recorder`
  then sums the accumulators (the upper triangle only, row block by row block) and the token
  counts, so every rank finalizes the same :class:`~corda_kernels.calibrate.Calibration`.
  Checkpoints go to ``checkpoint_dir/rank-<r>``: a rank's state is the sum over its own shard, so
  ranks may stop at different batches and each resumes from its own state; the world size and
  shard mode are part of the checkpoint identity (another world size is refused).
- Decomposition (:func:`corda_kernels.decompose.decompose`, ``apply``): :func:`assign_layers`
  splits the layers by estimated cost, each rank decomposes its share and :func:`broadcast_inits`
  sends every ``LayerInit`` (tensors bit for bit, scale, stats ...) from its owner to all ranks.

A failure on one rank (bad data, out of memory, a refused checkpoint) is reported to every rank
(:func:`collective_errors`) instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import fields, replace
from typing import Iterable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from .integrations import hf
from .ops.covariance import CovarianceAccumulator

SHARD_MODES = ("stride", "local")
# Collective buffers: row blocks of covariances, buckets of broadcast factors (bytes).
BUCKET_BYTES = 256 << 20


# -- groups and devices ------------------------------------------------------------------------
def resolve_group(process_group=None) -> Optional[dist.ProcessGroup]:
    """The group to work over, or None for a single process.

    ``process_group``: None -> the default group when ``torch.distributed`` is initialized (plain
    single process otherwise); False -> single process even under ``torchrun``; a ``ProcessGroup``
    -> that group. A group of one rank is a single process.
    """
    if process_group is False:
        return None
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        process_group = dist.group.WORLD
    elif not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group was given but torch.distributed is not initialized (init_process_group)")
    if dist.get_rank(process_group) < 0:
        raise ValueError("this process is not a member of process_group; only its members may call this")
    return process_group if dist.get_world_size(process_group) > 1 else None


def rank_and_world(group: dist.ProcessGroup) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


def comm_device(group: dist.ProcessGroup, device: torch.device) -> torch.device:
    """Where a tensor living on ``device`` is communicated: its own device type when the group has
    a backend for it (``get_backend_config``: ``cpu:gloo``, ``cuda:nccl`` ...), else the first one
    the group has; an accelerator means this process's current device (NCCL: one GPU per rank)."""
    types = [item.split(":")[0] for item in dist.get_backend_config(group).split(",")]
    kind = device.type if device.type in types else types[0]
    if kind == "cpu":
        return torch.device("cpu")
    return torch.device(kind, getattr(torch, kind).current_device())


@contextlib.contextmanager
def collective_errors(group: Optional[dist.ProcessGroup], what: str) -> Iterator[None]:
    """Run a rank's local work so that a failure on any rank fails all of them.

    On exit every rank exchanges its status: the failing rank re-raises its exception, the others
    raise ``RuntimeError`` naming the rank and its error. (A rank killed outright cannot report;
    ``torchrun`` then stops the others.) No-op when ``group`` is None.
    """
    if group is None:
        yield
        return
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(Exception):  # the original error matters more than a broken exchange
            _exchange_status(group, f"{type(exc).__name__}: {exc}", what)
        raise
    _exchange_status(group, None, what)


def _exchange_status(group: dist.ProcessGroup, error: Optional[str], what: str) -> None:
    statuses: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(statuses, error, group=group)
    failed = [(rank, message) for rank, message in enumerate(statuses) if message is not None]
    if failed and error is None:
        rank, message = failed[0]
        raise RuntimeError(f"{what} failed on rank {rank} of the process group: {message}")


# -- calibration -------------------------------------------------------------------------------
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
    rank, world = rank_and_world(group)
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
    rank, world = rank_and_world(group)
    return {"world_size": world, "rank": rank, "shard": shard}


def all_reduce_recorder(recorder, group: dist.ProcessGroup, batches: int, tokens: int) -> tuple[int, int]:
    """Sum every rank's accumulators into every rank's ``recorder``; returns total (batches, tokens).

    ``recorder`` is a :class:`~corda_kernels.calibrate.CovarianceRecorder` after streaming. Ranks
    first agree on the layer -> group map and each group's size (a rank that saw no batch takes
    them from the others, with zero accumulators on the layer's device); then every ``(d, d)``
    fp32 accumulator is all-reduced (sum; only the upper triangle when it is upper-only) and the
    token counts are summed exactly (int). Groups are put in the order of ``recorder.targets``,
    the same on every rank whatever it saw or resumed.
    """
    local = {
        "groups": recorder.groups,
        "dims": {g: acc.dim for g, acc in recorder.accumulators.items()},
        "counts": {g: acc.count for g, acc in recorder.accumulators.items()},
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
    accumulators = {}
    position = {name: i for i, name in enumerate(recorder.targets)}
    for group_name in sorted(dims, key=position.__getitem__):
        dim = dims[group_name]
        acc = recorder.accumulators.get(group_name)
        if acc is None:
            device = recorder.targets[group_name].weight.device
            acc = CovarianceAccumulator(dim, device=device, upper_only=recorder.upper_only, name=group_name)
        _all_reduce_upper_(acc.cov, group, upper_only=acc.upper_only)
        acc.count = sum(info["counts"].get(group_name, 0) for info in gathered)
        accumulators[group_name] = acc
    recorder.groups = {name: groups[name] for name in sorted(groups, key=position.__getitem__)}
    recorder.accumulators = accumulators
    return sum(info["batches"] for info in gathered), sum(info["tokens"] for info in gathered)


def _all_reduce_upper_(cov: torch.Tensor, group: dist.ProcessGroup, *, upper_only: bool) -> None:
    """Sum ``cov`` ``(d, d)`` over ranks in place, in row blocks; with ``upper_only`` each block
    ``[i0:i1, i0:]`` stops at the diagonal (about half the traffic; the strict lower triangle is
    mirrored from the upper one at finalization)."""
    d = cov.shape[0]
    device = comm_device(group, cov.device)
    rows = max(1, min(d, BUCKET_BYTES // (cov.element_size() * max(d, 1))))
    if upper_only:
        rows = min(rows, max(128, -(-d // 8)))  # at least 8 blocks on large matrices
    for i0 in range(0, d, rows):
        block = cov[i0 : i0 + rows, i0:] if upper_only else cov[i0 : i0 + rows]
        in_place = block.device == device and block.is_contiguous()
        buffer = block if in_place else block.to(device, memory_format=torch.contiguous_format, copy=True)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        if buffer is not block:
            block.copy_(buffer)


# -- decomposition -----------------------------------------------------------------------------
def layer_cost(out_features: int, in_features: int, with_covariance: bool) -> int:
    """Estimated work of one layer: an SVD of ``(out, in)`` (``out·in·min``) plus, with a
    covariance, its Cholesky/inverse and product with W (``in³ + out·in²``)."""
    cost = out_features * in_features * min(out_features, in_features)
    if with_covariance:
        cost += in_features**3 + out_features * in_features**2
    return cost


def assign_layers(costs: Mapping[str, int], world: int) -> dict[str, int]:
    """Layer -> owner rank: heaviest first, each to the least-loaded rank (ties: lowest rank, then
    the given order), so the ranks' totals are within one layer's cost of each other."""
    order = {name: i for i, name in enumerate(costs)}
    load = [0] * world
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], order[n])):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += costs[name]
    return owners


def decompose_sharded(targets: Mapping[str, nn.Module], method, group: dist.ProcessGroup, *, progress: bool, **options):
    """:func:`corda_kernels.decompose.decompose` with the layers split across ``group``; every rank
    returns every layer's ``LayerInit`` (in ``targets`` order)."""
    from . import decompose as _decompose  # imports this module

    rank, world = rank_and_world(group)
    costs = {}
    for name, module in targets.items():
        in_f, out_f = hf.in_out_features(module)
        costs[name] = layer_cost(out_f, in_f, method.needs_covariance)
    owners = assign_layers(costs, world)
    mine = {name: module for name, module in targets.items() if owners[name] == rank}
    with collective_errors(group, f"decompose ({method.describe()})"):
        local = _decompose.decompose(mine, method, process_group=False, progress=progress and rank == 0, **options)
    devices = {name: hf.weight_matrix(module).device for name, module in targets.items()}
    return broadcast_inits(local, owners, devices, group)


def broadcast_inits(local: Mapping, owners: Mapping[str, int], devices: Mapping[str, torch.device], group):
    """Every rank's ``{name: LayerInit}`` from each layer's owner.

    ``local``: the inits (``LayerInit`` dataclasses) this rank owns; ``owners``: name -> owner (group rank), the same on every
    rank; ``devices``: where this rank keeps each layer's tensors. Non-tensor fields travel as
    objects; tensors are packed per owner into flat buffers of one dtype (at most ``BUCKET_BYTES``
    each, one tensor may exceed it) and broadcast, so the copies are bit-identical; every rank's
    tensors are contiguous (same strides everywhere, as DDP requires of parameters).
    """
    rank, world = rank_and_world(group)
    meta_local = {}
    for name, init in local.items():
        values = {f.name: getattr(init, f.name) for f in fields(init)}
        meta_local[name] = {
            "cls": type(init),
            "tensors": {k: (tuple(v.shape), v.dtype) for k, v in values.items() if isinstance(v, torch.Tensor)},
            "values": {k: v for k, v in values.items() if not isinstance(v, torch.Tensor)},
        }
    gathered: list = [None] * world
    dist.all_gather_object(gathered, meta_local, group=group)
    meta = {name: info for per_rank in gathered for name, info in per_rank.items()}
    missing = [name for name in owners if name not in meta]
    if missing:
        raise RuntimeError(f"no rank returned an adapter for layers {missing[:5]}")
    received: dict[str, dict[str, torch.Tensor]] = {name: {} for name in owners}
    for owner in range(world):
        slots = [(name, key, *spec) for name in owners if owners[name] == owner for key, spec in meta[name]["tensors"].items()]
        for bucket in _buckets(slots):
            _broadcast_bucket(bucket, owner, local, devices, received, group)
    result = {}
    for name in owners:
        if owners[name] == rank:
            init = local[name]
            result[name] = replace(init, **{k: getattr(init, k).contiguous() for k in meta[name]["tensors"]})
        else:
            result[name] = meta[name]["cls"](**meta[name]["values"], **received[name])
    return result


def _buckets(slots: list) -> list[list]:
    """Consecutive slots ``(name, field, shape, dtype)`` grouped by dtype up to ``BUCKET_BYTES``."""
    buckets: list[list] = []
    size = 0
    for slot in slots:
        dtype = slot[3]
        nbytes = torch.Size(slot[2]).numel() * dtype.itemsize
        if not buckets or buckets[-1][0][3] != dtype or size + nbytes > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(slot)
        size += nbytes
    return buckets


def _broadcast_bucket(bucket, owner: int, local, devices, received, group) -> None:
    rank = dist.get_rank(group)
    device = comm_device(group, devices[bucket[0][0]])
    dtype = bucket[0][3]
    if rank == owner:
        flat = torch.cat([getattr(local[name], key).detach().reshape(-1).to(device) for name, key, _, _ in bucket])
    else:
        flat = torch.empty(sum(torch.Size(shape).numel() for _, _, shape, _ in bucket), dtype=dtype, device=device)
    dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group)
    if rank == owner:
        return
    offset = 0
    for name, key, shape, _ in bucket:
        n = torch.Size(shape).numel()
        received[name][key] = flat[offset : offset + n].view(shape).to(devices[name], copy=True)
        offset += n
