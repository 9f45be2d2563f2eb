"""Stage 2, decompose: adapter factors for every target layer (plan, shard, cache, run, broadcast)."""

from .engine import decompose

__all__ = ["decompose"]
