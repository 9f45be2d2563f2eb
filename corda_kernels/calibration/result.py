"""The result of calibration: per shared input, the per-token mean covariance, and its files.

Layers that receive the same input tensor (q/k/v after one norm, gate/up) form a *group* named
after its first layer and share one covariance ``C = Σ x xᵀ / n_tokens`` (fp32, symmetric).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..integrations import hf
from . import storage as _storage

NORMALIZATIONS = ("token_mean", "peft")


@dataclass
class Calibration:
    """Covariances of target layers' inputs: what :func:`corda_kernels.calibrate` returns.

    Layers that receive the same input tensor (q/k/v, gate/up) share one group and one covariance.
    Pass it to :func:`corda_kernels.apply` as ``covariances=``; its layers are then the default
    targets. :meth:`save` / :meth:`load` write and read it (safetensors + a JSON manifest).

    Attributes:
        covariances: group -> the stored covariance (the group is named after its first layer): a
            ``(d, d)`` fp32 symmetric matrix, or with ``storage="packed"`` its upper triangle as a
            1-D ``d (d + 1) / 2`` tensor (see :mod:`corda_kernels.calibration.storage`); use
            :meth:`covariance` for the full matrix.
        groups: module name -> group.
        token_counts: group -> tokens seen (forward calls for ``normalization="peft"``).
        normalization: ``"token_mean"`` (per-token mean over non-padding tokens) or ``"peft"``.
        batches: how many batches were streamed.
        meta: provenance, e.g. ``meta["tokens"]``, the tokens seen in all.
        storage: ``"full"`` or ``"packed"``.
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
        otherwise a new tensor (unpacked / copied) on every call.

        Raises:
            KeyError: ``module_name`` was not calibrated.
        """
        return _storage.expand(self.covariances[self.group(module_name)], self.storage, device)

    def group(self, module_name: str) -> str:
        """The group (shared input) of a layer: layers of one group have one covariance.

        Raises:
            KeyError: ``module_name`` was not calibrated (the message lists the calibrated layers).
        """
        if module_name not in self.groups:
            raise KeyError(f"no covariance for layer {module_name!r}; calibrated layers: {hf.named(self.groups)}")
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
    def load(cls, path: str, device=None) -> Calibration:
        """Read a calibration written by :meth:`save` (in the storage it was saved with) onto ``device``.

        Raises:
            ValueError: the tensor file lacks a group the manifest names.
        """
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
