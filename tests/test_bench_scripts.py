"""The GPU-sized bench scripts, run at stand-in sizes: they must measure what they claim."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import bench_decompose_7b as b7  # noqa: E402


def test_decompose_7b_stand_in():
    args = b7.parse(["--device", "cpu", "--blocks", "2", "--hidden", "64", "--intermediate", "160", "--heads", "2",
                     "--rank", "4", "--vocab", "100"])  # fmt: skip
    calibration = b7.synthetic_calibration(b7.build_model(args, "meta"), torch.device("cpu"))
    assert len(calibration.covariances) == 8 and len(calibration.groups) == 14
    for group, C in calibration.covariances.items():
        torch.testing.assert_close(C, C.T, rtol=0, atol=0)
        assert torch.linalg.eigvalsh(C.double()).min() > 0, group  # full rank: 2 d tokens
    ids = torch.randint(0, 100, (2, 8))
    for mode in ("ipa", "kpa"):
        ours = b7.time_ours(args, calibration, torch.device("cpu"), mode, ids)
        assert ours["layers"] == 14 and ours["delta"] < 1e-4
    pytest.importorskip("peft")
    anchor = b7.time_peft(args, calibration, torch.device("cpu"))
    assert anchor["layers"] == 7 and anchor["extrapolated"] == pytest.approx(2 * anchor["seconds"])


def test_blockwise_7b_stand_in():
    import bench_blockwise_7b as bw

    args = bw.parse(["--device", "cpu", "--blocks", "2", "--hidden", "64", "--intermediate", "160", "--heads", "2",
                     "--rank", "4", "--vocab", "100", "--samples", "4", "--seq-len", "16", "--batch-size", "2"])  # fmt: skip
    device = torch.device("cpu")
    assert bw.ours_blockwise(args, device)["layers"] == 14
    assert bw.ours_whole(args, device)["covariances"] == 8  # q/k/v and gate/up share theirs
    assert bw.estimate(args, blockwise=True) > 0 and bw.estimate(args, blockwise=False) > 0
    pytest.importorskip("peft")
    assert bw.peft_whole(args, device)["covariances"] == 14  # one per module
