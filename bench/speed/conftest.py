"""Shared pytest-benchmark setup: every figure is a ratio against an anchor timed in the same run.

A benchmark test times one implementation of one case and tags it through fixtures (no imports
between bench files)::

    def test_cov(benchmark, bench_tag, bench_sync, case):
        bench_tag(group=f"cov d={d} n={n} {dtype}", impl="ours", flops=...)
        benchmark.pedantic(fn, setup=..., rounds=..., warmup_rounds=1)

Implementations whose ``impl`` starts with ``anchor:`` are anchors. At the end of a timed session a
table is printed with, per group, each implementation's median, ``anchor_median / median`` for
every anchor, and TFLOP/s when ``flops`` was given; the header names the device, versions, date
and load average. The table is written to ``bench/last_run.md``, stored in pytest-benchmark's JSON
(key ``corda_ratio_table``) and, with ``--benchmark-save``/``--benchmark-autosave``, written beside
the saved JSON as ``<same name>.md``. Run: ``python -m pytest bench --benchmark-enable``;
``CORDA_BENCH_SMALL=1`` picks tiny shapes (``corda_kernels.testing.bench_small``).

With ``CORDA_BENCH_STREAM=FILE``, every finished benchmark (group, impl, median and min seconds,
rounds, FLOPs, extra info) and every failed case is appended to FILE as one JSON line the moment it
ends, so a run killed by a time budget still leaves what it measured (``bench/gpu/run.sh`` reads it).
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform

import pytest
import torch


def device_description() -> str:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} (CUDA {torch.version.cuda}, {props.multi_processor_count} SMs)"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def versions() -> str:
    import corda_kernels

    parts = [f"corda_kernels {corda_kernels.__version__}", f"torch {torch.__version__}"]
    for name in ("triton", "peft", "transformers"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return ", ".join(parts)


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def bench_tag(benchmark):
    """``bench_tag(group=..., impl=..., flops=None, **extra)`` labels this test's benchmark: its
    comparison group, implementation name (``anchor:...`` for anchors) and optional FLOP count."""

    def tag(**labels) -> None:
        _label(benchmark, **labels)

    return tag


def _label(benchmark, *, group: str, impl: str, flops: float | None = None, **extra) -> None:
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, flops=flops, **extra)
    benchmark.name = f"{group} :: {impl}"


@pytest.fixture
def bench_sync(bench_device):
    """``bench_sync()`` waits for the device (CUDA kernels are asynchronous; a no-op on the CPU)."""

    def sync() -> None:
        if bench_device.type == "cuda":
            torch.cuda.synchronize(bench_device)

    return sync


@pytest.fixture
def bench_backward(benchmark, bench_device, bench_sync):
    """``bench_backward(fn, x, dy, params, rounds, *, peak=False, **tag)`` times ``fn(x).backward(dy)``
    (gradients of ``x`` and ``params`` cleared before each round, one untimed step first: compiles
    and autotunes). ``tag`` goes to ``bench_tag``; ``peak=True`` adds the step's peak CUDA memory
    above what was allocated before it as ``peak_mib`` (GPU only)."""

    def run(fn, x, dy, params, rounds: int, *, peak: bool = False, **tag) -> None:
        def clear():
            x.grad = None
            for p in params:
                p.grad = None

        def step():
            fn(x).backward(dy)
            bench_sync()

        clear()
        step()
        if peak and bench_device.type == "cuda":
            clear()
            torch.cuda.reset_peak_memory_stats(bench_device)
            base = torch.cuda.memory_allocated(bench_device)
            step()
            tag["peak_mib"] = round((torch.cuda.max_memory_allocated(bench_device) - base) / 2**20, 1)
        _label(benchmark, **tag)
        benchmark.pedantic(step, setup=clear, rounds=rounds, warmup_rounds=1)

    return run


def _median(bench) -> float:
    """Median seconds of a session entry (pytest-benchmark keeps ``Metadata`` whose ``stats`` is a
    ``Stats``; a fixture's ``stats`` is the ``Metadata`` itself)."""
    stats = getattr(bench, "stats", None)
    stats = getattr(stats, "stats", stats)
    return getattr(stats, "median", None)


def _ratio_table(benchmarks) -> list[str]:
    groups: dict[str, list] = {}
    for b in benchmarks:
        if _median(b) is None:
            continue
        groups.setdefault(b.group, []).append(b)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    lines = [
        f"Device: {device_description()} | {versions()} | {now} | load average {load}",
        "",
        "| group | impl | median ms | vs anchors (anchor / this) | TFLOP/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for group, items in sorted(groups.items()):
        anchors = [b for b in items if str(b.extra_info.get("impl", "")).startswith("anchor:")]
        for b in sorted(items, key=lambda b: str(b.extra_info.get("impl"))):
            median = _median(b)
            ratios = ", ".join(f"{a.extra_info['impl'][7:]}: {_median(a) / median:.2f}x" for a in anchors if a is not b)
            flops = b.extra_info.get("flops")
            tflops = f"{flops / median / 1e12:.3g}" if flops else ""
            lines.append(f"| {group} | {b.extra_info.get('impl')} | {median * 1e3:.3f} | {ratios} | {tflops} |")
    return lines


def _timed_session(config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return None
    return session


def _session_table(config) -> list[str]:
    """The run's ratio table, built once (the JSON, the terminal and the .md files show the same)."""
    if getattr(config, "_corda_ratio_table", None) is None:
        config._corda_ratio_table = _ratio_table(config._benchmarksession.benchmarks)
    return config._corda_ratio_table


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Keep the ratio table inside pytest-benchmark's own JSON (saved runs and --benchmark-json)."""
    if _timed_session(config) is not None:
        output_json["corda_ratio_table"] = _session_table(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = _timed_session(config)
    if session is None:
        return
    text = "\n".join(_session_table(config)) + "\n"
    terminalreporter.write_sep("=", "ratios against same-run anchors")
    terminalreporter.write(text)
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "last_run.md"), "w") as fh:
        fh.write(text)
    name = session.save or session.autosave
    storage = getattr(session, "storage", None)
    if name and hasattr(storage, "get"):  # file storage: <dir>/<machine id>/NNNN_<name>.json, newest last
        saved = sorted(glob.glob(os.path.join(glob.escape(str(storage.get(""))), f"[0-9][0-9][0-9][0-9]_{name}.json")))
        if saved:
            beside = saved[-1][: -len(".json")] + ".md"
            with open(beside, "w") as fh:
                fh.write(text)
            terminalreporter.write_line(f"ratio table saved beside the JSON: {beside}")


STREAM_ENV = "CORDA_BENCH_STREAM"


def _stream(row: dict) -> None:
    path = os.environ.get(STREAM_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")


def _stats(bench) -> dict:
    stats = getattr(bench, "stats", None)
    stats = getattr(stats, "stats", stats)
    return {k: getattr(stats, k, None) for k in ("median", "min", "mean", "stddev", "rounds")}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not os.environ.get(STREAM_ENV):
        return
    if report.failed:
        _stream({"nodeid": item.nodeid, "when": report.when, "error": str(report.longrepr)[-2000:]})
    elif report.when == "teardown":
        session = getattr(item.config, "_benchmarksession", None)
        seen = item.config.__dict__.setdefault("_corda_streamed", set())
        for bench in getattr(session, "benchmarks", None) or []:
            if id(bench) in seen or _median(bench) is None:
                continue
            seen.add(id(bench))
            info = dict(bench.extra_info)
            _stream(
                {
                    "nodeid": item.nodeid,
                    "group": bench.group,
                    "impl": info.pop("impl", None),
                    "flops": info.pop("flops", None),
                    **_stats(bench),
                    "extra": info,
                    "device": device_description(),
                }
            )
