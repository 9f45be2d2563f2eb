"""Modules built on the ops: :class:`LowRankLinear` (which tensors are parameters, which buffers)."""

from .lowrank_linear import LowRankLinear

__all__ = ["LowRankLinear"]
