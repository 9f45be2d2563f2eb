"""A pytest plugin that runs a test session with the global PEFT patch switched on.

Use it to run PEFT's own test suite on corda_kernels (from a checkout of PEFT's repository at the
tag of the installed PEFT)::

    cd /path/to/peft && PYTHONPATH=/path/to/corda_kernels/tests/integrations:/path/to/corda_kernels \\
        python -m pytest -p peft_global_plugin tests/test_initialization.py \\
        -k "pissa or corda or olora or eva or loftq"

(PEFT's ``tests`` is a package too, hence ``-p peft_global_plugin`` with this folder on the path.)

It calls ``corda_kernels.patch_peft()`` once the session is configured (before PEFT's tests are
imported or run) and ``unpatch_peft()`` when it ends, and adds a header line saying so. A test that
switches the patch off itself (``corda_kernels.unpatch_peft()``) is not re-patched.
"""

from __future__ import annotations


def pytest_configure(config):
    import corda_kernels

    corda_kernels.patch_peft()
    config._corda_kernels_patched = True


def pytest_report_header(config):
    from corda_kernels.integrations import peft_global

    on = "on" if peft_global.is_globally_patched() else "OFF"
    return f"corda_kernels global PEFT patch: {on} (supports {peft_global.SUPPORTED_TEXT})"


def pytest_unconfigure(config):
    if getattr(config, "_corda_kernels_patched", False):
        import corda_kernels

        corda_kernels.unpatch_peft()
