"""Initialization recipes, one module each: CorDA (corda.py), PiSSA / MiLoRA (svd_init.py), ...

``make_method(name, **options)`` builds one from its name as used by ``corda_kernels.apply``.
"""

from __future__ import annotations

from .base import InitMethod, LayerInit
from .corda import CorDA
from .svd_init import MiLoRA, PiSSA

METHODS: dict[str, type[InitMethod]] = {cls.name: cls for cls in (CorDA, PiSSA, MiLoRA)}


def make_method(name: str, **options) -> InitMethod:
    if isinstance(name, InitMethod):
        if options:
            raise TypeError(f"options {sorted(options)} given with an already built method {name.describe()}")
        return name
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    try:
        return METHODS[name](**options)
    except TypeError as exc:
        raise TypeError(f"method {name!r}: {exc}") from None


__all__ = ["METHODS", "CorDA", "InitMethod", "LayerInit", "MiLoRA", "PiSSA", "make_method"]
