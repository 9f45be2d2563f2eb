"""Triton kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``) and their launch helpers."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=8)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for the interpreter: small grids)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
