"""Decomposition cache: each layer's :class:`LayerInit` on disk, keyed by what determines it.

``apply(..., cache_dir=d)`` / ``apply_blockwise(..., cache_dir=d)`` / ``decompose(..., cache_dir=d)``
read a layer's init back instead of decomposing it when nothing that determines it changed: the
method's class and options (its public attributes, after ``prepare``), the rank, the LoRA scaling,
the seed, the layer's name, its weight (dtype, shape and a blake2b digest of the bytes) and device
type, and its input covariance (a digest of the upper triangle, so full and packed storage share
entries), plus the package version and this file's format.

Layout: ``<cache_dir>/<key[:2]>/<key>.safetensors`` holds the tensors (A, B and the optional diag /
row_index / col_index) and ``<key>.json`` the rest (scale, subtract, trainable, stats) with a
digest covering the safetensors file and every manifest field (so an edited ``scale`` or
``subtract`` is caught like a damaged tensor file). Both are written to a temporary file and
renamed into place, the manifest last, so an interrupted write leaves no entry. An entry whose
manifest cannot be read, whose tensor file is missing, or whose digest does not match is reported
(a :class:`~corda_kernels._backend.CordaWarning`) and recomputed (then overwritten).

Digest cost: blake2b runs at about 1 GB/s on one CPU core; weights on a GPU are copied to the host
in 64 MiB pieces to be hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Optional

import torch

from .. import _backend
from .._files import file_digest, write_atomic
from .._version import __version__
from ..calibration import storage as _storage
from ..methods.base import InitMethod, LayerInit
from .plan import LayerJob, covariance_for

FORMAT = 2
CHUNK_BYTES = 64 << 20
_TENSOR_FIELDS = ("A", "B", "diag", "row_index", "col_index")


def _update_with_rows(digest, rows: torch.Tensor) -> None:
    """Hash a tensor's elements in logical row-major order, ``CHUNK_BYTES`` at a time."""
    rows = rows.detach().reshape(1, -1) if rows.dim() < 2 else rows.detach().flatten(1)
    step = max(1, CHUNK_BYTES // max(1, rows[0].numel() * rows.element_size()))
    for i in range(0, rows.shape[0], step):
        part = rows[i : i + step].to("cpu").contiguous()
        digest.update(part.view(torch.uint8).numpy())


def tensor_digest(t: torch.Tensor) -> str:
    """blake2b (20 bytes, hex) of a tensor's dtype, shape and element bytes (layout-independent)."""
    digest = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=20)
    _update_with_rows(digest, t)
    return digest.hexdigest()


def covariance_digest(stored: torch.Tensor, storage: str = "full") -> str:
    """Digest of a covariance's upper triangle (the same for its full and its packed form)."""
    d = _storage.packed_dim(stored.numel()) if storage == "packed" else stored.shape[-1]
    digest = hashlib.blake2b(f"upper {stored.dtype} d={d}".encode(), digest_size=20)
    for segment in _storage.upper_segments(stored, storage):
        _update_with_rows(digest, segment)
    return digest.hexdigest()


