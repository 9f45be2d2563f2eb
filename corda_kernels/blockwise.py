"""Block-wise calibrate -> decompose -> adapt, with memory bounded by one block.

Whole-model calibration holds every layer's covariance at once (about 22 GB in fp32 for a 7B
Llama, 330 GB for 70B). ``apply_blockwise`` instead, as GPTQ-style tools do:

1. runs the model once per batch up to the first block of its stack and keeps what enters it (the
   *block inputs*: hidden states and the block's keyword inputs: masks, rotary embeddings), on
   the execution device or on ``block_inputs_device`` (e.g. the CPU);
2. for each block in turn: runs the kept batches through that block alone, accumulating the
   covariances of its target layers; decomposes and swaps the block's layers; frees the
   covariances; and keeps the block's outputs as the next block's inputs.

Peak memory is one block's weights + its covariances + the block inputs, independent of
the number of blocks. The covariances are those of whole-model calibration (the same inputs reach
each block), so the adapters agree with ``apply(model, covariances=calibrate(model, batches))``
within fp32 rounding.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import adapt as _adapt
from ._deprecation import renamed
from .calibration.collect import to_device
from .calibration.recorder import CovarianceRecorder, StopForward
from .decomposition import decompose
from .export import merged_weight, plain_layer
from .integrations import hf
from .integrations.batches import check_batch
from .methods import make_method
from .ops.lowrank_linear import check_dropout


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, tuple):
        return tuple(_move(v, device) for v in value)
    if isinstance(value, list):
        return [_move(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, block: nn.Module, batches: Sequence[Mapping], store: Optional[str] = None, progress: bool = True
) -> list[tuple[tuple, dict, Optional[torch.Tensor]]]:
    """``(args, kwargs, attention_mask)`` entering ``block`` for each batch (``store``: the device
    they are kept on, e.g. ``"cpu"``; default: where they were computed)."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = hf.input_device(model)
    inputs = []
    try:
        for index, batch in enumerate(tqdm(batches, desc="capture block inputs", disable=not progress)):
            check_batch(model, batch, index)
            batch = to_device(batch, device)
            try:
                model(**hf.without_cache(model, batch))
            except StopForward:
                pass
            if len(captured) != index + 1:
                raise RuntimeError(
                    f"the first block never ran for batch {index}: is it part of {type(model).__name__}?"
                )
            args, kwargs = captured[-1]
            kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
            mask = batch.get("attention_mask")
            if store is not None:
                args, kwargs = _move(args, store), _move(kwargs, store)
            inputs.append((args, kwargs, mask))
    finally:
        handle.remove()
    if not inputs:
        raise ValueError("calibration data is empty: `batches` yielded no batch")
    return inputs


