"""Mean |x| per input channel of each target layer, recorded alongside calibration.

What: :class:`MeanAbsInputs` hooks the target layers while :func:`~corda_kernels.calibration.calibrate`
runs and sums ``|x|`` per input channel over the non-padding tokens, with no forward pass of its
own. Why: the ASVD paper scales input channels by mean ``|x|`` (not by the RMS the covariance
gives); :class:`~corda_kernels.methods.asvd.MeanAbsASVD` takes these magnitudes, and
``corda-kernels report`` compares it with SVD and CO-SVD on the same calibration passes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..integrations import hf


class MeanAbsInputs:
    """``with MeanAbsInputs(model, layers) as rec: <forward passes>``; then ``rec.result(batches)``
    is ``{layer: (in,) fp64}``, the mean |x| of each input channel over the non-padding tokens of
    the forwards of ``batches`` (the last ``len(batches)`` forwards: calibration's own passes,
    after its 2-token probe), without a forward pass of its own.

    Each forward's sums go into one fp64 buffer allocated when that forward starts (slices per
    layer, added in place): a small tensor kept per layer and forward, allocated between the
    forward's large temporaries, fragmented the heap (measured: ~2.8 GB of freed but resident
    memory over SmolLM2's calibration at the report's defaults)."""

    def __init__(self, model: nn.Module, layers: dict):
        self.model, self.layers, self.forwards = model, layers, []
        widths = [hf.in_out_features(m)[0] for m in layers.values()]
        offsets = [sum(widths[:i]) for i in range(len(widths))]
        self.slices = {n: slice(o, o + w) for n, o, w in zip(layers, offsets, widths)}
        self.width = sum(widths)

    def _start(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        sums = torch.zeros(self.width, dtype=torch.float64)
        self.forwards.append({"shape": tuple(ids.shape), "mask": mask.bool(), "sums": sums, "seen": set()})

    def _record(self, name):
        def record(module, args):
            current = self.forwards[-1]
            x = args[0].detach()
            x = x[current["mask"]] if x.shape[:2] == current["mask"].shape else x.reshape(-1, x.shape[-1])
            current["sums"][self.slices[name]] += x.abs().double().sum(0).cpu()
            current["seen"].add(name)

        return record

    def __enter__(self):
        self.handles = [self.model.register_forward_pre_hook(self._start, with_kwargs=True)]
        self.handles += [m.register_forward_pre_hook(self._record(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def result(self, batches: Sequence[dict]) -> dict:
        passes = self.forwards[-len(batches) :] if batches else []
        shapes = [tuple(b["input_ids"].shape) for b in batches]
        if [p["shape"] for p in passes] != shapes or any(p["seen"] != set(self.layers) for p in passes):
            raise RuntimeError("mean |x|: the recorded forward passes do not line up with the calibration batches")
        count = sum(int(p["mask"].sum()) for p in passes)
        total = sum(p["sums"] for p in passes)
        return {n: total[self.slices[n]] / count for n in self.layers}
