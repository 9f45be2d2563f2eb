"""The GPU-sized bench scripts, run at stand-in sizes as a user runs them: they must measure what
they claim (every layer adapted, the adapted model unchanged, PEFT's anchor timed)."""

import json
import os
import subprocess
import sys

import pytest

GPU_SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "gpu")
STAND_IN = [
    "--device",
    "cpu",
    "--blocks",
    "2",
    "--hidden",
    "64",
    "--intermediate",
    "160",
    "--heads",
    "2",
    "--rank",
    "4",
    "--vocab",
    "100",
]


def _run(script: str, args: list[str], tmp_path) -> dict:
    out = tmp_path / "result.json"
    subprocess.run(
        [sys.executable, os.path.join(GPU_SCRIPTS, script), *STAND_IN, *args, "--json", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.read_text())


def test_decompose_7b_stand_in(tmp_path):
    pytest.importorskip("peft")
    result = _run("decompose_7b.py", [], tmp_path)
    assert result["covariances"] == 8 and result["groups"] == 14  # q/k/v and gate/up share theirs
    for mode in ("ipa", "kpa"):
        ours = result["ours"][mode]
        assert ours["layers"] == 14 and ours["delta"] < 1e-4, mode
    anchor = result["peft"]
    assert anchor["layers"] == 7 and anchor["extrapolated"] == pytest.approx(2 * anchor["seconds"])


def test_blockwise_7b_stand_in(tmp_path):
    pytest.importorskip("peft")
    result = _run("blockwise_7b.py", ["--samples", "4", "--seq-len", "16", "--batch-size", "2"], tmp_path)
    assert result["blockwise"]["layers"] == 14
    assert result["whole"]["covariances"] == 8
    assert result["estimate"]["blockwise"] > 0 and result["estimate"]["whole"] > 0
    assert result["peft"]["covariances"] == 14  # one per module


def test_speed_suites_run_at_small_size(tmp_path):
    """CI's guard for bench/speed: every speed suite once at tiny shapes (CORDA_BENCH_SMALL=1),
    timing disabled, as `python -m pytest bench/speed --benchmark-disable` runs it. Every
    ``bench_*.py`` must contribute cases and all must pass (none skipped or failed)."""
    import glob
    import xml.etree.ElementTree as ET

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    report = tmp_path / "speed.xml"
    env = dict(os.environ, CORDA_BENCH_SMALL="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/speed", "--benchmark-disable", "-q", "-p", "no:cacheprovider"]
        + [f"--junitxml={report}"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    cases = list(ET.parse(report).getroot().iter("testcase"))
    bad = [c.get("name") for c in cases if len(c)]  # a child element is a failure, error or skip
    assert not bad, bad
    suites = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(root, "bench", "speed", "bench_*.py"))}
    ran = {c.get("classname").split(".")[-1] for c in cases}
    assert suites and suites <= ran, suites - ran


def test_regression_workflow_saves_and_compares(tmp_path):
    """The README's workflow on one tiny suite: --benchmark-save writes pytest-benchmark's JSON with
    the ratio table inside and a .md beside it; --benchmark-compare reads it back."""
    import glob

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    env = dict(os.environ, CORDA_BENCH_SMALL="1")
    base = [sys.executable, "-m", "pytest", "bench/speed/bench_decompose.py", "-k", "randomized_svd", "-q"]
    base += ["-p", "no:cacheprovider", "--benchmark-enable", f"--benchmark-storage=file://{tmp_path}"]
    # No --benchmark-compare-fail here: tiny cases on a shared machine vary by orders of magnitude.
    for extra in (["--benchmark-save=baseline"], ["--benchmark-compare=0001"]):
        done = subprocess.run(base + extra, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    (saved,) = glob.glob(str(tmp_path / "*" / "0001_baseline.json"))
    data = json.loads(open(saved).read())
    table = data["corda_ratio_table"]
    assert table[0].startswith("Device: ") and "torch " in table[0] and "load average" in table[0]
    assert sum("| rsvd " in line for line in table) == 3  # ours and two anchors, one group
    assert open(saved[: -len(".json")] + ".md").read().splitlines() == table
    assert "anchor:linalg.svd (0001_baselin)" in done.stdout and "(NOW)" in done.stdout  # compared with the save


def test_bench_scripts_import_what_exists():
    """Every ``corda_kernels`` import of a bench script names a module and names that exist (the
    studies are not run by the suite, so a moved module would break them unseen)."""
    import ast
    import glob
    import importlib

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    broken = []
    for path in sorted(glob.glob(os.path.join(root, "bench", "**", "*.py"), recursive=True)):
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                modules = [(a.name, []) for a in node.names if a.name.startswith("corda_kernels")]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("corda_kernels"):
                modules = [(node.module, [a.name for a in node.names])]
            else:
                continue
            for module, names in modules:
                where = f"{os.path.relpath(path, root)}:{node.lineno}"
                try:
                    found = importlib.import_module(module)
                except ImportError:
                    broken.append(f"{where}: no module {module}")
                    continue
                for name in names:
                    if not hasattr(found, name) and importlib.util.find_spec(f"{module}.{name}") is None:
                        broken.append(f"{where}: {module} has no {name}")
    assert not broken, broken
