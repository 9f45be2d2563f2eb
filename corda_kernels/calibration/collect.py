"""Stage 1, calibrate: stream each target layer's input covariance over calibration batches.

``calibrate(model, batches)`` hooks every target linear layer (:mod:`.recorder`), runs the model on
each batch (resuming from and saving to a checkpoint, :mod:`.checkpoint`; sharded over ranks,
:mod:`.sharding`) and returns a :class:`~corda_kernels.calibration.result.Calibration`: per shared
input, the per-token mean covariance ``C = Σ x xᵀ / n_tokens`` (fp32, symmetric), token counts and
the module -> group map.

Normalization (the one deliberate difference from PEFT): PEFT's ``preprocess_corda`` scales each
forward call's input by ``1 / |max(x)|``, sums per call and divides by the number of calls, and
does not skip padding. ``normalization="peft"`` reproduces that (batch size 1 as PEFT requires);
the default ``"token_mean"`` is the plain per-token covariance. CorDA's adapter product
``U·S·Vᵀ`` is invariant to a global scale of C; only the split between A and B changes.
"""

from __future__ import annotations

import itertools
from typing import Iterable, Mapping, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from .._deprecation import renamed
from ..integrations import hf
from ..integrations.batches import check_batch, check_max_batches
from ..ops.covariance import count_tokens
from . import sharding
from . import storage as _storage
from .checkpoint import CalibrationCheckpoint, CheckpointMismatch, model_fingerprint, update_data_fingerprint
from .recorder import CovarianceRecorder, StopForward
from .result import Calibration


