"""Forward hooks that stream each target layer's input into its group's fp32 covariance.

Layers that receive the *same input tensor* in a forward pass (q/k/v after one norm, gate/up) share
one accumulator: the sharing is detected at run time from tensor identity, not from layer names,
so it holds for any architecture. Padding is excluded through the batch's ``attention_mask``.

Encoder-decoder models (T5, BART): layers of the decoder stack use the batch's
``decoder_attention_mask`` (no mask when it is not given: a causal decoder has no padding unless
told), except the cross-attention projections whose input is the encoder's output, which use the
encoder's ``attention_mask``. The stack, not the sequence length, decides: the two lengths may be
equal.
"""

from __future__ import annotations

import weakref
from typing import Mapping, Optional

import torch
from torch import nn

from .. import _backend
from ..integrations import hf
from ..integrations.hf import StopForward
from ..ops.covariance import CovarianceAccumulator, finalize_covariance
from . import sharding
from . import storage as _storage
from .result import NORMALIZATIONS, Calibration


def _probe_slice(key: str, value, ids_shape):
    """The first sequence's first 2 tokens of a per-token tensor (``input_ids``-aligned, or a
    ``decoder_*`` one, whose length may differ), the first sample of any other per-sample one."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != ids_shape[0]:
        return value
    if value.shape[:2] == ids_shape[:2] or (key.startswith("decoder_") and value.dim() == 2):
        return value[:1, :2]
    return value[:1]


class CovarianceRecorder:
    """Forward pre-hooks that route each target's input to its group's accumulator.

    On the first batch a layer whose input tensor *is* a tensor another layer already received in
    this forward pass joins that layer's group; on later batches the grouping is enforced (a group
    member receiving a different tensor than its group in the same pass is an error, never a
    silent mix). Tensors are tracked with weak references, so no activation is kept alive.
    """

    def __init__(
        self,
        targets: Mapping[str, nn.Module],
        *,
        normalization: str = "token_mean",
        upper_only: bool = True,
        decoder: Optional[str] = None,
        encoder: Optional[nn.Module] = None,
    ):
        """``decoder``: the name of an encoder-decoder model's decoder module (its targets use the
        decoder mask); ``encoder``: the encoder module, whose output marks cross-attention inputs."""
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        self.targets = dict(targets)
        self.in_decoder = {n for n in self.targets if decoder is not None and n.startswith(decoder + ".")}
        self.encoder = encoder
        self._encoder_output: Optional[weakref.ref] = None
        self._decoder_mask: Optional[torch.Tensor] = None
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
        self._probe_inputs: dict[str, tuple[int, torch.device]] = {}  # group -> (in features, device)

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> CovarianceRecorder:
        if self.encoder is not None:
            self._handles.append(self.encoder.register_forward_hook(self._encoder_done))
        for name, module in self.targets.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
            self._handles.append(module.register_forward_hook(self._after))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start_batch(
        self,
        index: int,
        attention_mask: Optional[torch.Tensor],
        decoder_attention_mask: Optional[torch.Tensor] = None,
    ) -> None:
        if self._expected is None and self._calls:
            self._expected = dict(self._calls)  # the first batch ran the whole forward
        self.batch_index = index
        self._mask = None if attention_mask is None else attention_mask.bool()
        self._decoder_mask = None if decoder_attention_mask is None else decoder_attention_mask.bool()
        self._encoder_output = None
        self._seen.clear()
        self._calls = {}
        self._remaining = sum(self._expected.values()) if self._expected else -1

    def probe(self, model: nn.Module, batch: Mapping) -> None:
        """Run a 2-token slice of ``batch`` to learn, without recording anything, which targets share
        an input (:attr:`groups`) and how often each runs per forward, so that every real batch can
        stop after the last target. Works on a ``meta``-device model (memory estimates)."""
        ids = batch["input_ids"]
        tiny = {k: _probe_slice(k, v, ids.shape) for k, v in batch.items()}
        self.probing, self._calls, self._remaining = True, {}, -1
        self._seen.clear()
        try:
            with torch.no_grad():
                model(**tiny)  # with its KV cache: 2 tokens, and transformers' uncached mask path cannot run on meta
        except StopForward:
            pass
        finally:
            self.probing = False
            self._seen.clear()
        self._expected = dict(self._calls)
        # Every accumulator now, before the first real forward: allocated between that forward's
        # transient activations they fragment the heap (measured on SmolLM2, 8x256 tokens: ~270 MB
        # of freed-but-resident memory), and a run that cannot hold them all fails before any work.
        for group, (dim, device) in self._probe_inputs.items():
            if group not in self.accumulators and device.type != "meta":
                self.accumulators[group] = self._new_accumulator(group, dim, device)

    def _encoder_done(self, module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
        self._encoder_output = weakref.ref(hidden) if isinstance(hidden, torch.Tensor) else None

    def mask_for(self, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The token mask of layer ``name``'s input ``x``: its stack's mask (module docstring)."""
        if name not in self.in_decoder:
            return self._mask
        if self._encoder_output is not None and self._encoder_output() is x:
            return self._mask  # cross-attention key/value: the encoder's tokens
        return self._decoder_mask

    def _after(self, module, args, output):
        if self.stop_early and self._remaining == 0:
            raise StopForward

    # -- the hook ------------------------------------------------------------------------------
    def _hook(self, name: str):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                raise TypeError(
                    f"layer {name}: expected a tensor as first input, "
                    f"got {type(args[0]).__name__ if args else 'nothing'}"
                )
            self.record(name, args[0])

        return hook

    def record(self, name: str, x: torch.Tensor) -> None:
        self._calls[name] = self._calls.get(name, 0) + 1
        self._remaining -= 1
        group = self.groups.get(name)
        if group is None:  # first forward: join the group whose input is this very tensor, if any
            group = next((g for g, ref in self._seen.items() if ref() is x), name)
            self.groups[name] = group
        if self.probing:
            self._seen.setdefault(group, weakref.ref(x))
            self._probe_inputs.setdefault(group, (x.shape[-1], x.device))
            return
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
        if acc is None:
            acc = self.accumulators[group] = self._new_accumulator(group, x.shape[-1], x.device)
        where = f"layer {name} (batch {self.batch_index})"
        if self.normalization == "peft":  # PEFT: x / |max x| per call, counted as one
            scale = float(x.max().abs())
            acc.update(x / scale if scale > 0 else x, name=where, count=1)
            return
        mask = self.mask_for(name, x)
        if mask is not None and tuple(mask.shape) != tuple(x.shape[:-1]):
            # e.g. routed tokens of a mixture-of-experts layer: not (batch, sequence)
            _backend.warn(
                f"layer {name}: input shape {tuple(x.shape)} does not line up with the token mask "
                f"{tuple(mask.shape)}; its padding tokens cannot be excluded from its covariance",
                stacklevel=4,
            )
            mask = None
        if mask is not None and mask.device != x.device:
            mask = mask.to(x.device)
        acc.update(x, mask, name=where)

    def _new_accumulator(self, group: str, dim: int, device=None) -> CovarianceAccumulator:
        device = self.targets[group].weight.device if device is None else device
        return CovarianceAccumulator(dim, device=device, upper_only=self.upper_only, name=group)

    def all_reduce(self, group, batches: int, tokens: int) -> tuple[int, int]:
        """Sum every rank's accumulators into this recorder (:mod:`~corda_kernels.calibration.sharding`);
        returns the total ``(batches, tokens)``."""
        self.groups, self.accumulators, batches, tokens = sharding.all_reduce_accumulators(
            self.groups, self.accumulators, list(self.targets), self._new_accumulator, group, batches, tokens
        )
        return batches, tokens

    # -- checkpoint state ----------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every group's accumulator state (``CovarianceAccumulator.state_dict``) as flat
        ``"{key}/{group}"`` tensors (``cov/...``, ``count/...``), as a checkpoint file stores them."""
        return {
            f"{key}/{group}": value
            for group, acc in self.accumulators.items()
            for key, value in acc.state_dict().items()
        }

    def load_state(self, tensors: Mapping[str, torch.Tensor], groups: Mapping[str, str]) -> None:
        """Restore :meth:`state_tensors`' accumulators (``CovarianceAccumulator.load_state_dict``) and the grouping."""
        self.groups = dict(groups)
        for key, cov in tensors.items():
            if not key.startswith("cov/"):
                continue
            group = key[4:]
            acc = self._new_accumulator(group, cov.shape[0])
            acc.load_state_dict({"cov": cov, "count": tensors[f"count/{group}"]})
            self.accumulators[group] = acc

    # -- result --------------------------------------------------------------------------------
    def result(self, storage: str = "full", device: Optional[str] = None) -> Calibration:
        """Finalize every accumulator in place (single use) and keep it as ``storage`` on ``device``
        (see :mod:`corda_kernels.calibration.storage`); each full accumulator is released as soon as its stored
        form exists."""
        never = [n for n in self.targets if n not in self.groups]
        if never:
            raise RuntimeError(f"target layers never ran during calibration: {hf.named(never)}")
        covariances, counts = {}, {}
        for group, acc in self.accumulators.items():
            if acc.count == 0:
                raise ValueError(
                    f"layer {group} saw no tokens: every calibration token was padding (attention_mask all 0), "
                    "or the layer ran on the 2-token probe but on no real batch"
                )
            full = finalize_covariance(acc.cov, acc.count, upper_only=self.upper_only, inplace=True)
            acc.cov = None
            covariances[group] = _storage.keep(full, storage, device)
            counts[group] = acc.count
        return Calibration(
            covariances, dict(self.groups), counts, self.normalization, self.batch_index + 1, storage=storage
        )
