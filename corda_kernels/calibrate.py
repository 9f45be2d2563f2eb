"""Stage 1, calibrate: stream each target layer's input covariance over calibration batches.

``calibrate(model, batches)`` hooks every target linear layer, runs the model on each batch and
adds the layer's input rows (padding excluded through ``attention_mask``) into an fp32
accumulator with :func:`corda_kernels.covariance_update`. Layers that receive the *same input
tensor* in a forward pass (q/k/v after one norm, gate/up) share one accumulator: the sharing is
detected at run time from tensor identity, not from layer names, so it holds for any architecture.

The result is a :class:`Calibration`: per shared input, the per-token mean covariance
``C = Σ x xᵀ / n_tokens`` (fp32, symmetric), plus token counts and the module -> group map.

Normalization (the one deliberate difference from PEFT): PEFT's ``preprocess_corda`` scales each
forward call's input by ``1 / |max(x)|``, sums per call and divides by the number of calls, and
does not skip padding. ``normalization="peft"`` reproduces that (batch size 1 as PEFT requires);
the default ``"token_mean"`` is the plain per-token covariance. CorDA's adapter product
``U·S·Vᵀ`` is invariant to a global scale of C; only the split between A and B changes.
"""

from __future__ import annotations

import itertools
import json
import os
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _backend, distributed
from . import storage as _storage
from .checkpoint import CalibrationCheckpoint, CheckpointMismatch, model_fingerprint, update_data_fingerprint
from .integrations import hf
from .ops.covariance import CovarianceAccumulator, covariance_update, finalize_covariance

NORMALIZATIONS = ("token_mean", "peft")


@dataclass
class Calibration:
    """Covariances of target layers' inputs.

    covariances: group -> the stored covariance (the group is named after its first layer): a
    ``(d, d)`` fp32 symmetric matrix, or with ``storage="packed"`` its upper triangle as a 1-D
    ``d (d + 1) / 2`` tensor (see :mod:`corda_kernels.storage`); use :meth:`covariance` for the
    full matrix. groups: module name -> group; token_counts: group -> tokens seen (forward calls
    for ``normalization="peft"``).
    """

    covariances: dict[str, torch.Tensor]
    groups: dict[str, str]
    token_counts: dict[str, int]
    normalization: str = "token_mean"
    batches: int = 0
    meta: dict = field(default_factory=dict)
    storage: str = "full"

    def covariance(self, module_name: str, device=None) -> torch.Tensor:
        """The full ``(d, d)`` fp32 covariance of a layer's input, on ``device`` (default: where it
        is kept). With ``storage="full"`` on its own device this is the stored tensor itself;
        otherwise a new tensor (unpacked / copied) on every call."""
        return _storage.expand(self.covariances[self.group(module_name)], self.storage, device)

    def group(self, module_name: str) -> str:
        """The group (shared input) of a layer: layers of one group have one covariance."""
        if module_name not in self.groups:
            raise KeyError(
                f"no covariance for layer {module_name!r}; calibrated layers: {hf.named(self.groups)}"
            )
        return self.groups[module_name]

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored covariances."""
        return sum(c.numel() * c.element_size() for c in self.covariances.values())

    def per_module(self) -> dict[str, torch.Tensor]:
        """``{module name: C}``, the layout of PEFT's CorDA ``covariance_file`` (full matrices: with
        ``storage="packed"`` every group is unpacked, once)."""
        full = {group: _storage.expand(c, self.storage) for group, c in self.covariances.items()}
        return {name: full[group] for name, group in self.groups.items()}

    def save(self, path: str) -> None:
        """Write ``covariances.safetensors`` and ``calibration.json`` into directory ``path``."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        tensors = {group: c.contiguous().cpu() for group, c in self.covariances.items()}
        save_file(tensors, os.path.join(path, "covariances.safetensors"))
        manifest = {
            "groups": self.groups,
            "token_counts": self.token_counts,
            "normalization": self.normalization,
            "batches": self.batches,
            "meta": self.meta,
            "storage": self.storage,
        }
        with open(os.path.join(path, "calibration.json"), "w") as fh:
            json.dump(manifest, fh, indent=1)

    @classmethod
    def load(cls, path: str, device=None) -> "Calibration":
        """Read a :meth:`save` d calibration (in the storage it was saved with) onto ``device``."""
        from safetensors.torch import load_file

        with open(os.path.join(path, "calibration.json")) as fh:
            manifest = json.load(fh)
        tensors = load_file(os.path.join(path, "covariances.safetensors"), device=str(device or "cpu"))
        missing = set(manifest["groups"].values()) - set(tensors)
        if missing:
            raise ValueError(f"calibration at {path} is incomplete: no covariance for groups {sorted(missing)}")
        return cls(
            covariances=tensors,
            groups=manifest["groups"],
            token_counts=manifest["token_counts"],
            normalization=manifest["normalization"],
            batches=manifest["batches"],
            meta=manifest.get("meta", {}),
            storage=manifest.get("storage", "full"),
        )


