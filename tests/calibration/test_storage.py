"""Covariance storage: packed upper triangles and CPU offload give the same adapters, in half the bytes."""

import copy

import pytest
import torch

import corda_kernels as ck
from corda_kernels.calibration import Calibration, storage
from corda_kernels.methods import CorDA
from corda_kernels.testing import tiny_llama, token_batches


@pytest.mark.parametrize("d", [1, 2, 7, 513, 1100])
def test_pack_round_trip_is_exact(d):
    x = torch.randn(3 * d + 1, d)
    C = ck.finalize_covariance(x.T @ x, 3)  # symmetric bit for bit
    packed = storage.pack(C)
    assert packed.shape == (d * (d + 1) // 2,) and storage.packed_dim(packed.numel()) == d
    assert torch.equal(storage.unpack(packed), C)
    assert torch.equal(torch.cat(list(storage.upper_segments(packed, "packed"))), packed)
    with pytest.raises(ValueError, match="d\\(d\\+1\\)/2"):
        storage.packed_dim(packed.numel() + 1)


def _adapters(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ck.LowRankLinear)}


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(layers=2, hidden=96, intermediate=160)
    batches = token_batches(128, n_batches=2, batch=2, seq=12)
    return model, batches


@pytest.mark.parametrize("storage_, covariance_device", [("packed", None), ("full", "cpu"), ("packed", "cpu")])
def test_same_adapters_as_default_storage(setup, storage_, covariance_device, monkeypatch):
    model, batches = setup
    full = ck.calibrate(model, batches, progress=False)
    other = ck.calibrate(model, batches, progress=False, storage=storage_, covariance_device=covariance_device)
    assert other.storage == storage_ and other.groups == full.groups
    for name in full.groups:
        assert torch.equal(other.covariance(name), full.covariance(name))
        assert other.covariance(name).device.type == "cpu"
    if covariance_device == "cpu" and torch.cuda.is_available():
        assert all(c.is_pinned() for c in other.covariances.values())

    # Each shared covariance is stacked (and damped) once per chunk even though unpacking makes new tensors.
    unique_per_chunk = []
    real = CorDA.init_batch

    def spy(self, batch):
        unique_per_chunk.append((len(batch.names), batch.covariances.unique.shape[0]))
        return real(self, batch)

    monkeypatch.setattr(CorDA, "init_batch", spy)
    a = ck.apply(copy.deepcopy(model), "corda", rank=4, covariances=full, progress=False)
    b = ck.apply(copy.deepcopy(model), "corda", rank=4, covariances=other, progress=False)
    half = len(unique_per_chunk) // 2
    assert unique_per_chunk[:half] == unique_per_chunk[half:]
    assert sum(u for _, u in unique_per_chunk[half:]) < sum(n for n, _ in unique_per_chunk[half:])
    for name, layer in _adapters(a).items():
        twin = _adapters(b)[name]
        assert torch.equal(layer.A, twin.A) and torch.equal(layer.B, twin.B) and torch.equal(layer.weight, twin.weight)


def test_packed_halves_the_bytes_held(setup, tmp_path):
    model, batches = setup
    full = ck.calibrate(model, batches, progress=False)
    packed = ck.calibrate(model, batches, progress=False, storage="packed")
    dims = [c.shape[0] for c in full.covariances.values()]
    assert full.nbytes == sum(4 * d * d for d in dims)
    assert packed.nbytes == sum(4 * d * (d + 1) // 2 for d in dims)
    assert packed.nbytes / full.nbytes < 0.51

    packed.save(str(tmp_path))
    back = Calibration.load(str(tmp_path))
    assert back.storage == "packed" and back.nbytes == packed.nbytes
    assert all(torch.equal(back.covariance(n), full.covariance(n)) for n in full.groups)
    assert all(torch.equal(back.per_module()[n], full.covariance(n)) for n in full.groups)


def test_bad_options():
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match="storage must be one of"):
        ck.calibrate(model, token_batches(128, n_batches=1), storage="triangle", progress=False)
    with pytest.raises(ValueError, match="covariance_device must be None or .cpu."):
        ck.calibrate(model, token_batches(128, n_batches=1), covariance_device="disk", progress=False)
