"""Process-group plumbing shared by the two sharded stages (``torch.distributed``).

Calibration (:mod:`corda_kernels.calibration.sharding`: data-parallel, sums all-reduced) and
decomposition (:mod:`corda_kernels.decomposition.sharding`: layers split by cost, factors
broadcast) run on every rank of a process group (``torchrun``: the default group, or any group
passed as ``process_group=``) with whatever backend it uses: NCCL (tensors on the rank's current
CUDA device; call ``torch.cuda.set_device(local_rank)`` first) or gloo (CPU). Every call is
collective: all ranks must make it, with the same model and options. A failure on one rank is
reported to every rank (:func:`collective_errors`) instead of leaving the others waiting.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist

# Collective buffers: row blocks of covariances, buckets of broadcast factors (bytes).
BUCKET_BYTES = 256 << 20


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
