"""Shared pytest-benchmark setup: every figure is a ratio against an anchor timed in the same run.

A benchmark test times one implementation of one case and tags it::

    def test_cov(benchmark, bench_device, case):
        tag(benchmark, group=f"cov d={d} n={n} {dtype}", impl="ours", flops=...)
        benchmark.pedantic(fn, setup=..., rounds=..., warmup_rounds=1)

Implementations whose ``impl`` starts with ``anchor:`` are anchors. At the end of the session a
table is printed (and written to ``bench/last_run.md``) with, per group, each implementation's
median, ``anchor_median / median`` for every anchor, and TFLOP/s when ``flops`` was given. The
device is named in the header. Run: ``python -m pytest bench --benchmark-enable``.
"""

from __future__ import annotations

import datetime
import os
import platform

import pytest
import torch


def device_description() -> str:
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} (CUDA {torch.version.cuda}, {props.multi_processor_count} SMs)"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def tag(benchmark, *, group: str, impl: str, flops: float | None = None, **extra) -> None:
    """Label a benchmark: its comparison group, implementation name and (optional) FLOP count."""
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, flops=flops, **extra)
    benchmark.name = f"{group} :: {impl}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    lines = [
        f"Device: {device_description()} | torch {torch.__version__} | "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}",
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


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    lines = _ratio_table(session.benchmarks)
    terminalreporter.write_sep("=", "ratios against same-run anchors")
    for line in lines:
        terminalreporter.write_line(line)
    out = os.path.join(os.path.dirname(__file__), "last_run.md")
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