def apply_blockwise(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    method="corda",
    *,
    rank: int = 8,
    alpha: Optional[float] = None,
    target_modules: hf.TargetSpec = None,
    exclude_modules: hf.TargetSpec = None,
    rank_pattern: Optional[Mapping[str, int]] = None,
    alpha_pattern: Optional[Mapping[str, float]] = None,
    use_rslora: bool = False,
    dropout: float = 0.0,
    normalization: str = "token_mean",
    block_inputs_device: Optional[str] = None,
    execution_device=None,
    seed: int = 0,
    max_batch_bytes: Optional[int] = None,
    progress: bool = True,
    cache_dir: Optional[str] = None,
    undo: str = "cpu",
    offload: Optional[str] = None,
    autocast_adapter_dtype: bool = True,
    quantize: Optional[str] = None,
    quantize_iters: int = 0,
    **method_options,
) -> nn.Module:
    """Calibrate, decompose and adapt ``model`` one block at a time (in place; returns it).

    Same arguments as :func:`corda_kernels.calibrate` + :func:`corda_kernels.apply`, plus:
        block_inputs_device: where the block inputs are kept between blocks (e.g. ``"cpu"``);
            default: the execution device.
        execution_device: run each block there (moved in, adapted, moved back to where it lives),
            for models whose blocks live on the CPU; default: each block runs where it is.
        cache_dir: cache each layer's decomposition there (see :mod:`corda_kernels.decomposition.cache`); the
            blocks are still run (their outputs feed the next block), only decompositions are saved.
        undo: how a failure puts back the blocks already adapted. ``"cpu"`` keeps each replaced
            layer on the CPU (exact; host memory grows with depth by the target weights).
            ``"reconstruct"`` keeps nothing and rebuilds each layer as ``W' + s·B·A`` in fp32, cast
            once (within one rounding of the original in its dtype; host memory stays flat).
        offload: deprecated name of ``block_inputs_device``.
        autocast_adapter_dtype: fp32 trainable factors on a 16-bit model (default; see :func:`apply`).
        quantize, quantize_iters: store the residuals quantized, as in :func:`corda_kernels.apply`.

    Every target must live inside the model's (single) stack of blocks.
    """
    block_inputs_device = renamed("apply_blockwise", "offload", offload, "block_inputs_device", block_inputs_device)
    method = make_method(method, **method_options)
    check_dropout(dropout, "apply_blockwise")
    _adapt.refuse_adapted(model)
    stacks = hf.block_stacks(model)
    if len(stacks) != 1:
        raise ValueError(
            f"block-wise calibration needs exactly one stack of blocks; {type(model).__name__} has "
            f"{[name for name, _ in stacks]}. Use calibrate() + apply() for this model"
        )
    stack_name, stack = stacks[0]
    targets, ranks, alphas = _adapt.prepare_targets(
        model, target_modules, exclude_modules, rank, alpha, rank_pattern, alpha_pattern
    )
    outside = [n for n in targets if not n.startswith(stack_name + ".")]
    if outside:
        raise ValueError(
            f"block-wise calibration adapts layers inside {stack_name} only; outside it: {hf.named(outside)}"
        )
    if undo not in ("cpu", "reconstruct"):
        raise ValueError(f"undo must be 'cpu' or 'reconstruct', got {undo!r}")
    quantization = _adapt.check_quantization(targets, quantize, quantize_iters)
    method.prepare(model, targets)

    modes = hf.training_modes(model)  # each module's own, put back at the end
    model.eval()
    undo_log: list[tuple[str, Optional[nn.Module], torch.device]] = []  # (name, replaced layer or None, home)
    try:
        inputs = capture_block_inputs(model, stack[0], batches, store=block_inputs_device, progress=progress)
        for index, block in enumerate(tqdm(stack, desc="blocks", disable=not progress)):
            prefix = f"{stack_name}.{index}."
            block_targets = {n: m for n, m in targets.items() if n.startswith(prefix)}
            home = next(block.parameters()).device
            device = torch.device(execution_device) if execution_device is not None else home
            block.to(device)
            inputs, covariances = _run_block(block, block_targets, inputs, device, block_inputs_device, normalization)
            if covariances is not None:
                inits = decompose(
                    block_targets,
                    method,
                    ranks=ranks,
                    alphas=alphas,
                    use_rslora=use_rslora,
                    covariances=covariances,
                    seed=seed,
                    max_batch_bytes=max_batch_bytes,
                    progress=False,
                    cache_dir=cache_dir,
                )
                cov = covariances if quantization is not None and method.needs_covariance else None
                options = (dropout, autocast_adapter_dtype, quantization, cov)
                _swap_block(model, targets, inits, options, undo, home, undo_log)
                del covariances, cov
                del inits, block_targets
            block.to(home)
    except BaseException:
        _undo(model, undo_log)
        raise
    finally:
        hf.restore_training_modes(model, modes)
    _adapt.freeze_all_but_adapters(model)
    hf.forget_gguf_quantization(model)
    return model


def _swap_block(model, targets, inits, options, undo, home, undo_log) -> None:
    """Swap a block's layers in and log them (``options``: :func:`corda_kernels.adapt.swap_in`'s
    after ``inits``); each replaced layer leaves ``targets`` and lives on only in the undo log
    (parked on the CPU) or not at all (``undo="reconstruct"``)."""
    for name, old in _adapt.swap_in(model, {n: targets[n] for n in inits}, inits, *options):
        undo_log.append((name, old.to("cpu") if undo == "cpu" else None, home))
        del targets[name]


def _undo(model: nn.Module, undo_log) -> None:
    """Put back every adapted layer: the parked original, or one rebuilt from the adapter."""
    for name, old, home in reversed(undo_log):
        if old is None:
            layer = model.get_submodule(name)
            old = plain_layer(layer, merged_weight(layer))
        hf.set_submodule(model, name, old.to(home))


@torch.no_grad()
def _run_block(block, targets, inputs, device, store, normalization):
    """Run the kept batches through ``block``: (the next block's inputs, the block's Calibration
    or None when it has no targets)."""
    recorder = CovarianceRecorder(targets, normalization=normalization)
    outputs = []
    with recorder:
        for b, (args, kwargs, mask) in enumerate(inputs):
            recorder.start_batch(b, mask.to(device) if mask is not None else None)
            out = block(*_move(args, device), **_move(kwargs, device))
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if store is not None:
                hidden = hidden.to(store)
            if args:
                args = (hidden,) + tuple(args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden}
            outputs.append((args, kwargs, mask))
    if not targets:
        return outputs, None
    recorder.batch_index = len(inputs) - 1
    return outputs, recorder.result()
