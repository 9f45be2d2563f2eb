"""Stage 2, decompose: run an initialization method over all target layers, in one top-down pass.

plan (each layer's rank and scaling) -> shard (which layers this rank owns, under a process group)
-> read the cache -> run the rest in batches of same-shape layers under a memory bound -> write the
cache -> broadcast every layer's factors from its owner. A chunk that runs out of GPU memory is
retried in halves; a single layer that still does not fit raises with the layer named. Nothing in
the model is modified here: the result is a ``{name: LayerInit}`` map of small factors.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..methods.base import InitMethod, LayerBatch, LayerInit
from . import plan, sharding
from .cache import DecompositionCache


def decompose(
    targets: Mapping[str, nn.Module],
    method: InitMethod,
    *,
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    use_rslora: bool = False,
    covariances=None,
    seed: int = 0,
    max_batch_bytes: Optional[int] = None,
    progress: bool = True,
    process_group=None,
    cache_dir: Optional[str] = None,
    settings: Optional[Mapping] = None,
) -> dict[str, LayerInit]:
    """Initial adapters of every target layer, without touching the model.

    :func:`corda_kernels.apply` runs this for you; call it directly to inspect or cache factors.
    Layers of one shape and rank are decomposed as a batch under a memory bound (a chunk that runs
    out of memory is retried in halves); randomized steps are seeded per layer, so a layer's
    result does not depend on its batch.

    Args:
        targets: layer name -> ``nn.Linear`` / ``Conv1D``.
        method: the initialization recipe, an :class:`~corda_kernels.methods.InitMethod`
            (``corda_kernels.methods.make_method("corda", mode="ipa")``) after its ``prepare``.
        ranks: layer name -> adapter rank ``r``.
        alphas: layer name -> LoRA alpha (scaling ``alpha / r``, or ``alpha / sqrt(r)`` with
            ``use_rslora``).
        use_rslora: rank-stabilized scaling, as PEFT's ``use_rslora``.
        covariances: a :class:`~corda_kernels.Calibration` (or ``{name: C}``) when the method
            needs input covariances (CorDA).
        seed: seed of randomized decompositions and random initializations.
        max_batch_bytes: working-set bound per chunk (default: a quarter of free GPU memory, 2 GiB
            on CPU).
        progress: show a tqdm bar over layers.
        process_group: split the layers across a ``torch.distributed`` group, balanced by cost, and
            broadcast each result from its owner (:mod:`corda_kernels.decomposition.sharding`): by
            default the default group when ``torch.distributed`` is initialized (every rank must
            call), a ``ProcessGroup``, or False for one process. Every rank returns every layer.
        cache_dir: keep each layer's init there (:mod:`corda_kernels.decomposition.cache`): a layer
            whose method, options, rank, scaling, seed, name, weights and covariance are unchanged
            is read back instead of decomposed; with a process group each rank caches its layers.
        settings: what asked for these decompositions (``apply`` passes its
            :meth:`AdaptConfig.to_dict() <corda_kernels.AdaptConfig.to_dict>`), recorded in every
            cache entry's manifest (not part of its key).

    Returns:
        ``{name: LayerInit}`` in ``targets``' order: fp32 factors ``A (r, n_cols)``,
        ``B (n_rows, r)``, optional ``diag``/index sets, the scale, and whether the residual
        ``W − scale·B·A`` replaces the weight.

    Raises:
        ValueError: the method needs covariances and none were given; a rank is not a positive
            int or exceeds a layer's smaller dimension; an alpha is not positive and finite; a
            covariance does not fit its layer (collected on another model), is all zero, or cannot
            be damped into a positive definite matrix.
        TypeError: an alpha is not a number.
        KeyError: ``covariances`` has no entry for a target.
        FloatingPointError: a weight or covariance holds NaN or Inf.
        RuntimeError: a single layer does not fit in memory, or the decomposition failed on another
            rank of ``process_group``.
    """
    if method.needs_covariance and covariances is None:
        raise ValueError(
            f"method {method.describe()} needs input covariances: pass covariances=calibrate(model, batches)"
        )
    jobs = plan.plan_layers(targets, ranks, alphas, use_rslora)
    group = distributed.resolve_group(process_group)
    owners, mine = None, jobs
    if group is not None:
        rank, world = distributed.rank_and_world(group)
        costs = {name: sharding.layer_cost(*job.weight.shape, method.needs_covariance) for name, job in jobs.items()}
        owners = sharding.assign_layers(costs, world)
        mine = {name: job for name, job in jobs.items() if owners[name] == rank}
        progress = progress and rank == 0
    with distributed.collective_errors(group, f"decompose ({method.describe()})"):
        cache = DecompositionCache(cache_dir, method, seed, covariances, settings) if cache_dir is not None else None
        results = cache.read(mine) if cache is not None else {}
        todo = {name: job for name, job in mine.items() if name not in results}
        fresh = run(todo, method, covariances, seed, max_batch_bytes, progress)
        if cache is not None:
            cache.write(todo, fresh)
        results.update(fresh)
    if group is not None:
        devices = {name: job.weight.device for name, job in jobs.items()}
        results = sharding.broadcast_inits(results, owners, devices, group)
    return {name: results[name] for name in targets}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run(
    jobs: Mapping[str, plan.LayerJob],
    method: InitMethod,
    covariances,
    seed: int,
    max_batch_bytes: Optional[int],
    progress: bool,
) -> dict[str, LayerInit]:
    """Decompose ``jobs`` batched by shape, each batch in chunks under the memory budget."""
    results: dict[str, LayerInit] = {}
    if not jobs:
        return results
    bar = tqdm(total=len(jobs), desc=f"decompose ({method.describe()})", unit="layer", disable=not progress)
    try:
        for (shape, rank, scale, device), names in plan.bucket_layers(jobs).items():
            chunk = plan.chunk_layers(*shape, method.needs_covariance, plan.budget(device, max_batch_bytes))
            start = 0
            while start < len(names):
                part = names[start : start + chunk]
                try:
                    inits = _run_chunk(jobs, method, part, rank, scale, covariances, seed)
                except Exception as exc:
                    if not _is_oom(exc):
                        raise
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if chunk == 1:
                        raise RuntimeError(
                            f"out of memory decomposing layer {part[0]} ({shape[0]}x{shape[1]}, rank {rank}) "
                            f"on {device} "
                            "even on its own; free memory on that device or move the model to a larger one"
                        ) from exc
                    chunk = max(1, chunk // 2)
                    continue
                results.update(zip(part, inits))
                start += len(part)
                bar.update(len(part))
    finally:
        bar.close()
    return results


@torch.no_grad()
def _run_chunk(jobs, method: InitMethod, names, rank, scale, covariances, seed) -> list[LayerInit]:
    weights = torch.stack([jobs[n].weight.detach().float() for n in names])
    covs = None
    if method.needs_covariance:
        covs = plan.layer_covariances(covariances, names, weights.shape[-1], weights.device)
    return method.init_batch(LayerBatch(weights, covs, rank, scale, names, seed))