def to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


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
    covariance_device: Optional[str] = None,
    offload: Optional[str] = None,
) -> Calibration:
    """Collect the input covariance of every target layer of ``model`` over ``batches``.

    Forward hooks stream each target's input into an fp32 ``(d, d)`` sum of ``xᵀx``: layers that
    receive the same input tensor share one (found at run time by tensor identity, not by names),
    padding is excluded through ``attention_mask`` and tokens are counted, so the result is a
    per-token mean. After a 2-token probe, each forward stops after the last target layer.

    Args:
        model: a Hugging Face model (any device placement, fp32/fp16/bf16), without adapters.
        batches: iterable of dicts like a tokenizer's output (``input_ids`` ``(B, S)`` integers,
            optional ``attention_mask`` ``(B, S)``; any batch size). Padding tokens are excluded.
            Encoder-decoder models: decoder layers use ``decoder_attention_mask``.
        target_modules: names (suffix match) or a regex (full match), as PEFT takes them; default:
            every ``nn.Linear`` / ``Conv1D`` in the model's block stacks (not ``lm_head``).
        exclude_modules: names or a regex of layers to leave out, as ``target_modules``.
        normalization: ``"token_mean"`` (default) or ``"peft"`` (PEFT's per-call max scaling,
            padding included: reproduces PEFT's ``calib_cov_distribution``).
        max_batches: stop after this many batches (a positive integer; None: every batch).
        progress: show a tqdm bar of batches and tokens.
        checkpoint_dir: save the running state there every ``checkpoint_every`` batches and at the
            end (atomically; see :mod:`corda_kernels.calibration.checkpoint`). Re-running the same
            call after a crash resumes from it and gives the same covariances as an uninterrupted
            run; a checkpoint of another model, target set, normalization or data is refused.
        checkpoint_every: batches between checkpoints (a positive int).
        process_group: data-parallel calibration (see :mod:`corda_kernels.calibration.sharding`): by
            default the default group when ``torch.distributed`` is initialized (every rank must
            call), a ``ProcessGroup``, or False for a single process. Ranks' sums and token counts
            are all-reduced before finalization: every rank returns the same Calibration.
            Checkpoints go to ``checkpoint_dir/rank-<r>``.
        shard: how ranks split ``batches``: ``"stride"`` (default; every rank gets the same
            ``batches`` and runs batches ``rank, rank + world, ...``, so the result is that of one
            process over all of them, ``max_batches`` counting shared batches) or ``"local"``
            (``batches`` is this rank's own shard; ``max_batches`` applies per rank).
        storage: how each finalized covariance is kept: ``"full"`` ``(d, d)`` (default) or
            ``"packed"``, its upper triangle (half the bytes; unpacked per decomposition chunk).
            Accumulation is always into full ``(d, d)`` buffers, so calibration's own peak is
            unchanged; what is held afterwards (through decomposition) is halved.
        covariance_device: ``"cpu"`` keeps the finalized covariances in CPU memory (pinned when
            CUDA is available); decomposition moves one chunk's to the layers' device at a time.
        offload: deprecated name of ``covariance_device``.

    Returns:
        The :class:`~corda_kernels.Calibration`: one fp32 covariance per distinct layer input.

    Raises:
        ValueError: an option is out of range (``checkpoint_every``, ``normalization``,
            ``storage``, ``covariance_device``, ``shard``), the model already carries adapters or
            sits on the ``meta`` device, ``target_modules`` matches no layer, a batch is malformed
            (ids outside the vocabulary, no tokens, a mask of another shape), ``batches`` is
            empty, a layer saw only padding, or ``checkpoint_dir`` holds another run's checkpoint.
        TypeError: a batch is not a dict with integer ``input_ids``, or a target's weight is not
            fp32/fp16/bf16 (e.g. int8).
        FloatingPointError: a parameter, or a layer's input in some batch, holds NaN or Inf (the
            message names it, and the batch).
        RuntimeError: ``process_group`` was given without an initialized ``torch.distributed``, a
            target never ran, or calibration failed on another rank.
    """
    covariance_device = renamed("calibrate", "offload", offload, "covariance_device", covariance_device)
    _storage.check_options(storage, covariance_device)
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive number of batches, got {checkpoint_every!r}")
    max_batches = check_max_batches(max_batches)
    group = distributed.resolve_group(process_group)
    hf.refuse_adapted(model, "calibrate")
    targets = hf.find_targets(model, target_modules, exclude_modules)
    for name, module in targets.items():
        hf.check_adaptable(name, module)
    hf.refuse_meta(model, targets, "calibrate")
    hf.check_finite_parameters(model.named_parameters(), "calibrate")
    decoder, encoder = hf.decoder_stack(model)
    recorder = CovarianceRecorder(targets, normalization=normalization, decoder=decoder, encoder=encoder)
    checkpoint = None
    if checkpoint_dir is not None:
        identity = {"model": model_fingerprint(model), "targets": sorted(targets), "normalization": normalization}
        identity.update(sharding.checkpoint_identity(group, shard))
        checkpoint = CalibrationCheckpoint(sharding.rank_checkpoint_dir(checkpoint_dir, group), identity)
    with distributed.collective_errors(group, "calibrate"):
        if group is not None:
            batches, max_batches = sharding.shard_batches(batches, group, shard, max_batches)
            progress = progress and distributed.rank_and_world(group)[0] == 0
        done, tokens = _stream(model, recorder, batches, max_batches, progress, checkpoint, checkpoint_every)
    if group is not None:
        done, tokens = recorder.all_reduce(group, done, tokens)
    if done == 0:
        raise ValueError("calibration data is empty: `batches` yielded no batch")
    recorder.batch_index = done - 1
    result = recorder.result(storage, covariance_device)
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
            batches = iter(batches)
            first = next(batches, None)
            if first is not None:  # learn input sharing and the calls per forward on 2 tokens
                check_batch(model, first, 0)
                recorder.probe(model, to_device(first, device))
                batches = itertools.chain([first], batches)
            for index, batch in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                check_batch(model, batch, index)
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
                batch = to_device(batch, device)
                mask = batch.get("attention_mask")
                recorder.start_batch(index, mask, batch.get("decoder_attention_mask"))
                try:
                    model(**hf.without_cache(model, batch))
                except StopForward:
                    pass
                tokens += count_tokens(batch["input_ids"].shape, mask)
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
