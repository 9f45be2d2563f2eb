"""Time and peak memory of a stage of work, for the command-line reports and benchmarks.

Host memory is the process's resident set size sampled every 20 ms by a background thread
(``/proc/self/statm``; peak RSS of the stage, not of the process lifetime); on CUDA the peak
allocated memory comes from ``torch.cuda.max_memory_allocated`` reset at the stage's start.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``; a no-op elsewhere). After a
    large temporary (the output check's fp64 model copy) glibc keeps most freed chunks resident,
    which would count in every later stage's peak RSS (measured: ~760 MB on SmolLM2)."""
    global _TRIM
    if _TRIM is None:
        try:
            import ctypes

            _TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _TRIM = False
    if _TRIM:
        _TRIM(0)


_TRIM = None


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    peak_rss: int = 0
    peak_cuda: int = 0

    def line(self) -> str:
        cuda = f", peak GPU {self.peak_cuda / 2**20:,.0f} MiB" if self.peak_cuda else ""
        return f"{self.name:<17} {self.seconds:8.1f} s   peak RSS {self.peak_rss / 2**20:,.0f} MiB{cuda}"


class measure:
    """``with measure("calibrate") as stage: ...`` fills ``stage.seconds`` and peaks."""

    def __init__(self, name: str, interval: float = 0.02):
        self.stage = Stage(name)
        self._interval = interval
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self.stage.peak_rss = max(self.stage.peak_rss, rss_bytes())

    def __enter__(self) -> Stage:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.stage.peak_rss = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self.stage

    def __exit__(self, *exc) -> None:
        self.stage.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.stage.peak_rss = max(self.stage.peak_rss, rss_bytes())
        if torch.cuda.is_available():
            self.stage.peak_cuda = torch.cuda.max_memory_allocated()
