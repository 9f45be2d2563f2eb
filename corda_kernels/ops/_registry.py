"""How the low-rank ops are registered with ``torch.library``: a forward op and its backward op, each
with a fake (meta) kernel, and an autocast rule per device type.

An op's own module supplies what differs (its bodies, schemas and how autocast casts its inputs);
the registration steps are written here once.
"""

from __future__ import annotations

from typing import Callable

import torch

_LIB = torch.library.Library("corda_kernels", "FRAGMENT")  # noqa: TOR901 - holds the autocast kernels
AUTOCAST_DEVICES = ("cpu", "cuda")


def register_op(name: str, forward, forward_fake, schema: str, backward, backward_fake, backward_schema: str):
    """``corda_kernels::{name}`` and ``corda_kernels::{name}_backward`` as custom ops (no mutation),
    each with its fake kernel; returns both op objects (register the autograd rule on the first)."""
    op = torch.library.custom_op(f"corda_kernels::{name}", forward, mutates_args=(), schema=schema)
    op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(
        f"corda_kernels::{name}_backward", backward, mutates_args=(), schema=backward_schema
    )
    backward_op.register_fake(backward_fake)
    return op, backward_op


def register_autocast(name: str, cast_and_run: Callable) -> None:
    """The autocast rule of ``corda_kernels::{name}`` on every device type of :data:`AUTOCAST_DEVICES`:
    ``cast_and_run(device_type, *args)`` casts the op's arguments as autocast should and calls the op,
    which then runs with that device's autocast key excluded (in eager mode and under torch.compile's
    Python dispatcher)."""
    op = getattr(torch.ops.corda_kernels, name).default
    for device_type in AUTOCAST_DEVICES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)
        keyset = torch._C.DispatchKeySet(key)

        def rule(*args, _device_type=device_type, _keyset=keyset):
            with torch._C._ExcludeDispatchKeyGuard(_keyset):
                return cast_and_run(_device_type, *args)

        op.py_impl(key)(rule)  # the Python dispatcher (torch.compile)
        _LIB.impl(name, lambda _keys, *args, _rule=rule: _rule(*args), key_name, with_keyset=True)


def needs(*flags) -> list[bool]:
    """A backward's ``needs``: which gradients to compute, as plain bools in the order the op's
    kernels return them (each op's ``backward`` docstring gives it)."""
    return [bool(f) for f in flags]
