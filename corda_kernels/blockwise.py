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

import contextlib
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _backend
from . import adapt as _adapt
from ._deprecation import renamed
from .calibration.collect import to_device
from .calibration.recorder import CovarianceRecorder, StopForward
from .config import AdaptConfig
from .export import merged_weight
from .integrations import hf
from .integrations.batches import check_batch
from .methods import InitMethod
from .nn import LowRankLinear


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
    config: Union[AdaptConfig, str, InitMethod] = "corda",
    *,
    normalization: str = "token_mean",
    block_inputs_device: Optional[str] = None,
    execution_device=None,
    progress: bool = True,
    cache_dir: Optional[str] = None,
    undo: str = "cpu",
    offload: Optional[str] = None,
    adapter_name: Optional[str] = None,
    initial: Optional[str] = None,
    **options,
) -> nn.Module:
    """Calibrate, decompose and adapt ``model`` one block at a time (in place; returns it).

    The inputs of the first decoder block are cached; then each block in turn is run over them
    (its targets' covariances collected), decomposed and adapted, and its outputs become the next
    block's inputs. Peak memory is one block's weights and covariances plus the cached hidden
    states, whatever the depth; the adapters equal whole-model :func:`corda_kernels.calibrate` +
    :func:`corda_kernels.apply` with the same config. A failure puts back the blocks already
    adapted. The same stage functions as :func:`corda_kernels.apply` run, per block.

    Args:
        model: a Hugging Face model with one stack of decoder blocks, without adapters.
        batches: a sequence of dicts like a tokenizer's output, as for
            :func:`corda_kernels.calibrate`.
        config: as for :func:`corda_kernels.apply` (an :class:`~corda_kernels.AdaptConfig` or a
            method); every target must live inside the stack of blocks.
        normalization: as for :func:`corda_kernels.calibrate`.
        block_inputs_device: where the block inputs are kept between blocks (e.g. ``"cpu"``);
            default: the execution device.
        execution_device: run each block there (moved in, adapted, moved back to where it lives),
            for models whose blocks live on the CPU; default: each block runs where it is.
        progress: show a tqdm bar over blocks.
        cache_dir: cache each layer's decomposition there (see :mod:`corda_kernels.decomposition.cache`); the
            blocks are still run (their outputs feed the next block), only decompositions are saved.
        undo: how a failure (an error, Ctrl-C) puts back the blocks already adapted; either way
            the original weights come back bit for bit, in the same module objects.
            ``"cpu"`` keeps each replaced layer on the CPU (host memory grows with depth by the
            target weights). ``"reconstruct"`` keeps each replaced module without its weight and
            rebuilds the weight as ``W' + s·B·A`` plus what that sum misses of the original (the
            rounding of ``W' = W − s·B·A``: a bit mask and an int8 offset in units of the last
            place per differing entry, :class:`_Rebuild`): about 0.2-0.5 bytes per target weight
            on the CPU instead of 2-4. It cannot rebuild the original from a quantized residual
            (the quantization error is not one rounding): ``quantize`` with ``undo="reconstruct"``
            is refused before anything runs.
        offload: deprecated name of ``block_inputs_device``.
        adapter_name: as for :func:`corda_kernels.apply`: the adapter's name; on a model that
            already carries corda_kernels adapters, a new name adds a further adapter to the same
            layers, block by block. Each block then runs with its layers' original weights (the
            calibration :func:`corda_kernels.calibrate` gives on the base model), the new adapter
            is decomposed from them and added (:func:`corda_kernels.adapt.add_adapter`); a failure
            deletes what was added and gives each converted layer its residual base back bit for
            bit (``undo="cpu"``: a copy of it on the CPU; ``"reconstruct"``: the rounding that
            ``W − s·B0·A0`` misses, as above).
        initial: as for :func:`corda_kernels.apply`: the directory
            :func:`~corda_kernels.save_peft_adapter` wrote right after the first adapter's
            ``apply``, for a model whose first adapter is subtractive.
        **options: :class:`~corda_kernels.AdaptConfig` fields and the method's own options, as for
            :func:`corda_kernels.apply`.

    Returns:
        ``model`` itself, its targets replaced by ``LowRankLinear`` layers.

    Raises:
        ValueError: the model has no single stack of blocks, a target lies outside it, ``undo``
            is not ``"cpu"`` or ``"reconstruct"``, ``batches`` is empty or a batch is malformed,
            or any of :func:`corda_kernels.apply`'s value checks fails (adding an adapter: the same
            checks, naming ``apply_blockwise(adapter_name=...)``).
        TypeError: as for :func:`corda_kernels.apply` (and a batch that is not a dict with
            integer ``input_ids``).
        FloatingPointError: a weight, a covariance or a layer's input holds NaN or Inf.
        ImportError: ``quantize`` without bitsandbytes installed.
        RuntimeError: a single layer's decomposition does not fit in memory.
    """
    block_inputs_device = renamed("apply_blockwise", "offload", offload, "block_inputs_device", block_inputs_device)
    config = AdaptConfig.build(config, where="apply_blockwise", **options)
    further = None
    if _adapt.adds_further(model, adapter_name, initial, "apply_blockwise"):
        where = f"apply_blockwise(adapter_name={adapter_name!r})"
        further = _adapt.plan_further(model, adapter_name, config, initial, where)
    method = config.make_method()
    stacks = hf.block_stacks(model)
    if len(stacks) != 1:
        raise ValueError(
            f"block-wise calibration needs exactly one stack of blocks; {type(model).__name__} has "
            f"{[name for name, _ in stacks]}. Use calibrate() + apply() for this model"
        )
    stack_name, stack = stacks[0]
    targets = _adapt.select_targets(model, config, where="apply_blockwise") if further is None else further.targets
    outside = [n for n in targets.layers if not n.startswith(stack_name + ".")]
    if outside:
        raise ValueError(
            f"block-wise calibration adapts layers inside {stack_name} only; outside it: {hf.named(outside)}"
        )
    if undo not in ("cpu", "reconstruct"):
        raise ValueError(f"undo must be 'cpu' or 'reconstruct', got {undo!r}")
    if targets.quantization is not None and undo == "reconstruct":
        raise ValueError(
            f"apply_blockwise: undo='reconstruct' cannot rebuild the original weights from a quantized residual "
            f"(quantize={targets.quantization.fmt!r} stores W - s·B·A with its quantization error, far more than the "
            "rounding undo='reconstruct' keeps), so a failed run could not give the model back; use undo='cpu' "
            "(the default: each replaced layer waits on the CPU until the run ends)"
        )
    if further is None:
        method.prepare(model, targets.layers)
    elif type(method).prepare is not InitMethod.prepare:  # it may run the model: on the original weights
        with _adapt.originals_in(model, further, further.layers) as originals:
            method.prepare(model, originals.layers)

    pending = dict(targets.layers)  # layers not adapted yet
    modes = hf.training_modes(model)  # each module's own, put back at the end
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    undo_log: list[tuple[str, nn.Module, torch.device, Optional[_Rebuild]]] = []
    added: list[tuple[str, bool]] = []  # a further adapter: (layer, converted), as adapt.add_finished logs
    residuals: dict = {}  # a further adapter: each converted layer's residual base (or what rebuilds it)
    moved = None  # (block, home, name) while a block is away on the execution device
    try:
        inputs = capture_block_inputs(model, stack[0], batches, store=block_inputs_device, progress=progress)
        for index, block in enumerate(tqdm(stack, desc="blocks", disable=not progress)):
            prefix = f"{stack_name}.{index}."
            block_targets = {n: m for n, m in pending.items() if n.startswith(prefix)}
            home = next(block.parameters()).device
            device = torch.device(execution_device) if execution_device is not None else home
            moved = (block, home, prefix[:-1])
            block.to(device)
            stage = (  # a further adapter: the block computes the original, its layers plain linears
                contextlib.nullcontext(targets)
                if further is None
                else _adapt.originals_in(model, further, block_targets)
            )
            with stage as block_in:
                block_targets = {n: block_in.layers[n] for n in block_targets}
                inputs, covariances = _run_block(
                    block, block_targets, inputs, device, block_inputs_device, normalization
                )
                inits = None
                if covariances is not None:
                    inits = _adapt.finished_inits(
                        block_in, block_targets, method, config, covariances, progress=False, cache_dir=cache_dir
                    )
                del covariances, block_in, block_targets
            if inits is not None and further is None:
                _swap_block(model, pending, inits, config, undo, home, undo_log)
            elif inits is not None:
                _add_block(further, inits, config, undo, added, residuals)
            del inits
            block.to(home)
            moved = None
        if further is None:
            _adapt.freeze_all_but_adapters(model)
    except BaseException:
        if moved is not None:  # the failing block goes home first (the undo then works there)
            _return_home(*moved)
        _undo(model, undo_log, further, added, residuals)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
        raise
    finally:
        hf.restore_training_modes(model, modes)
    if further is None:
        _adapt.name_adapter(model, targets.layers, adapter_name)
    hf.forget_gguf_quantization(model)
    return model


