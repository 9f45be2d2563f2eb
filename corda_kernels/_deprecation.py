"""Deprecated spellings of options that were renamed: accepted with a ``DeprecationWarning``."""

from __future__ import annotations

import warnings

_UNSET = object()


def renamed(where: str, old: str, old_value, new: str, new_value, default=None):
    """The value of option ``new`` given either spelling (``old`` warns); both at once must agree."""
    if old_value is _UNSET or old_value is None:
        return new_value
    warnings.warn(f"{where}({old}=...) is deprecated; use {new}=...", DeprecationWarning, stacklevel=3)
    if new_value is not default and new_value != old_value:
        raise ValueError(f"{where}: {old}= is the deprecated name of {new}=; pass only {new}=")
    return old_value