def describe(value):
    """A JSON-able description of a method option: plain values as they are, tensors by digest,
    containers element-wise, anything else (e.g. a callable) by its type and qualified name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_digest(value)}
    if isinstance(value, Mapping):
        return {str(k): describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [describe(v) for v in value]
    return f"{type(value).__module__}.{getattr(value, '__qualname__', type(value).__qualname__)}"


def method_fingerprint(method: InitMethod) -> dict:
    options = {k: describe(v) for k, v in sorted(vars(method).items()) if not k.startswith("_")}
    return {"class": f"{type(method).__module__}.{type(method).__qualname__}", "options": options}


def _entry_digest(name: str, fields: dict, tensors_digest: str) -> str:
    """Digest of an entry: the layer, every manifest field and the tensor file's digest."""
    text = json.dumps({"layer": name, "fields": fields, "tensors": tensors_digest}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


class DecompositionCache:
    """Per-layer :class:`LayerInit` entries under ``directory`` for one ``method`` (after its
    ``prepare``), ``seed`` and set of ``covariances`` (a Calibration, a ``{name: C}`` map or None)."""

    def __init__(self, directory: str, method: InitMethod, seed: int, covariances=None, settings=None):
        self.directory = os.fspath(directory)
        self._settings = settings  # what asked for the entries (e.g. AdaptConfig.to_dict()): recorded, not keyed
        os.makedirs(self.directory, exist_ok=True)
        self._base = {"format": FORMAT, "version": __version__, "method": method_fingerprint(method), "seed": int(seed)}
        self._covariances = covariances if method.needs_covariance else None
        self._cov_digests: dict = {}

    def _covariance_digest(self, name: str) -> Optional[str]:
        cal = self._covariances
        if cal is None:
            return None
        if hasattr(cal, "group"):  # a Calibration: one digest per group, of the stored form
            key = cal.group(name)
            if key not in self._cov_digests:
                self._cov_digests[key] = covariance_digest(cal.covariances[key], cal.storage)
            return self._cov_digests[key]
        c = covariance_for(cal, name)
        if id(c) not in self._cov_digests:
            self._cov_digests[id(c)] = covariance_digest(c)
        return self._cov_digests[id(c)]

    def key(self, name: str, job: LayerJob) -> str:
        """The entry key (40 hex digits) of layer ``name`` decomposed as ``job`` (rank, scaling)."""
        weight = job.weight
        parts = dict(
            self._base,
            layer=name,
            rank=int(job.rank),
            scale=float(job.scale),
            device=weight.device.type,
            weight=tensor_digest(weight),
            covariance=self._covariance_digest(name),
        )
        return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=20).hexdigest()

    def read(self, jobs: Mapping[str, LayerJob]) -> dict[str, LayerInit]:
        """The cached inits among ``jobs`` (on each layer's device); missing or damaged ones are left out."""
        hits = {}
        for name, job in jobs.items():
            init = self.load(self.key(name, job), name, job.weight.device)
            if init is not None:
                hits[name] = init
        return hits

    def write(self, jobs: Mapping[str, LayerJob], inits: Mapping[str, LayerInit]) -> None:
        """Store every init of ``inits`` under the key of its job."""
        for name, init in inits.items():
            self.store(self.key(name, jobs[name]), name, init)

    def _paths(self, key: str) -> tuple[str, str]:
        base = os.path.join(self.directory, key[:2], key)
        return base + ".safetensors", base + ".json"

    def load(self, key: str, name: str, device) -> Optional[LayerInit]:
        """The cached init of layer ``name`` on ``device``, or None (missing or damaged: warned)."""
        from safetensors.torch import load_file

        tensors_path, manifest_path = self._paths(key)
        if not os.path.exists(manifest_path):
            return None
        try:
            with open(manifest_path) as fh:
                manifest = json.load(fh)
            if manifest.get("format") != FORMAT or manifest.get("layer") != name:
                raise ValueError(f"manifest is for {manifest.get('layer')!r}, format {manifest.get('format')!r}")
            if not os.path.exists(tensors_path):
                raise ValueError("its tensor file is missing")
            if _entry_digest(name, manifest["fields"], file_digest(tensors_path)) != manifest["digest"]:
                raise ValueError("its tensor file or manifest fields do not match the entry's digest")
            tensors = load_file(tensors_path, device=str(device))
            fields = dict(manifest["fields"], trainable=tuple(manifest["fields"]["trainable"]))
            return LayerInit(**tensors, **fields)
        except Exception as exc:  # any damage: recompute
            _backend.warn(
                f"decomposition cache entry of layer {name} ({manifest_path}) is damaged ({exc}); recomputing"
            )
            return None

    def store(self, key: str, name: str, init: LayerInit) -> None:
        """Write layer ``name``'s init under ``key`` (tensors first, then the manifest)."""
        from safetensors.torch import save_file

        tensors_path, manifest_path = self._paths(key)
        os.makedirs(os.path.dirname(tensors_path), exist_ok=True)
        tensors = {
            f: getattr(init, f).detach().contiguous().cpu() for f in _TENSOR_FIELDS if getattr(init, f) is not None
        }
        fields = {f.name: getattr(init, f.name) for f in dataclasses.fields(init) if f.name not in _TENSOR_FIELDS}
        fields["trainable"] = list(fields["trainable"])
        try:
            text = json.dumps({"format": FORMAT, "layer": name, "fields": fields, "digest": None})
        except TypeError as exc:
            _backend.warn(f"layer {name}'s init is not cached: its non-tensor fields are not JSON-able ({exc})")
            return
        write_atomic(tensors_path, lambda tmp: save_file(tensors, tmp))
        manifest = json.loads(text)
        manifest["digest"] = _entry_digest(name, manifest["fields"], file_digest(tensors_path))
        if self._settings is not None:
            manifest["settings"] = describe(self._settings)

        def write_manifest(tmp):
            with open(tmp, "w") as fh:
                json.dump(manifest, fh, indent=1)

        write_atomic(manifest_path, write_manifest)
