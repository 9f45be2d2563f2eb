"""One command that checks every GPU claim of corda_kernels on this machine's GPU.

``bash bench/gpu/run.sh [--out DIR] [--small] [--stages a,b,...] [--budget SECONDS]`` runs, each stage
in its own process under a wall-clock budget:

  env         device, driver, versions; the bf16 GEMM peak (8192³ ``torch.mm``) and copy bandwidth
              measured now (the yardsticks of the table's "% of peak" column)
  build       the extension against this machine's torch: ``pip install --no-build-isolation
              --no-deps --no-index -e .`` with the CUDA build forced for the visible GPU's arch (an
              in-place build if pip cannot), then whether ``corda_kernels._C`` has CUDA
  tests       ``pytest -m gpu -x`` (real Triton, bf16, cuBLAS backend), a per-test timeout
  covariance  ``bench/speed/bench_covariance.py``: d 4096 / 11008 x 8k / 16k tokens bf16, masked
              and not; anchors PEFT's fp32 path and the full-square bf16 -> fp32 ``torch.mm``
  lowrank     ``bench/speed/bench_lowrank.py``: fused forward + backward at 4096² and 4096 x 11008,
              r 16 / 128, dense, asymmetric, Partial-LoRA 50%; anchors the frozen linear, PEFT's LoRA
  quantized   ``bench/speed/bench_quantized.py``: NF4 / int8 bases at the same shapes, r 16
  svd         ``bench/speed/bench_decompose.py``: batched randomized SVD of 4 x 4096², anchors
              ``torch.linalg.svd`` and ``torch.svd_lowrank``
  corda7b     ``bench/gpu/decompose_7b.py --modes ipa``: CorDA on the 224 targets of a
              LLaMA-2-7B-shaped model, PEFT's per-layer math as the anchor
  segmented   ``bench/speed/bench_segmented.py``: the many-adapter op, 4096², 8k tokens bf16, 4 / 16 / 64
              adapters of ranks 8-64, one adapter per sequence, forward and forward + backward, Triton and
              torch; anchors a loop of the single-adapter op over the groups, PEFT's mixed batch
  dora        ``bench/speed/bench_dora.py``: fused DoRA forward + backward at 4096² and 4096 x 11008, 8k
              tokens bf16, r 16 / 128; anchors the frozen linear, our LoRA step, PEFT's DoRA step

The benchmark stages run the pytest-benchmark suites with ``CORDA_BENCH_CHECK=1`` (their GPU-check
shapes, few rounds) and stream each finished case to a file, so a stage that fails or runs out of
time still contributes what it measured. ``--out`` (default ``gpu-check-out``) receives
``table.md`` (the table printed last: device, versions, every case with its anchors, ratios, TFLOP/s
and % of the measured bf16 peak, then each target met or missed), ``results.json`` (raw timings,
stage statuses, test counts) and ``log.txt`` (every stage's output); both are rewritten after every
stage. ``--small`` rehearses every stage on a CPU at stand-in sizes (Triton under the interpreter;
the build stage reports what it would build) and is run by the test suite. Needs nothing from the
network. Exit status: 0 when every stage ran and passed, 1 otherwise (the table is written anyway).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))

# (name, budget on a GPU in seconds). The whole run stops at --budget (default 540 s: 9 minutes).
STAGES = [
    ("env", 60),
    ("build", 240),
    ("tests", 240),
    ("covariance", 90),
    ("lowrank", 150),
    ("quantized", 60),
    ("svd", 60),
    ("corda7b", 240),
    ("segmented", 120),  # no README target, so it only uses what the claimed stages left
    ("dora", 60),  # as segmented
]
BENCH_SUITES = {
    "covariance": ["bench/speed/bench_covariance.py"],
    "lowrank": ["bench/speed/bench_lowrank.py"],
    "quantized": ["bench/speed/bench_quantized.py"],
    "segmented": ["bench/speed/bench_segmented.py"],
    "dora": ["bench/speed/bench_dora.py"],
    "svd": ["bench/speed/bench_decompose.py", "-k", "test_randomized_svd"],
}
STAND_IN_7B = ["--device", "cpu", "--blocks", "2", "--hidden", "64", "--intermediate", "160", "--heads", "2"]
STAND_IN_7B += ["--rank", "4", "--vocab", "100"]
MIN_STAGE_S = 15  # a stage gets at least this much of the remaining budget, or is skipped

# The README's GPU targets: (key, description, threshold); evaluated in ``targets``.
TARGETS = {
    "cov_vs_peft": ("covariance >= 10x PEFT's fp32 path", 10.0),
    "cov_vs_mm": ("covariance >= 1.5x the full-square bf16 -> fp32 torch.mm", 1.5),
    "cov_peak": ("covariance >= 60% of the measured bf16 peak (triangle FLOPs)", 0.60),
    "lora_vs_linear_r16": ("fused low-rank fwd+bwd <= 1.10x the frozen linear (r 16)", 1.10),
    "lora_vs_linear_r128": ("fused low-rank fwd+bwd <= 1.20x the frozen linear (r 128)", 1.20),
    "lora_vs_peft": ("fused low-rank fwd+bwd >= 1.25x faster than PEFT's LoRA layer", 1.25),
    "partial_vs_dense": ("Partial-LoRA at 50% density no slower than dense (time ratio <= 1.00)", 1.00),
    "corda7b_ipa": ("224-target CorDA decomposition (ipa) < 60 s", 60.0),
}


# ----------------------------------------------------------------------------------------------
# stage workers (run in a child process: ``check.py --worker NAME``)


def worker_env(args) -> None:
    """Device facts and the two ceilings, as one JSON object on the last line of stdout."""
    import torch

    facts = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
    }
    for name in ("triton", "transformers", "peft", "bitsandbytes", "corda_kernels"):
        try:
            facts[name] = __import__(name).__version__
        except Exception as exc:  # missing or broken: say so in the table's header
            facts[name] = f"unavailable ({type(exc).__name__})"
    cuda = torch.cuda.is_available() and not args.small
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        facts.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
        smi = shutil.which("nvidia-smi")
        if smi:
            q = "driver_version,clocks.max.sm,power.limit"
            out = subprocess.run([smi, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True)
            facts["nvidia_smi"] = out.stdout.strip().splitlines()[0] if out.stdout.strip() else out.stderr.strip()
    else:
        facts.update(device=f"CPU {platform.processor() or platform.machine()}", capability=None)
    n = 256 if args.small else 8192
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g).to(dtype)
    b = torch.randn(n, n, device=device, generator=g).to(dtype)
    facts["peak_bf16_tflops"] = 2 * n**3 / _median_seconds(lambda: torch.mm(a, b), device, 3, 10) / 1e12
    facts["peak_bf16_shape"] = f"{n}x{n}x{n}"
    big = torch.empty(2**28 if cuda else 2**20, dtype=torch.uint8, device=device)  # 256 MiB on a GPU
    dst = torch.empty_like(big)
    facts["copy_gbps"] = 2 * big.numel() / _median_seconds(lambda: dst.copy_(big), device, 3, 10) / 1e9
    print(json.dumps(facts))


def _median_seconds(fn, device, warmup: int, reps: int) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def worker_extension(args) -> None:
    """Whether ``corda_kernels._C`` imports here and was built with CUDA (last line: JSON)."""
    from corda_kernels import _backend

    ext = _backend.extension()
    print(
        json.dumps(
            {
                "extension": None if ext is None else getattr(ext, "__file__", "?"),
                "built_with_cuda": _backend.extension_has_cuda(),
            }
        )
    )


def worker_build_plan(args) -> None:
    """``--small``: what ``setup.py`` would build here, without building (last line: JSON)."""
    import runpy

    import torch

    ns = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="corda_kernels_setup")
    ext_modules, _ = ns["_extensions"]()
    print(
        json.dumps(
            {
                "would_build": [e.name for e in ext_modules],
                "torch_cuda": torch.version.cuda,
                "command": " ".join(build_commands()[0]),
            }
        )
    )


def worker_build_jit(args) -> None:
    """Last resort when neither pip nor ``setup.py`` can build (e.g. an old setuptools refusing the
    project metadata): compile ``csrc/`` with ``torch.utils.cpp_extension.load`` and setup.py's own
    flags, then place the module at ``corda_kernels/_C.so``."""
    import runpy

    from torch.utils import cpp_extension

    ns = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="corda_kernels_setup")
    sources = sorted(
        os.path.join(ROOT, "csrc", f) for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith((".cpp", ".cu"))
    )
    defines = [f"-D{k}={v}" for k, v in ns["CUDA_DEFINE_MACROS"]]
    build = tempfile.mkdtemp(prefix="corda-C-")
    cpp_extension.load(
        name="_C",
        sources=sources,
        extra_cflags=ns["CXX_FLAGS"] + defines,
        extra_cuda_cflags=ns["NVCC_FLAGS"] + defines,
        extra_include_paths=[os.path.join(ROOT, "csrc")] + ns["cuda_include_dirs"](cpp_extension.CUDA_HOME),
        extra_ldflags=ns["_cuda_link_args"](cpp_extension.CUDA_HOME) or ["-lcublas"],
        build_directory=build,
        with_cuda=True,
        verbose=True,
    )
    shutil.copy(os.path.join(build, "_C.so"), os.path.join(ROOT, "corda_kernels", "_C.so"))
    print(json.dumps({"built": os.path.join(ROOT, "corda_kernels", "_C.so")}))


WORKERS = {
    "env": worker_env,
    "extension": worker_extension,
    "build_plan": worker_build_plan,
    "build_jit": worker_build_jit,
}


# ----------------------------------------------------------------------------------------------
# the driver


class Run:
    """Stage runner: child processes under budgets, logs and results kept as they arrive."""

    def __init__(self, args):
        self.args = args
        self.out = os.path.abspath(args.out)
        os.makedirs(self.out, exist_ok=True)
        self.scratch = tempfile.mkdtemp(prefix="corda-gpu-check-")
        self.stream = os.path.join(self.scratch, "rows.jsonl")
        self.log_path = os.path.join(self.out, "log.txt")
        open(self.log_path, "w").close()
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.results = {
            "command": " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]),
            "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "small": args.small,
            "budget_s": args.budget,
            "stages": {},
            "env": {},
            "rows": [],
            "failures": [],
        }

    # -- processes

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")
        if self.args.verbose:
            sys.stdout.write(text if text.endswith("\n") else text + "\n")

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def call(self, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
        """Run ``cmd`` in its own process group; ``(returncode or None on timeout, output)``."""
        self.log(f"$ {' '.join(cmd)}   (timeout {timeout:.0f} s)")
        path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))  # this checkout's package
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path, **(env or {}))
        log_file = os.path.join(self.scratch, "call.log")
        with open(log_file, "w") as fh:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=full_env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(timeout=max(timeout, 1))
            except subprocess.TimeoutExpired:
                code = None
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(timeout=5)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        with open(log_file, errors="replace") as fh:
            output = fh.read()
        self.log(output)
        self.log(f"-> {'timed out' if code is None else f'exit {code}'}")
        return code, output

    def worker(self, name: str, timeout: float) -> tuple[int | None, dict | None]:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name] + (["--small"] if self.args.small else [])
        code, output = self.call(cmd, timeout)
        last = output.strip().splitlines()[-1] if output.strip() else ""
        try:
            return code, json.loads(last)
        except ValueError:
            return code, None

    # -- stages

    def stage_env(self, budget):
        code, facts = self.worker("env", budget)
        if facts:
            self.results["env"].update(facts)
        return code == 0 and facts is not None, "" if facts else "no facts reported"

    def stage_build(self, budget):
        if self.args.small or not self._cuda_visible():
            code, plan = self.worker("build_plan", budget)
            self.results["env"]["build"] = plan
            return code == 0, f"rehearsal: would build {plan['would_build'] if plan else '?'} (no CUDA here)"
        capability = self.results["env"].get("capability") or self._capability()
        env = {"CORDA_KERNELS_FORCE_CUDA": "1", "MAX_JOBS": str(os.cpu_count() or 4)}
        if capability:
            env["TORCH_CUDA_ARCH_LIST"] = capability
        notes = []
        commands = build_commands() + [[sys.executable, os.path.abspath(__file__), "--worker", "build_jit"]]
        t0 = time.monotonic()
        for cmd in commands:
            code, _ = self.call(cmd, max(budget - (time.monotonic() - t0), 1), env)
            if code == 0:
                break
            notes.append(f"`{' '.join(cmd[1:4])}` failed")
        code, ext = self.worker("extension", 60)
        self.results["env"]["extension"] = ext
        built = bool(ext and ext.get("built_with_cuda"))
        return built, "; ".join(notes + [f"_C built with CUDA: {built}"])

    def stage_tests(self, budget):
        junit = os.path.join(self.scratch, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}"]
        cmd += [] if self.args.keep_going else ["-x"]
        if _importable("pytest_timeout"):
            cmd.append("--timeout=180")
        if _importable("xdist") and not self.args.small:
            cmd += ["-n", "8"]  # Triton compiles on the CPU: several workers share the GPU
        cmd.append("tests")
        code, output = self.call(cmd, budget)
        counts = junit_counts(junit) or progress_counts(output)  # a killed run writes no junit file
        self.results["tests"] = counts
        ok = code in (0, 5) and counts.get("failed", 0) == 0 and counts.get("errors", 0) == 0
        summary = "before it was stopped: " if counts.get("unfinished_run") else ""
        summary += f"{counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
        summary += f"{counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped"
        if counts.get("first_failure"):
            summary += f"; first failure: {counts['first_failure']}"
        if code is None:
            summary += " (timed out)"
        return ok, summary

    def stage_bench(self, name, budget):
        env = {"CORDA_BENCH_STREAM": self.stream}
        env["CORDA_BENCH_SMALL" if self.args.small else "CORDA_BENCH_CHECK"] = "1"
        before = len(self.read_rows())
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            *BENCH_SUITES[name],
            "--benchmark-enable",
            "-q",
            "-p",
            "no:cacheprovider",
        ]
        code, _ = self.call(cmd, budget, env)
        rows = self.read_rows()[before:]
        measured = [r for r in rows if "error" not in r]
        failed = [r for r in rows if "error" in r]
        for r in measured:
            r["stage"] = name
        self.results["rows"] += measured
        self.results["failures"] += [{"stage": name, **r} for r in failed]
        note = f"{len(measured)} cases measured, {len(failed)} failed"
        if code is None:
            note += " (timed out: the rest not measured)"
        return code == 0 and not failed, note

    def stage_corda7b(self, budget):
        path = os.path.join(self.scratch, "corda7b.json")
        sizes = STAND_IN_7B if (self.args.small or not self._cuda_visible()) else []
        cmd = [
            sys.executable,
            os.path.join(HERE, "decompose_7b.py"),
            *sizes,
            "--modes",
            "ipa",
            "--progress",
            "--json",
            path,
        ]
        code, _ = self.call(cmd, budget)
        if code != 0 or not os.path.exists(path):
            return False, "no result"
        with open(path) as fh:
            result = json.load(fh)
        opts = result["options"]
        group = f"corda {result['groups']} targets ({opts['blocks']} blocks, hidden {opts['hidden']}, r {opts['rank']})"
        for mode, r in result["ours"].items():
            self.results["rows"].append(
                {
                    "stage": "corda7b",
                    "group": group,
                    "impl": f"ours:{mode}",
                    "median": r["seconds"],
                    "rounds": 1,
                    "extra": {"max_abs_dlogits": r["delta"], "peak_gib": (r["peak"] or 0) / 2**30},
                }
            )
        if result.get("peft"):
            p = result["peft"]
            self.results["rows"].append(
                {
                    "stage": "corda7b",
                    "group": group,
                    "impl": "anchor:peft",
                    "median": p["extrapolated"],
                    "rounds": 1,
                    "extra": {"measured_layers": p["layers"], "measured_s": p["seconds"]},
                }
            )
        worst = max(r["delta"] for r in result["ours"].values())
        return True, f"{result['groups']} targets, max |Δlogits| {worst:.3g}"

    # -- helpers

    def read_rows(self) -> list[dict]:
        if not os.path.exists(self.stream):
            return []
        with open(self.stream) as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def _cuda_visible(self) -> bool:
        return bool(self.results["env"].get("capability")) and not self.args.small

    def _capability(self):
        return self.results["env"].get("capability")

    def run(self) -> int:
        selected = self.args.stages or [name for name, _ in STAGES]
        unknown = sorted(set(selected) - {name for name, _ in STAGES})
        if unknown:
            raise SystemExit(f"unknown stage(s) {unknown}; known: {[n for n, _ in STAGES]}")
        if "env" not in selected:  # every table needs the device and the peak
            selected = ["env"] + selected
        all_ok = True
        for name, budget in STAGES:
            if name not in selected:
                continue
            left = self.remaining()
            if left < MIN_STAGE_S:
                self.results["stages"][name] = {"status": "skipped", "note": f"budget spent ({left:.0f} s left)"}
                all_ok = False
                self.write()
                continue
            budget = self.args.stage_budgets.get(name, 600 if self.args.small else budget)  # CPU rehearsal: slow
            budget = min(budget, left)
            t0 = time.monotonic()
            self.log(f"\n===== stage {name} (budget {budget:.0f} s) =====")
            try:
                if name in BENCH_SUITES:
                    ok, note = self.stage_bench(name, budget)
                else:
                    ok, note = getattr(self, f"stage_{name}")(budget)
            except Exception as exc:  # a broken stage must not lose the others' results
                ok, note = False, f"harness error: {type(exc).__name__}: {exc}"
            seconds = time.monotonic() - t0
            timed_out = seconds >= budget - 1
            status = "ok" if ok else ("timed out" if timed_out else "failed")
            self.results["stages"][name] = {"status": status, "seconds": round(seconds, 1), "note": note}
            all_ok &= ok
            self.write()
        self.results["targets"] = targets(self.results)
        self.write()
        shutil.rmtree(self.scratch, ignore_errors=True)
        return 0 if all_ok else 1

    def write(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.results["targets"] = targets(self.results)
        with open(os.path.join(self.out, "results.json"), "w") as fh:
            json.dump(self.results, fh, indent=1, default=str)
        with open(os.path.join(self.out, "table.md"), "w") as fh:
            fh.write(render(self.results))


def build_commands() -> list[list[str]]:
    """How the build stage builds ``_C`` here, in order of preference."""
    pip = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    inplace = [sys.executable, "setup.py", "build_ext", "--inplace"]
    return [pip, inplace]


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def progress_counts(output: str) -> dict:
    """Test outcomes from ``pytest -v`` lines (``tests/x.py::t PASSED`` or, under xdist,
    ``[gw0] [ 5%] PASSED tests/x.py::t``): what a run cut short had finished."""
    import re

    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    key = {"PASSED": None, "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped", "XFAIL": "skipped"}
    words = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
    pattern = rf"(?:^|\] )({words}) (\S+::\S+)|^(\S+::\S+) ({words})"
    first = None
    for line in output.splitlines():
        m = re.search(pattern, line)
        if not m:
            continue
        outcome, nodeid = (m.group(1), m.group(2)) if m.group(1) else (m.group(4), m.group(3))
        counts["tests"] += 1
        if key.get(outcome):
            counts[key[outcome]] += 1
        if outcome in ("FAILED", "ERROR") and first is None:
            first = nodeid
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    counts["unfinished_run"] = True
    if first:
        counts["first_failure"] = first
    return counts


def junit_counts(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    first = None
    for suite in suites:
        counts["tests"] += int(suite.get("tests", 0))
        counts["failed"] += int(suite.get("failures", 0))
        counts["errors"] += int(suite.get("errors", 0))
        counts["skipped"] += int(suite.get("skipped", 0))
        for case in suite.iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None and first is None:
                first = f"{case.get('classname')}::{case.get('name')}: {(bad.get('message') or '')[:300]}"
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    if first:
        counts["first_failure"] = first
    return counts


# ----------------------------------------------------------------------------------------------
# the table


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("median"):
            groups.setdefault(r["group"], []).append(r)
    return groups


def _find(items: list[dict], impl: str):
    return next((r for r in items if r["impl"] == impl), None)


def targets(results: dict) -> list[dict]:
    """Every README target that this run measured: value, threshold, met."""
    out = []
    peak = results.get("env", {}).get("peak_bf16_tflops")

    def add(key, where, value, met):
        text, threshold = TARGETS[key]
        out.append({"target": text, "where": where, "value": value, "threshold": threshold, "met": bool(met)})

    for group, items in _groups(results.get("rows", [])).items():
        if group.startswith("cov ") and "bfloat16" in group:
            ours = _find(items, "ours:auto(checked)")
            if not ours:
                continue
            peft, mm = _find(items, "anchor:peft"), _find(items, "anchor:torch-bf16-mm")
            if peft:
                v = peft["median"] / ours["median"]
                add("cov_vs_peft", group, round(v, 2), v >= 10)
            if mm:
                v = mm["median"] / ours["median"]
                add("cov_vs_mm", group, round(v, 2), v >= 1.5)
            if peak and ours.get("flops"):
                v = ours["flops"] / ours["median"] / 1e12 / peak
                add("cov_peak", group, round(v, 3), v >= 0.60)
        elif group.startswith("lowrank "):
            lora, linear, peft = _find(items, "ours:lora"), _find(items, "anchor:linear"), _find(items, "anchor:peft")
            r = int(group.split(" r=")[1].split()[0]) if " r=" in group else None
            if lora and linear and r in (16, 128):
                v = lora["median"] / linear["median"]
                add(f"lora_vs_linear_r{r}", group, round(v, 3), v <= TARGETS[f"lora_vs_linear_r{r}"][1])
            if lora and peft:
                v = peft["median"] / lora["median"]
                add("lora_vs_peft", group, round(v, 2), v >= 1.25)
            partial = _find(items, "ours:partial50")
            if lora and partial:
                v = partial["median"] / lora["median"]
                add("partial_vs_dense", group, round(v, 3), v <= 1.00)
        elif group.startswith("corda "):
            ipa = _find(items, "ours:ipa")
            if ipa:
                add("corda7b_ipa", group, round(ipa["median"], 1), ipa["median"] < 60)
    return out


def render(results: dict) -> str:
    env = results.get("env", {})
    peak = env.get("peak_bf16_tflops")
    head = [
        f"# corda_kernels GPU check ({'CPU rehearsal, --small: figures mean nothing' if results['small'] else 'GPU'})",
        "",
        f"- started {results['started']}, {results.get('elapsed_s', 0):.0f} s of a {results['budget_s']:.0f} s budget;"
        f" command `{results['command']}`",
        f"- device: {env.get('device', '?')} (capability {env.get('capability')}, {env.get('sms', '?')} SMs,"
        f" {env.get('memory_gib', '?')} GiB); driver, max SM clock, power limit: {env.get('nvidia_smi', '-')}",
        f"- software: Python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}), "
        f"triton {env.get('triton')}, transformers {env.get('transformers')}, peft {env.get('peft')}, "
        f"bitsandbytes {env.get('bitsandbytes')}, corda_kernels {env.get('corda_kernels')}",
        f"- measured now: bf16 GEMM peak {peak or 0:.4g} TFLOP/s ({env.get('peak_bf16_shape', '?')} torch.mm), "
        f"copy bandwidth {env.get('copy_gbps', 0):.4g} GB/s (read + write)",
    ]
    ext = env.get("extension")
    if ext is not None:
        head.append(
            f"- extension: `corda_kernels._C` built with CUDA: {ext.get('built_with_cuda')} ({ext.get('extension')})"
        )
    lines = head + ["", "## Stages", "", "| stage | status | seconds | note |", "| --- | --- | --- | --- |"]
    for name, _ in STAGES:
        st = results["stages"].get(name)
        if st:
            note = str(st.get("note", "")).replace("|", "/").replace("\n", " ")
            lines.append(f"| {name} | {st['status']} | {st.get('seconds', '-')} | {note} |")
    lines += [
        "",
        "## Timings (median of the rounds; ratio = anchor time / this time, > 1 means faster than the anchor)",
        "",
        "| group | impl | median ms | vs anchors | TFLOP/s | % of bf16 peak |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for group, items in _groups(results.get("rows", [])).items():
        anchors = [r for r in items if str(r["impl"]).startswith("anchor:")]
        for r in sorted(items, key=lambda r: (not str(r["impl"]).startswith("anchor:"), str(r["impl"]))):
            ratios = ", ".join(f"{a['impl'][7:]}: {a['median'] / r['median']:.2f}x" for a in anchors if a is not r)
            flops = r.get("flops")
            tflops = flops / r["median"] / 1e12 if flops else None
            pct = f"{100 * tflops / peak:.0f}%" if tflops and peak else ""
            lines.append(
                f"| {group} | {r['impl']} | {r['median'] * 1e3:.3f} | {ratios} | "
                f"{'' if tflops is None else f'{tflops:.3g}'} | {pct} |"
            )
    lines += ["", "## Targets", "", "| target | where | measured | met |", "| --- | --- | --- | --- |"]
    measured_targets = targets(results)
    for t in measured_targets:
        lines.append(f"| {t['target']} | {t['where']} | {t['value']} | {'met' if t['met'] else 'MISSED'} |")
    measured = {t["target"] for t in measured_targets}
    for text, _ in TARGETS.values():
        if text not in measured:
            lines.append(f"| {text} | - | not measured in this run | - |")
    if results.get("failures"):
        lines += ["", "## Failed cases", ""]
        for f in results["failures"]:
            lines.append(f"- {f['stage']}: `{f['nodeid']}` ({f.get('when')}): {f['error'].splitlines()[-1][:300]}")
    tests = results.get("tests")
    if tests:
        lines += ["", f"GPU tests: {json.dumps(tests)}"]
    return "\n".join(lines) + "\n"


def _stage_budgets(text: str) -> dict[str, float]:
    budgets = {}
    for item in filter(None, text.split(",")):
        name, _, seconds = item.partition("=")
        if name not in dict(STAGES):
            raise argparse.ArgumentTypeError(f"unknown stage {name!r} (known: {', '.join(n for n, _ in STAGES)})")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r}: expected STAGE=SECONDS") from None
    return budgets


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check-out", help="folder for table.md, results.json and log.txt")
    p.add_argument("--small", action="store_true", help="rehearse every stage on a CPU at stand-in sizes")
    p.add_argument(
        "--stages", type=lambda s: [x for x in s.split(",") if x], default=None, help="subset, e.g. covariance,lowrank"
    )
    p.add_argument("--budget", type=float, default=540.0, help="wall-clock seconds for the whole run (default 540)")
    p.add_argument(
        "--keep-going", action="store_true", help="run every GPU test instead of stopping at the first failure"
    )
    p.add_argument(
        "--stage-budgets",
        type=_stage_budgets,
        default={},
        help="per-stage seconds, e.g. tests=120,corda7b=150 (defaults: "
        + ", ".join(f"{n} {b}" for n, b in STAGES)
        + ")",
    )
    p.add_argument("--verbose", action="store_true", help="also echo every stage's output")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        WORKERS[args.worker](args)
        return 0
    if args.small:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # a rehearsal stays on the CPU even on a GPU box
        os.environ.setdefault("TRITON_INTERPRET", "1")
    run = Run(args)
    code = run.run()
    with open(os.path.join(run.out, "table.md")) as fh:
        print(fh.read())
    print(f"(written to {run.out}: table.md, results.json, log.txt)")
    return code


if __name__ == "__main__":
    sys.exit(main())
