"""Calibration checkpoints: a killed run resumes to the uninterrupted result; foreign ones are refused."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import corda_kernels as ck
from corda_kernels.calibration.checkpoint import MANIFEST, CheckpointMismatch
from corda_kernels.testing import tiny_llama, token_batches

HERE = os.path.dirname(__file__)


def _assert_same(a, b):
    assert a.groups == b.groups and a.token_counts == b.token_counts and a.batches == b.batches
    for g in a.covariances:
        assert torch.equal(a.covariances[g], b.covariances[g]), g


def _interrupted(batches, after):
    for i, b in enumerate(batches):
        if i == after:
            raise KeyboardInterrupt
        yield b


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    model = tiny_llama()
    batches = token_batches(128, n_batches=7, seed=3)
    full = ck.calibrate(model, batches, progress=False)
    with pytest.raises(KeyboardInterrupt):
        ck.calibrate(model, _interrupted(batches, 5), progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    assert '"batches_done": 4' in (tmp_path / MANIFEST).read_text()
    resumed = ck.calibrate(model, batches, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    _assert_same(resumed, full)
    # A finished run restarts from its final state without recomputing.
    again = ck.calibrate(model, batches, progress=False, checkpoint_dir=str(tmp_path))
    _assert_same(again, full)


def test_stale_temporaries_are_removed_on_start(tmp_path):
    """kill -9 during a checkpoint write leaves write_atomic's temporaries (no except clause runs):
    the next run on that checkpoint removes them (and only them) and resumes to the same result."""
    model = tiny_llama(layers=1)
    batches = token_batches(128, n_batches=4, seed=3)
    full = ck.calibrate(model, batches, progress=False)
    with pytest.raises(KeyboardInterrupt):
        ck.calibrate(model, _interrupted(batches, 3), progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    orphans = [".tmp-a1b2c3d4state-4.safetensors", ".tmp-z9y8x7w6manifest.json"]
    others = [".tmp-q1w2e3r4notes.txt", "notes.txt"]  # not this checkpoint's temporaries: kept
    for name in orphans + others:
        (tmp_path / name).write_bytes(b"partial")
    resumed = ck.calibrate(model, batches, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    _assert_same(resumed, full)
    left = set(os.listdir(tmp_path))
    assert not left & set(orphans) and set(others) <= left


def test_foreign_or_damaged_checkpoints_are_refused(tmp_path):
    model = tiny_llama()
    batches = token_batches(128, n_batches=3)
    ck.calibrate(model, batches, progress=False, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.raises(CheckpointMismatch, match="different model"):
        ck.calibrate(tiny_llama(seed=1), batches, progress=False, checkpoint_dir=str(tmp_path))
    with pytest.raises(CheckpointMismatch, match="different targets"):
        ck.calibrate(model, batches, ["q_proj"], progress=False, checkpoint_dir=str(tmp_path))
    with pytest.raises(CheckpointMismatch, match="different normalization"):
        ck.calibrate(model, batches, normalization="peft", progress=False, checkpoint_dir=str(tmp_path))
    with pytest.raises(CheckpointMismatch, match="different calibration data"):
        ck.calibrate(model, token_batches(128, n_batches=3, seed=9), progress=False, checkpoint_dir=str(tmp_path))
    with pytest.raises(CheckpointMismatch, match="ended after 2 batches"):
        ck.calibrate(model, batches[:2], progress=False, checkpoint_dir=str(tmp_path))
    state = next(p for p in tmp_path.iterdir() if p.name.startswith("state-"))
    data = bytearray(state.read_bytes())
    data[-5] ^= 0xFF
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointMismatch, match="corrupted"):
        ck.calibrate(model, batches, progress=False, checkpoint_dir=str(tmp_path))
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointMismatch, match="unreadable"):
        ck.calibrate(model, batches, progress=False, checkpoint_dir=str(tmp_path))


WORKER = textwrap.dedent(
    """
    import sys, time
    import torch, corda_kernels as ck
    from corda_kernels.testing import tiny_llama, token_batches

    def slow(batches):
        for b in batches:
            time.sleep(0.3)
            yield b

    model = tiny_llama()
    cal = ck.calibrate(model, slow(token_batches(128, n_batches=8, seed=5)), progress=False,
                       checkpoint_dir=sys.argv[1], checkpoint_every=1)
    cal.save(sys.argv[2])
    """
)


def test_killed_process_resumes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format())
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(out)])
    deadline = time.time() + 120
    while time.time() < deadline and '"batches_done": 3' not in _read(ckpt / MANIFEST):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "worker finished before it could be killed"
    subprocess.run([sys.executable, str(script), str(ckpt), str(out)], check=True, timeout=300)
    resumed = ck.Calibration.load(str(out))
    full = ck.calibrate(tiny_llama(), token_batches(128, n_batches=8, seed=5), progress=False)
    _assert_same(resumed, full)


def _read(path):
    try:
        return path.read_text()
    except OSError:
        return ""