def _return_home(block: nn.Module, home: torch.device, name: str) -> None:
    """Move a failed block back from the execution device; if the device itself failed, say which
    block stays there instead of hiding the original error."""
    try:
        block.to(home)
    except Exception as exc:
        _backend.warn(
            f"apply_blockwise: could not move the failed block {name} back to {home} ({type(exc).__name__}: {exc})"
        )


def _swap_block(model, pending, inits, config, undo, home, undo_log) -> None:
    """Swap a block's layers in (:func:`corda_kernels.adapt.swap_in`) and log them; each replaced
    layer leaves ``pending`` and lives on only in the undo log: parked on the CPU (``undo="cpu"``),
    or without its weight, with what rebuilds it bit for bit (``undo="reconstruct"``)."""
    for name, old in _adapt.swap_in(model, {n: pending[n] for n in inits}, inits, config):
        rebuild = None
        if undo == "cpu":
            old.to("cpu")
        else:
            rebuild = _Rebuild(model.get_submodule(name), hf.weight_matrix(old))
            old.weight.data = old.weight.data.new_empty(0)  # released: rebuilt from the adapter on failure
        undo_log.append((name, old, home, rebuild))
        del pending[name]


def _add_block(further, inits, config, undo, added, residuals) -> None:
    """Add the further adapter to a block's layers (:func:`corda_kernels.adapt.add_finished`), first
    keeping each converted layer's residual base: a copy on the CPU (``undo="cpu"``), or, once the
    layer holds the original, what rebuilds the residual bit for bit from it (``"reconstruct"``)."""
    converted = [n for n in inits if n in further.starts]
    for name in converted:
        residuals[name] = further.layers[name].weight.detach().to("cpu", copy=True)
    _adapt.add_finished(further, inits, config, added)
    if undo == "reconstruct":
        for name in converted:
            residuals[name] = _Rebuild(further.layers[name], residuals[name], rebuilt=LowRankLinear.residual_base)


