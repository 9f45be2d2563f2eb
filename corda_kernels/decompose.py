"""Stage 2, decompose: run an initialization method over all target layers, batched and bounded.

Layers with the same weight shape, rank and device are stacked and decomposed together (one
batched randomized SVD / eigensolver call instead of one per layer), in chunks whose working set
stays under ``max_batch_bytes``. A chunk that runs out of GPU memory is retried in halves; a single
layer that still does not fit raises with the layer named. Nothing in the model is modified here:
the result is a ``{name: LayerInit}`` map of small factors.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .integrations import hf
from .methods.base import InitMethod, LayerCovariances, LayerInit

# Default working-set bound per chunk: this fraction of free GPU memory, or this many bytes on CPU.
GPU_FRACTION = 0.25
CPU_BYTES = 2 << 30


def _bytes_per_layer(out_f: int, in_f: int, with_cov: bool) -> int:
    """Working set of one layer in a chunk (bytes), from peak RSS measured on CPU (fp32, rank 8,
    chunks of 1 and 4 layers of 1024x2816, 2816x1024, 1024x1024, 256x1024; 2026-11 build).

    With a covariance (CorDA), ``init_batch`` itself (damp_covariance's fp32 C_d, fp32 and fp64
    Cholesky factors and fp64 C_d, the per-layer copies of C_d and its factor, W·C_d) measured
    3.6-4.8·out·in + 6.7·in² fp32 words (ipa / kpa); with the stacked W and C, 6·out·in + 8·in²
    here. Without one, the SVD of W: PiSSA 1.7-2.4·out·in, MiLoRA's exact bottom-r (fp64 Gram)
    5·out·in + 3.2·min(out, in)²; with the stacked W, 6·out·in + 4·min² here. A chunk also
    allocates :func:`_bytes_per_chunk` once.
    """
    if with_cov:
        return 4 * (6 * out_f * in_f + 8 * in_f * in_f)
    return 4 * (6 * out_f * in_f + 4 * min(out_f, in_f) ** 2)


def _bytes_per_chunk(out_f: int, in_f: int, with_cov: bool) -> int:
    """Per-chunk extras (bytes): identity matrices and an unpacked covariance in flight (2·in²)."""
    return 4 * 2 * in_f * in_f if with_cov else 0


def chunk_layers(out_f: int, in_f: int, with_cov: bool, budget: int) -> int:
    """How many ``(out_f, in_f)`` layers one decomposition chunk holds under ``budget`` bytes (>= 1)."""
    return max(1, (budget - _bytes_per_chunk(out_f, in_f, with_cov)) // _bytes_per_layer(out_f, in_f, with_cov))


def _budget(device: torch.device, max_batch_bytes: Optional[int]) -> int:
    if max_batch_bytes is not None:
        return max_batch_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_FRACTION)
    return CPU_BYTES


def scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """LoRA scaling: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), as PEFT defines it."""
    return alpha / (rank**0.5 if use_rslora else rank)


def check_rank(name: str, module: nn.Module, rank: int) -> None:
    in_f, out_f = hf.in_out_features(module)
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r} for layer {name}")
    if rank > min(in_f, out_f):
        raise ValueError(
            f"rank {rank} exceeds layer {name}'s smaller dimension ({out_f}x{in_f}); use rank <= {min(in_f, out_f)} "
            "or a rank_pattern for that layer"
        )


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


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
) -> dict[str, LayerInit]:
    """Initial adapters of every target layer.

    Args:
        targets: name -> linear-like module.
        method: the initialization recipe.
        ranks, alphas: per-layer rank and LoRA alpha.
        covariances: a :class:`~corda_kernels.calibrate.Calibration` (or ``{name: C}``) when the
            method needs input covariances.
        max_batch_bytes: working-set bound per chunk (default: a quarter of free GPU memory, 2 GiB
            on CPU).
        process_group: split the layers across a ``torch.distributed`` group, balanced by cost, and
            broadcast each result from its owner (see :mod:`corda_kernels.distributed`): by default
            the default group when ``torch.distributed`` is initialized (every rank must call), a
            ``ProcessGroup``, or False for one process. Every rank returns every layer's init.
        cache_dir: keep each layer's init there (see :mod:`corda_kernels.cache`): a layer whose
            method, options, rank, scaling, seed, name, weights and covariance are unchanged is
            read back instead of decomposed; with a process group each rank caches the layers it
            owns.
    """
    group = distributed.resolve_group(process_group)
    if group is not None:
        return distributed.decompose_sharded(
            targets, method, group, ranks=ranks, alphas=alphas, use_rslora=use_rslora, covariances=covariances,
            seed=seed, max_batch_bytes=max_batch_bytes, progress=progress, cache_dir=cache_dir,
        )  # fmt: skip
    if method.needs_covariance and covariances is None:
        raise ValueError(f"method {method.describe()} needs input covariances: pass covariances=calibrate(model, batches)")
    if cache_dir is not None:
        return _decompose_cached(
            targets, method, cache_dir, ranks=ranks, alphas=alphas, use_rslora=use_rslora, covariances=covariances,
            seed=seed, max_batch_bytes=max_batch_bytes, progress=progress,
        )  # fmt: skip
    buckets: dict[tuple, list[str]] = defaultdict(list)
    for name, module in targets.items():
        check_rank(name, module, ranks[name])
        w = hf.weight_matrix(module)
        buckets[(tuple(w.shape), ranks[name], alphas[name], w.device)].append(name)

    results: dict[str, LayerInit] = {}
    bar = tqdm(total=len(targets), desc=f"decompose ({method.describe()})", unit="layer", disable=not progress)
    try:
        for (shape, rank, alpha, device), names in buckets.items():
            chunk = chunk_layers(shape[0], shape[1], method.needs_covariance, _budget(device, max_batch_bytes))
            start = 0
            while start < len(names):
                part = names[start : start + chunk]
                try:
                    inits = _run_chunk(targets, method, part, rank, scaling(alpha, rank, use_rslora), covariances, seed)
                except Exception as exc:
                    if not _is_oom(exc):
                        raise
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if chunk == 1:
                        raise RuntimeError(
                            f"out of memory decomposing layer {part[0]} ({shape[0]}x{shape[1]}, rank {rank}) on {device} "
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


def _decompose_cached(targets, method: InitMethod, cache_dir, *, ranks, alphas, use_rslora, covariances, **options):
    """:func:`decompose` of the layers missing from the cache at ``cache_dir``, the others read back."""
    from .cache import DecompositionCache

    cache = DecompositionCache(cache_dir, method, options["seed"], covariances)
    keys, hits = {}, {}
    for name, module in targets.items():
        check_rank(name, module, ranks[name])
        keys[name] = cache.key(name, module, ranks[name], scaling(alphas[name], ranks[name], use_rslora))
        init = cache.load(keys[name], name, hf.weight_matrix(module).device)
        if init is not None:
            hits[name] = init
    todo = {name: module for name, module in targets.items() if name not in hits}
    fresh = {}
    if todo:
        fresh = decompose(todo, method, ranks=ranks, alphas=alphas, use_rslora=use_rslora, covariances=covariances,
                          process_group=False, **options)
        for name, init in fresh.items():
            cache.store(keys[name], name, init)
    return {name: hits[name] if name in hits else fresh[name] for name in targets}


def covariance_for(covariances, name: str) -> torch.Tensor:
    if isinstance(covariances, Mapping):
        if name not in covariances:
            raise KeyError(f"no covariance for layer {name!r}; covariances has {hf.named(covariances)}")
        return covariances[name]
    return covariances.covariance(name)


@torch.no_grad()
def _run_chunk(targets, method: InitMethod, names, rank, scale, covariances, seed) -> list[LayerInit]:
    weights = torch.stack([hf.weight_matrix(targets[n]).detach().float() for n in names])
    covs = None
    if method.needs_covariance:
        covs = _layer_covariances(covariances, names, weights.shape[-1], weights.device)
    return method.init_batch(weights, covs, rank, scale, names, seed)


def _layer_covariances(covariances, names, in_features: int, device) -> LayerCovariances:
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
