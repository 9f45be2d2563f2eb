"""Layer-sharded decomposition: the layers are split across ranks by cost, the factors broadcast.

:func:`assign_layers` splits the layers by estimated cost, each rank decomposes its share and
:func:`broadcast_inits` sends every ``LayerInit`` (tensors bit for bit, scale, stats ...) from its
owner to all ranks, so every rank builds the same adapters.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Mapping

import torch
import torch.distributed as dist

from .. import distributed


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


def broadcast_inits(local: Mapping, owners: Mapping[str, int], devices: Mapping[str, torch.device], group):
    """Every rank's ``{name: LayerInit}`` from each layer's owner.

    ``local``: the inits (``LayerInit`` dataclasses) this rank owns; ``owners``: name -> owner
    (group rank), the same on every rank; ``devices``: where this rank keeps each layer's tensors.
    Non-tensor fields travel as
    objects; tensors are packed per owner into flat buffers of one dtype (at most ``BUCKET_BYTES``
    each, one tensor may exceed it) and broadcast, so the copies are bit-identical; every rank's
    tensors are contiguous (same strides everywhere, as DDP requires of parameters).
    """
    rank, world = distributed.rank_and_world(group)
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
        slots = [
            (name, key, *spec)
            for name in owners
            if owners[name] == owner
            for key, spec in meta[name]["tensors"].items()
        ]
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
        if not buckets or buckets[-1][0][3] != dtype or size + nbytes > distributed.BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(slot)
        size += nbytes
    return buckets


def _broadcast_bucket(bucket, owner: int, local, devices, received, group) -> None:
    rank = dist.get_rank(group)
    device = distributed.comm_device(group, devices[bucket[0][0]])
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