class StopForward(Exception):
    """Raised after the last target layer of a forward pass when the rest need not run."""


class CovarianceRecorder:
    """Forward pre-hooks that route each target's input to its group's accumulator.

    On the first batch a layer whose input tensor *is* a tensor another layer already received in
    this forward pass joins that layer's group; on later batches the grouping is enforced (a group
    member receiving a different tensor than its group in the same pass is an error, never a
    silent mix). Tensors are tracked with weak references, so no activation is kept alive.
    """

    def __init__(self, targets: Mapping[str, nn.Module], *, normalization: str = "token_mean", upper_only: bool = True):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.targets = dict(targets)
        self.normalization = normalization
        self.upper_only = upper_only
        self.groups: dict[str, str] = {}
        self.accumulators: dict[str, CovarianceAccumulator] = {}
        self.batch_index = 0
        self._mask: Optional[torch.Tensor] = None
        self._seen: dict[str, weakref.ref] = {}  # group -> input tensor of this forward pass
        self._handles: list = []
        # Early stop: once every target has run as often as in the first batch, the rest of the
        # forward (final norm, lm_head: ~20% of an LLM's FLOPs) is skipped.
        self.stop_early = False
        self._calls: dict[str, int] = {}
        self._expected: Optional[dict[str, int]] = None
        self._remaining = 0
        self.probing = False

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> "CovarianceRecorder":
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
            self._handles.append(module.register_forward_hook(self._after))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start_batch(self, index: int, attention_mask: Optional[torch.Tensor]) -> None:
        if self._expected is None and self._calls:
            self._expected = dict(self._calls)  # the first batch ran the whole forward
        self.batch_index = index
        self._mask = None if attention_mask is None else attention_mask.bool()
        self._seen.clear()
        self._calls = {}
        self._remaining = sum(self._expected.values()) if self._expected else -1

    def probe(self, model: nn.Module, batch: Mapping) -> None:
        """Learn how often each target runs per forward from a 2-token slice of ``batch``, so that
        every real batch can stop after the last target (nothing is recorded)."""
        ids = batch["input_ids"]
        tiny = {
            k: (v[:1, :2] if isinstance(v, torch.Tensor) and v.shape[:2] == ids.shape[:2] else v) for k, v in batch.items()
        }
        self.probing, self._calls, self._remaining = True, {}, -1
        try:
            model(**tiny)
        finally:
            self.probing = False
        self._expected = dict(self._calls)

    def _after(self, module, args, output):
        if self.stop_early and self._remaining == 0:
            raise StopForward

    # -- the hook ------------------------------------------------------------------------------
    def _hook(self, name: str):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(f"layer {name}: expected a tensor as first input, got {type(args[0]).__name__ if args else 'nothing'}")
            self.record(name, args[0])

        return hook

    def record(self, name: str, x: torch.Tensor) -> None:
        self._calls[name] = self._calls.get(name, 0) + 1
        self._remaining -= 1
        if self.probing:
            return
        group = self.groups.get(name)
        if group is None:  # first batch: join the group whose input is this very tensor, if any
            group = next((g for g, ref in self._seen.items() if ref() is x), name)
            self.groups[name] = group
        ref = self._seen.get(group)
        if ref is not None:
            if ref() is x:
                return  # another layer of this group already accumulated this tensor
            if group != name:
                raise RuntimeError(
                    f"layer {name} shared its input with {group} on the first batch but received a different tensor "
                    f"in batch {self.batch_index}; calibrate these layers separately (target_modules)"
                )
        self._seen[group] = weakref.ref(x)
        self._accumulate(group, name, x)

    def _accumulate(self, group: str, name: str, x: torch.Tensor) -> None:
        acc = self.accumulators.get(group)
        d = x.shape[-1]
        if acc is None:
            acc = CovarianceAccumulator(d, device=x.device, upper_only=self.upper_only, name=group)
            self.accumulators[group] = acc
        where = f"layer {name} (batch {self.batch_index})"
        if self.normalization == "peft":
            scale = float(x.max().abs())
            delta = torch.zeros_like(acc.cov)
            covariance_update(delta, x, upper_only=self.upper_only, name=where)
            acc.cov.add_(delta, alpha=1.0 / scale**2 if scale > 0 else 1.0)
            acc.count += 1
            return
        mask = self._mask
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            _backend.warn_once(
                f"mask-{name}",
                f"layer {name}: input shape {tuple(x.shape)} does not line up with attention_mask "
                f"{tuple(mask.shape)}; its padding tokens cannot be excluded",
            )
            mask = None
        if mask is not None and mask.device != x.device:
            mask = mask.to(x.device)
        covariance_update(acc.cov, x, mask, upper_only=self.upper_only, name=where)
        acc.count += int(mask.sum()) if mask is not None else x.numel() // max(d, 1)

    # -- checkpoint state ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for group, acc in self.accumulators.items():
            out[f"cov/{group}"] = acc.cov
            out[f"count/{group}"] = torch.tensor(acc.count, dtype=torch.int64)
        return out

    def load_state(self, tensors: Mapping[str, torch.Tensor], groups: Mapping[str, str]) -> None:
        self.groups = dict(groups)
        for key, cov in tensors.items():
            if not key.startswith("cov/"):
                continue
            group = key[4:]
            device = self.targets[group].weight.device
            acc = CovarianceAccumulator(cov.shape[0], device=device, upper_only=self.upper_only, name=group)
            acc.cov.copy_(cov)
            acc.count = int(tensors[f"count/{group}"])
            self.accumulators[group] = acc

    # -- result --------------------------------------------------------------------------------
    def result(self, storage: str = "full", offload: Optional[str] = None) -> Calibration:
        """Finalize every accumulator in place (single use) and keep it as ``storage`` / ``offload``
        (see :mod:`corda_kernels.storage`); each full accumulator is released as soon as its stored
        form exists."""
        never = [n for n in self.targets if n not in self.groups]
        if never:
            raise RuntimeError(f"target layers never ran during calibration: {hf.named(never)}")
        covariances, counts = {}, {}
        for group, acc in self.accumulators.items():
            if acc.count == 0:
                raise ValueError(
                    f"layer {group} saw no tokens: every calibration token was padding (attention_mask all 0)"
                )
            full = finalize_covariance(acc.cov, acc.count, upper_only=self.upper_only, inplace=True)
            acc.cov = None
            covariances[group] = _storage.keep(full, storage, offload)
            counts[group] = acc.count
        return Calibration(covariances, dict(self.groups), counts, self.normalization, self.batch_index + 1,
                           storage=storage)


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _check_batch(model: nn.Module, batch, index: int) -> None:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise TypeError(
            f"calibration batch {index} must be a dict with 'input_ids' (and 'attention_mask'), like a tokenizer's "
            f"output; got {type(batch).__name__}"
        )
    ids = batch["input_ids"]
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and ids.shape[-1] > limit:
        raise ValueError(
            f"calibration batch {index} has sequences of {ids.shape[-1]} tokens but the model allows at most {limit} "
            "(max_position_embeddings); truncate the calibration text"
        )


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    target_modules: hf.TargetSpec = None,
    *,
    exclude_modules: hf.TargetSpec = None,
    normalization: str = "token_mean",
    max_batches: Optional[int] = None,
    progress: bool = True,
    checkpoint_dir: Optional[str] = None,
    checkpoint_every: int = 50,
    process_group=None,
    shard: str = "stride",
    storage: str = "full",
    offload: Optional[str] = None,
) -> Calibration:
    """Collect the input covariance of every target layer of ``model`` over ``batches``.

    Args:
        model: a Hugging Face model (any device placement, fp32/fp16/bf16).
        batches: iterable of dicts like a tokenizer's output (``input_ids`` ``(B, S)``, optional
            ``attention_mask`` ``(B, S)``; any batch size). Padding tokens are excluded.
        target_modules: names (suffix match) or a regex (full match); default: every linear layer
            in the model's block stacks (see :func:`corda_kernels.integrations.hf.find_targets`).
        normalization: ``"token_mean"`` (default) or ``"peft"`` (PEFT's per-call max scaling).
        max_batches: stop after this many batches.
        progress: show a tqdm bar of batches and tokens.
        checkpoint_dir: save the running state there every ``checkpoint_every`` batches and at the
            end (atomically; see :mod:`corda_kernels.checkpoint`). Re-running the same call after a
            crash resumes from it and gives the same covariances as an uninterrupted run; a
            checkpoint of another model, target set, normalization or data is refused.
        process_group: data-parallel calibration (see :mod:`corda_kernels.distributed`): by default
            the default group when ``torch.distributed`` is initialized (every rank must call), a
            ``ProcessGroup``, or False for a single process. Ranks' sums and token counts are
            all-reduced before finalization: every rank returns the same Calibration. Checkpoints
            go to ``checkpoint_dir/rank-<r>``.
        shard: how ranks split ``batches``: ``"stride"`` (default; every rank gets the same
            ``batches`` and runs batches ``rank, rank + world, ...``, so the result is that of one
            process over all of them, ``max_batches`` counting shared batches) or ``"local"``
            (``batches`` is this rank's own shard; ``max_batches`` applies per rank).
        storage: how each finalized covariance is kept: ``"full"`` ``(d, d)`` (default) or
            ``"packed"``, its upper triangle (half the bytes; unpacked per decomposition chunk).
            Accumulation is always into full ``(d, d)`` buffers, so calibration's own peak is
            unchanged; what is held afterwards (through decomposition) is halved.
        offload: ``"cpu"`` keeps the finalized covariances in CPU memory (pinned when CUDA is
            available); decomposition moves one chunk's to the layers' device at a time.
    """
    _storage.check_options(storage, offload)
    group = distributed.resolve_group(process_group)
    targets = hf.find_targets(model, target_modules, exclude_modules)
    for name, module in targets.items():
        hf.check_adaptable(name, module)
    recorder = CovarianceRecorder(targets, normalization=normalization)
    checkpoint = None
    if checkpoint_dir is not None:
        identity = {"model": model_fingerprint(model), "targets": sorted(targets), "normalization": normalization}
        identity.update(distributed.checkpoint_identity(group, shard))
        checkpoint = CalibrationCheckpoint(distributed.rank_checkpoint_dir(checkpoint_dir, group), identity)
    with distributed.collective_errors(group, "calibrate"):
        if group is not None:
            batches, max_batches = distributed.shard_batches(batches, group, shard, max_batches)
            progress = progress and distributed.rank_and_world(group)[0] == 0
        done, tokens = _stream(model, recorder, batches, max_batches, progress, checkpoint, checkpoint_every)
    if group is not None:
        done, tokens = distributed.all_reduce_recorder(recorder, group, done, tokens)
    if done == 0:
        raise ValueError("calibration data is empty: `batches` yielded no batch")
    recorder.batch_index = done - 1
    result = recorder.result(storage, offload)
    result.meta["tokens"] = tokens
    return result