def _undo(model: nn.Module, undo_log, further=None, added=(), residuals=None) -> None:
    """Put back every adapted layer's original module: parked on the CPU, or with its weight rebuilt;
    a further adapter: deleted, and each converted layer's residual base put back as it was."""
    inexact = []
    for name, converted in reversed(added):
        layer, kept = further.layers[name], residuals.get(name)
        if isinstance(kept, _Rebuild):
            kept, exact = kept.weight(layer)
            if not exact:
                inexact.append(name)
        _adapt.remove_added(further, [(name, converted)])
        if kept is not None:
            with torch.no_grad():
                layer.weight.copy_(kept)
    for name, old, home, rebuild in reversed(undo_log):
        if rebuild is not None:
            weight, exact = rebuild.weight(model.get_submodule(name))
            old.weight.data = (weight.t() if hf.is_conv1d(old) else weight).contiguous().to(old.weight.device)
            if not exact:
                inexact.append(name)
        hf.set_submodule(model, name, old.to(home))
    if inexact:
        _backend.warn(
            f"apply_blockwise: undo could not rebuild {hf.named(inexact)} bit for bit (the adapter's product came "
            "out differently than when the layer was adapted); their weights differ from the originals in the "
            "last bits of some entries"
        )


_BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
_POWERS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _rebuilt(layer) -> torch.Tensor:
    """``(out, in)``: the frozen base, plus ``s·B·A`` where the base is a residual (fp32, cast once)."""
    with torch.no_grad():
        return merged_weight(layer) if getattr(layer, "base_changed", True) else layer.weight.detach().clone()


