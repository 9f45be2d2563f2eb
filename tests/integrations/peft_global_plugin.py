"""A pytest plugin that runs a test session with the global PEFT patch switched on.

Use it to run PEFT's own test suite on corda_kernels (from a checkout of PEFT's repository at the
tag of the installed PEFT)::

    cd /path/to/peft && PYTHONPATH=/path/to/corda_kernels/tests/integrations:/path/to/corda_kernels \\
        python -m pytest -p peft_global_plugin tests/test_initialization.py \\
        -k "pissa or corda or olora or eva or loftq"

(PEFT's ``tests`` is a package too, hence ``-p peft_global_plugin`` with this folder on the path.)

It calls ``corda_kernels.patch_peft()`` once the session is configured (before PEFT's tests are
imported or run) and ``unpatch_peft()`` when it ends, and adds a header line saying so. A test that
switches the patch off itself (``corda_kernels.unpatch_peft()``) is not re-patched. At the end it
prints what the patch did to every LoRA layer PEFT built (fused, or left on PEFT's forward and
why), counted per LoRA / DoRA, so a run shows that the patch was exercised.
"""

from __future__ import annotations

import collections

_OUTCOMES: collections.Counter = collections.Counter()


def _counting(patch_layer):
    def wrapper(layer, name="", *args, **kwargs):
        result = patch_layer(layer, name, *args, **kwargs)
        dora = (
            any(getattr(layer, "use_dora", {}).values())
            if isinstance(getattr(layer, "use_dora", None), dict)
            else False
        )
        kind = "DoRA" if dora else "LoRA"
        _OUTCOMES[
            f"{kind} layers fused" if result is None else f"{kind} layers left on PEFT's forward: {result.why}"
        ] += 1
        return result

    wrapper.__wrapped__ = patch_layer
    return wrapper


def pytest_configure(config):
    import corda_kernels
    from corda_kernels.integrations import peft_patch

    corda_kernels.patch_peft()
    config._corda_kernels_patched = True
    peft_patch.patch_layer = _counting(peft_patch.patch_layer)


def pytest_report_header(config):
    from corda_kernels.integrations import peft_global

    on = "on" if peft_global.is_globally_patched() else "OFF"
    return f"corda_kernels global PEFT patch: {on} (supports {peft_global.SUPPORTED_TEXT})"


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line("corda_kernels global PEFT patch, per LoRA layer built:")
    for outcome, count in sorted(_OUTCOMES.items()):
        terminalreporter.write_line(f"  {count:7d}  {outcome}")


def pytest_unconfigure(config):
    if getattr(config, "_corda_kernels_patched", False):
        import corda_kernels
        from corda_kernels.integrations import peft_patch

        corda_kernels.unpatch_peft()
        peft_patch.patch_layer = getattr(peft_patch.patch_layer, "__wrapped__", peft_patch.patch_layer)
