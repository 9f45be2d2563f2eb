"""``bench/gpu/run.sh``, the one-command GPU check: its CPU rehearsal (``--small``) runs every stage and
writes the table; a stage that overruns its budget is killed and the table is still written; the
targets are read off the rows as the README states them."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECK = os.path.join(ROOT, "bench", "gpu", "check.py")


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("gpu_check", CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rehearsal_runs_every_stage(tmp_path, check):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORDA_BENCH")}
    done = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu", "run.sh"), "--small", "--out", str(out), "--budget", "1500"],
        cwd=tmp_path,  # the script finds the repository itself
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["log.txt", "results.json", "table.md"]
    results = json.loads((out / "results.json").read_text())
    assert {name: st["status"] for name, st in results["stages"].items()} == {name: "ok" for name, _ in check.STAGES}
    stages = {r["stage"] for r in results["rows"]}
    assert stages == {"covariance", "lowrank", "quantized", "segmented", "svd", "corda7b", "dora"}
    assert results["env"]["peak_bf16_tflops"] > 0 and results["env"]["copy_gbps"] > 0
    assert results["env"]["build"]["would_build"] == []  # a CPU torch builds no extension
    assert "--no-build-isolation" in results["env"]["build"]["command"]
    assert results["tests"]["tests"] > 0 and results["tests"]["failed"] == 0  # collected, skipped without CUDA
    assert not results["failures"]
    table = (out / "table.md").read_text()
    assert table in done.stdout  # printed last
    for needle in ("## Stages", "## Timings", "## Targets", "anchor:peft", "ours:lora", "anchor:torch-bf16-mm"):
        assert needle in table or needle == "anchor:torch-bf16-mm", needle  # the bf16-mm anchor is GPU-only
    assert "ours:ipa" in table and "corda 14 targets" in table and "ours:kpa" not in table


def test_overrunning_stage_is_killed_and_the_table_still_written(tmp_path, check, monkeypatch):
    args = check.parse(["--small", "--out", str(tmp_path), "--stages", "svd", "--budget", "20"])
    monkeypatch.setitem(check.BENCH_SUITES, "svd", ["-c", "import time; time.sleep(120)"])
    run = check.Run(args)
    monkeypatch.setattr(run, "stage_env", lambda budget: (True, "skipped in this test"))

    def hanging_bench(name, budget):
        code, _ = run.call([sys.executable, *check.BENCH_SUITES[name]], budget)
        return code == 0, "hung"

    monkeypatch.setattr(run, "stage_bench", hanging_bench)
    start = time.monotonic()
    assert run.run() == 1
    assert time.monotonic() - start < 40
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stages"]["svd"]["status"] == "timed out"
    assert "| svd | timed out |" in (tmp_path / "table.md").read_text()
    assert "-> timed out" in (tmp_path / "log.txt").read_text()


def test_a_spent_budget_skips_the_remaining_stages(tmp_path, check, monkeypatch):
    args = check.parse(["--small", "--out", str(tmp_path), "--stages", "svd,corda7b", "--budget", "0"])
    run = check.Run(args)
    assert run.run() == 1
    stages = json.loads((tmp_path / "results.json").read_text())["stages"]
    assert {n: s["status"] for n, s in stages.items()} == {"env": "skipped", "svd": "skipped", "corda7b": "skipped"}


def _row(group, impl, ms, flops=None):
    return {"group": group, "impl": impl, "median": ms / 1e3, "flops": flops}


def test_targets_read_off_the_rows(check):
    cov = "cov d=4096 n=8192 bfloat16"
    flops = 8192 * 4096 * 4097
    rows = [
        _row(cov, "anchor:peft", 10.0),
        _row(cov, "anchor:torch-bf16-mm", 0.6),
        _row(cov, "ours:auto(checked)", 0.5, flops),  # 20x PEFT, 1.2x mm
        _row("lowrank 4096x4096 N=8192 r=16 bfloat16", "anchor:linear", 1.0),
        _row("lowrank 4096x4096 N=8192 r=16 bfloat16", "anchor:peft", 1.5),
        _row("lowrank 4096x4096 N=8192 r=16 bfloat16", "ours:lora", 1.05),
        _row("lowrank 4096x4096 N=8192 r=16 bfloat16", "ours:partial50", 1.2),
        _row("lowrank 4096x11008 N=8192 r=128 bfloat16", "anchor:linear", 1.0),
        _row("lowrank 4096x11008 N=8192 r=128 bfloat16", "ours:lora", 1.25),
        _row("corda 224 targets (32 blocks, hidden 4096, r 128)", "ours:ipa", 45_000),
    ]
    results = {"env": {"peak_bf16_tflops": 600.0}, "rows": rows}
    text = {k: v[0] for k, v in check.TARGETS.items()}
    by_target = {}
    for t in check.targets(results):
        by_target.setdefault(t["target"], []).append(t)
    assert [(t["value"], t["met"]) for t in by_target[text["cov_vs_peft"]]] == [(20.0, True)]
    assert [(t["value"], t["met"]) for t in by_target[text["cov_vs_mm"]]] == [(1.2, False)]
    tflops = flops / 0.5e-3 / 1e12
    assert by_target[text["cov_peak"]][0]["value"] == round(tflops / 600, 3)
    assert by_target[text["cov_peak"]][0]["met"] == (tflops / 600 >= 0.6)
    assert by_target[text["lora_vs_linear_r16"]][0]["met"] is True  # 1.05 <= 1.10
    assert by_target[text["lora_vs_linear_r128"]][0]["met"] is False  # 1.25 > 1.20
    assert by_target[text["lora_vs_peft"]][0]["value"] == pytest.approx(1.43, abs=0.01)
    assert by_target[text["partial_vs_dense"]][0]["met"] is False  # 1.2 / 1.05 > 1
    assert by_target[text["corda7b_ipa"]][0]["met"] is True
    table = check.render({"small": False, "started": "now", "budget_s": 540, "command": "x", "stages": {}, **results})
    assert "MISSED" in table and "| met |" in table


def test_a_stopped_test_run_is_counted_from_its_progress_lines(check):
    """The H200 run's test stage ran out of time before pytest wrote its junit file: the verbose
    lines still say what finished (plain and xdist forms)."""
    out = "\n".join(
        [
            "[gw0] [  1%] PASSED tests/test_a.py::test_x[1]",
            "[gw1] [  2%] FAILED tests/test_a.py::test_y",
            "tests/test_b.py::test_z SKIPPED (needs a CUDA device) [  3%]",
            "tests/test_b.py::test_w PASSED                 [  4%]",
            "collected 9 items",
        ]
    )
    counts = check.progress_counts(out)
    assert counts["tests"] == 4 and counts["passed"] == 2 and counts["failed"] == 1 and counts["skipped"] == 1
    assert counts["first_failure"] == "tests/test_a.py::test_y" and counts["unfinished_run"]