def _stream(model, recorder: CovarianceRecorder, batches, max_batches, progress, checkpoint, checkpoint_every):
    """Run ``model`` over ``batches`` into ``recorder`` (resuming from / saving to ``checkpoint``);
    returns (batches done, tokens seen)."""
    device = hf.input_device(model)
    checkpoint_dir = checkpoint.directory if checkpoint is not None else None
    resume = None
    if checkpoint is not None:
        resume = checkpoint.load()
        if resume is not None:
            recorder.load_state(resume["tensors"], resume["groups"])
            torch.set_rng_state(resume["tensors"]["rng"])
    skip = resume["batches_done"] if resume else 0
    tokens = resume["tokens"] if resume else 0
    fingerprint = ""
    done = 0
    # accelerate's offload hooks move weights back after a module's forward: never cut one short.
    recorder.stop_early = not any(hasattr(m, "_hf_hook") for m in model.modules())
    was_training = model.training
    model.eval()
    total = max_batches if max_batches is not None else (len(batches) if hasattr(batches, "__len__") else None)
    bar = tqdm(total=total, desc="calibrate", unit="batch", disable=not progress)

    def save():
        extra = {"groups": recorder.groups, "tokens": tokens}
        tensors = {**recorder.state_tensors(), "rng": torch.get_rng_state()}
        checkpoint.save(tensors=tensors, batches_done=done, data_fingerprint=fingerprint, extra=extra)

    try:
        with recorder:
            if recorder.stop_early:
                batches = iter(batches)
                first = next(batches, None)
                if first is not None:
                    _check_batch(model, first, 0)
                    recorder.probe(model, _to_device(first, device))
                    batches = itertools.chain([first], batches)
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                _check_batch(model, batch, index)
                fingerprint = update_data_fingerprint(fingerprint, batch)
                done = index + 1
                if index < skip:  # already in the checkpoint: only re-hash the data
                    if done == skip and fingerprint != resume["data_fingerprint"]:
                        raise CheckpointMismatch(
                            f"checkpoint {checkpoint_dir} was written for different calibration data (the first {skip} "
                            "batches differ); use another checkpoint_dir or delete it to start over"
                        )
                    bar.update(1)
                    continue
                batch = _to_device(batch, device)
                mask = batch.get("attention_mask")
                recorder.start_batch(index, mask)
                try:
                    model(**batch)
                except StopForward:
                    pass
                tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
                bar.update(1)
                bar.set_postfix(tokens=tokens)
                if checkpoint is not None and done % checkpoint_every == 0:
                    save()
    finally:
        bar.close()
        model.train(was_training)
    if done < skip:
        raise CheckpointMismatch(
            f"calibration data ended after {done} batches but checkpoint {checkpoint_dir} has {skip}; it belongs to "
            "other data"
        )
    if checkpoint is not None and done > skip:
        save()
    return done, tokens
