"""Initialization recipes, one module each: CorDA (corda.py), PiSSA / MiLoRA (svd_init.py), LoRA
(lora.py), asymmetric LoRA (asymmetric.py), SiVA (siva.py), Partial-LoRA (partial_lora.py); ASVD
(asvd.py), the discard report's baseline, is not one of ``apply``'s methods.

``make_method(name, **options)`` builds one from its name as used by ``corda_kernels.apply``.
"""

from __future__ import annotations

from .asymmetric import Asymmetric
from .base import InitMethod, LayerInit
from .corda import CorDA
from .lora import LoRA
from .partial_lora import PartialLoRA
from .siva import SiVA
from .svd_init import MiLoRA, PiSSA

METHODS: dict[str, type[InitMethod]] = {
    cls.name: cls for cls in (CorDA, PiSSA, MiLoRA, LoRA, Asymmetric, SiVA, PartialLoRA)
}


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


__all__ = [
    "METHODS",
    "Asymmetric",
    "CorDA",
    "InitMethod",
    "LayerInit",
    "LoRA",
    "MiLoRA",
    "PartialLoRA",
    "PiSSA",
    "SiVA",
    "make_method",
]
