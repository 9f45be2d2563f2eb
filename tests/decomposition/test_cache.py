"""Decomposition cache: hits give identical adapters without decomposing; any change misses; damage is recomputed."""

import copy
import glob
import os
import warnings

import pytest
import torch

import corda_kernels as ck
from corda_kernels.methods import CorDA
from corda_kernels.testing import tiny_llama, token_batches


@pytest.fixture
def decomposed(monkeypatch):
    """Names of the layers actually decomposed (CorDA.init_batch calls) since the last clear()."""
    names = []
    real = CorDA.init_batch

    def spy(self, batch):
        names.extend(batch.names)
        return real(self, batch)

    monkeypatch.setattr(CorDA, "init_batch", spy)
    return names


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(layers=2)
    batches = token_batches(128, n_batches=2, batch=2, seq=12)
    return model, batches, ck.calibrate(model, batches, progress=False)


def _adapters(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ck.LowRankLinear)}


def _same(a, b):
    a, b = _adapters(a), _adapters(b)
    assert a.keys() == b.keys()
    for name, layer in a.items():
        other = b[name]
        for t in ("A", "B", "weight"):
            assert torch.equal(getattr(layer, t), getattr(other, t)), (name, t)
        assert layer.init_stats == other.init_stats


def _apply(model, cal, cache, **kw):
    kw = {"rank": 4, **kw}
    return ck.apply(copy.deepcopy(model), "corda", covariances=cal, cache_dir=str(cache), progress=False, **kw)


def test_hit_skips_decomposition_and_gives_identical_adapters(setup, tmp_path, decomposed):
    model, batches, cal = setup
    first = _apply(model, cal, tmp_path)
    assert len(decomposed) == 14 and len(glob.glob(str(tmp_path / "*" / "*.json"))) == 14
    decomposed.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = _apply(model, cal, tmp_path)
    assert decomposed == []
    _same(first, second)
    _same(first, ck.apply(copy.deepcopy(model), "corda", rank=4, covariances=cal, progress=False))
    # Packed storage holds the same covariances: same entries.
    decomposed.clear()
    _apply(model, ck.calibrate(model, batches, progress=False, storage="packed"), tmp_path)
    assert decomposed == []


def test_any_change_misses(setup, tmp_path, decomposed):
    model, batches, cal = setup
    _apply(model, cal, tmp_path)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    cases = {
        "weight": lambda: _apply(changed, cal, tmp_path),
        "rank": lambda: _apply(model, cal, tmp_path, rank=3),
        "alpha": lambda: _apply(model, cal, tmp_path, alpha=8),
        "seed": lambda: _apply(model, cal, tmp_path, seed=1),
        "mode": lambda: _apply(model, cal, tmp_path, mode="kpa"),
        "damp": lambda: _apply(model, cal, tmp_path, damp=0.02),
        "covariances": lambda: _apply(model, ck.calibrate(model, batches[:1], progress=False), tmp_path),
    }
    for what, run in cases.items():
        decomposed.clear()
        run()
        expected = ["model.layers.1.mlp.down_proj"] if what == "weight" else sorted(cal.groups)
        assert sorted(decomposed) == expected, what


def test_damaged_entries_are_recomputed(setup, tmp_path, decomposed):
    model, _, cal = setup
    first = _apply(model, cal, tmp_path)
    tensors = sorted(glob.glob(str(tmp_path / "*" / "*.safetensors")))
    manifests = sorted(glob.glob(str(tmp_path / "*" / "*.json")))
    with open(tensors[0], "r+b") as fh:  # flip a byte of the data
        fh.seek(os.path.getsize(tensors[0]) - 3)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.remove(tensors[1])
    with open(manifests[2], "w") as fh:
        fh.write("{ not json")
    decomposed.clear()
    with pytest.warns(UserWarning, match="cache entry of layer .* is damaged") as record:
        again = _apply(model, cal, tmp_path)
    assert len(record) == 3 and len(decomposed) == 3
    _same(first, again)
    decomposed.clear()
    _apply(model, cal, tmp_path)  # rewritten
    assert decomposed == []


def test_blockwise_uses_the_cache(setup, tmp_path, decomposed):
    model, batches, _ = setup
    run = lambda: ck.apply_blockwise(
        copy.deepcopy(model), batches, "corda", rank=4, cache_dir=str(tmp_path), progress=False
    )  # noqa: E731
    first = run()
    assert len(decomposed) == 14
    decomposed.clear()
    second = run()
    assert decomposed == []
    _same(first, second)


EDITS = {  # manifest field -> an edit that would change the adapters (or what is checked) if trusted
    "scale": lambda f: {**f, "scale": f["scale"] * 2},
    "subtract": lambda f: {**f, "subtract": not f["subtract"]},
    "trainable": lambda f: {**f, "trainable": ["B"]},
    "stats": lambda f: {**f, "stats": {**f["stats"], "energy": 0.5}},
}


@pytest.mark.parametrize("field", sorted(EDITS) + ["layer", "format"])
def test_edited_manifest_fields_are_detected_and_recomputed(setup, tmp_path, decomposed, field):
    """Every manifest field that affects the result is covered by the entry's digest: an edited
    field is detected, reported (CordaWarning) and the layer recomputed, like a damaged tensor file."""
    import json

    model, _, cal = setup
    target = "model.layers.0.mlp.down_proj"
    first = _apply(model, cal, tmp_path, target_modules=[target])
    (path,) = glob.glob(str(tmp_path / "*" / "*.json"))
    with open(path) as fh:
        manifest = json.load(fh)
    if field in EDITS:
        manifest["fields"] = EDITS[field](manifest["fields"])
    elif field == "layer":
        manifest["layer"] = "model.layers.1.mlp.down_proj"
    else:
        manifest["format"] = 1
    with open(path, "w") as fh:
        json.dump(manifest, fh)
    decomposed.clear()
    with pytest.warns(ck.CordaWarning, match=f"cache entry of layer {target} .* is damaged"):
        again = _apply(model, cal, tmp_path, target_modules=[target])
    assert decomposed == [target]
    _same(first, again)
    decomposed.clear()
    _apply(model, cal, tmp_path, target_modules=[target])  # rewritten: a hit again
    assert decomposed == []
