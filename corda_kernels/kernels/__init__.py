"""Per-device kernels: Triton (``*_triton.py``), torch compositions for CPU (``*_cpu.py``), the
compiled extension (``corda_kernels._C`` from ``csrc/``) and the pure-torch ``reference`` package.
Nothing here validates input; the public ops in :mod:`corda_kernels.ops` do."""