def _bits(weight: torch.Tensor) -> torch.Tensor:
    return weight.contiguous().view(_BITS[weight.dtype]).reshape(-1)


def _fingerprint(bits: torch.Tensor) -> tuple[int, int]:
    wide = bits.long()
    return int(wide.sum()), int((wide * wide).sum())  # integer sums: exact whatever the order (they wrap)


class _Rebuild:
    """What ``undo="reconstruct"`` keeps to give a layer's original weight ``W`` back bit for bit
    from its adapted layer: ``R = W' + s·B·A`` (:func:`_rebuilt`) misses the rounding of
    ``W' = fl(W − s·B·A)`` in some entries (10-35% of them, by a few units in the last place). Kept
    on the CPU: a bit mask of those entries (1/8 byte per weight), the difference of their bit
    patterns ``W − R`` as int8, and the original bits of the rare entries where it does not fit
    (a sign change, a much larger residual). ``device``: where ``R`` was computed (computed there
    again on undo, so that it comes out the same); a fingerprint of ``W`` checks the result.
    ``rebuilt``: what forms ``R`` from the layer (default :func:`_rebuilt`; a further adapter's
    converted layer: :meth:`~corda_kernels.LowRankLinear.residual_base`)."""

    def __init__(self, layer, original: torch.Tensor, rebuilt=None):
        self.device = layer.weight.device
        self.shape = tuple(original.shape)
        self.rebuilt = rebuilt if rebuilt is not None else _rebuilt
        rebuilt = self.rebuilt
        with torch.no_grad():
            target, rebuilt = _bits(original.detach().to(self.device)), _bits(rebuilt(layer))
            differ = target != rebuilt
            index = differ.nonzero().squeeze(1)
            offset = target[index].long() - rebuilt[index].long()
            wide = (offset < -127) | (offset > 127)
            self.mask = _pack(differ).cpu() if index.numel() else None  # None: R is W (e.g. LoRA's base)
            self.offset = offset.clamp(-127, 127).to(torch.int8).cpu()
            self.wide_at = wide.nonzero().squeeze(1).cpu()
            self.wide_bits = target[index[wide]].cpu()
            self.fingerprint = _fingerprint(target)

    def nbytes(self) -> int:
        kept = (self.mask, self.offset, self.wide_at, self.wide_bits)
        return sum(t.numel() * t.element_size() for t in kept if t is not None)

    def weight(self, layer) -> tuple[torch.Tensor, bool]:
        """``(W (out, in), whether its fingerprint matches the original's)`` from the adapted ``layer``."""
        home = layer.weight.device
        try:
            layer.to(self.device)
        except Exception:  # the device is gone (e.g. the failure was the device's): compute where it is
            pass
        rebuilt = self.rebuilt(layer)
        try:
            layer.to(home)  # a further adapter's layer stays in the model
        except Exception:
            pass
        dtype = rebuilt.dtype
        bits = _bits(rebuilt).clone()
        if self.mask is not None:
            index = _unpack(self.mask.to(bits.device), bits.numel()).nonzero().squeeze(1)
            bits[index] = (bits[index].long() + self.offset.to(bits.device).long()).to(bits.dtype)
            bits[index[self.wide_at.to(bits.device)]] = self.wide_bits.to(bits.device)
        exact = _fingerprint(bits) == self.fingerprint
        return bits.view(dtype).reshape(self.shape).to(home), exact


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as bits, 8 per uint8 (little-endian within a byte)."""
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-mask.numel()) % 8)).view(-1, 8)
    return (padded * _POWERS.to(mask.device)).sum(1, dtype=torch.int32).to(torch.uint8)


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    powers = _POWERS.to(packed.device)
    return ((packed.unsqueeze(1) & powers) != 0).reshape(-1)[:n]


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
