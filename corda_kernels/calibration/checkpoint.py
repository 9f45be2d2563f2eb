"""Atomic, verifiable checkpoints of a running calibration, so a killed run resumes where it was.

A checkpoint directory holds ``state-<batches>.safetensors`` (the fp32 accumulators, their token
counts and the torch RNG state) and ``manifest.json`` (which state file is current, its SHA-256,
the number of batches done, a running fingerprint of the data consumed, and a fingerprint of the
model and targets). Both are written to temporary names and moved into place with ``os.replace``,
the manifest last, so at any instant the manifest names a complete state file. On resume the
manifest must match the model, the targets, the options and the data (the skipped batches are
re-read and hashed); otherwise the checkpoint is refused with the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Optional

import torch
from torch import nn

from .._files import file_digest, remove_stale_temporaries, write_atomic

MANIFEST = "manifest.json"
FORMAT = 1


def model_fingerprint(model: nn.Module) -> str:
    """Hash of parameter names, shapes, dtypes and a cheap sample (64 values) of each one."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        w = param.detach()
        sample = w.flatten()[:: max(1, w.numel() // 64)][:64].float().cpu()
        digest.update(f"{name}:{tuple(w.shape)}:{w.dtype}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def update_data_fingerprint(previous: str, batch: Mapping) -> str:
    """Running hash over the batches consumed: hash(previous || input_ids || attention_mask)."""
    digest = hashlib.sha256(previous.encode())
    for key in ("input_ids", "attention_mask"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            digest.update(str(tuple(value.shape)).encode())
            digest.update(value.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


class CheckpointMismatch(ValueError):
    """The checkpoint on disk does not belong to this run (or is damaged)."""


class CalibrationCheckpoint:
    def __init__(self, directory: str, identity: dict):
        """``identity``: what must match to resume (model fingerprint, targets, options)."""
        self.directory = directory
        self.identity = identity

    def load(self) -> Optional[dict]:
        """The saved state, or None if there is none; raises CheckpointMismatch if unusable.

        Run at the start of a calibration: first removes the temporaries of a run killed while
        writing this checkpoint (``kill -9`` leaves them; nothing else ever would)."""
        remove_stale_temporaries(self.directory, _is_checkpoint_file)
        path = os.path.join(self.directory, MANIFEST)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as fh:
                manifest = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointMismatch(
                f"checkpoint manifest {path} is unreadable ({exc}); delete {self.directory} to start over"
            ) from None
        if manifest.get("format") != FORMAT:
            raise CheckpointMismatch(
                f"checkpoint {self.directory} has format {manifest.get('format')}, expected {FORMAT}"
            )
        for key, value in self.identity.items():
            if manifest["identity"].get(key) != value:
                raise CheckpointMismatch(
                    f"checkpoint {self.directory} was written for a different {key.replace('_', ' ')} "
                    f"({_short(manifest['identity'].get(key))} vs {_short(value)} now); use another checkpoint_dir "
                    "or delete it to start over"
                )
        state_path = os.path.join(self.directory, manifest["state_file"])
        if not os.path.exists(state_path) or file_digest(state_path, "sha256") != manifest["sha256"]:
            raise CheckpointMismatch(f"checkpoint state {state_path} is missing or corrupted (checksum mismatch)")
        from safetensors.torch import load_file

        manifest["tensors"] = load_file(state_path)
        return manifest

    def save(self, *, tensors: dict[str, torch.Tensor], batches_done: int, data_fingerprint: str, extra: dict) -> None:
        from safetensors.torch import save_file

        os.makedirs(self.directory, exist_ok=True)
        state_file = f"state-{batches_done}.safetensors"
        state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        write_atomic(os.path.join(self.directory, state_file), lambda tmp: save_file(state, tmp))
        manifest = {
            "format": FORMAT,
            "identity": self.identity,
            "state_file": state_file,
            "sha256": file_digest(os.path.join(self.directory, state_file), "sha256"),
            "batches_done": batches_done,
            "data_fingerprint": data_fingerprint,
            **extra,
        }

        def write_manifest(tmp):
            with open(tmp, "w") as fh:
                json.dump(manifest, fh)

        write_atomic(os.path.join(self.directory, MANIFEST), write_manifest)
        for name in os.listdir(self.directory):
            if name.startswith("state-") and name != state_file:
                os.remove(os.path.join(self.directory, name))


def _is_checkpoint_file(name: str) -> bool:
    return name == MANIFEST or (name.startswith("state-") and name.endswith(".safetensors"))


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."
