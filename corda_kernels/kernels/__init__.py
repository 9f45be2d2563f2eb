"""Per-device kernels, none of which validates input (the public ops in :mod:`corda_kernels.ops` do):

- ``reference/``: pure torch, the specification of every op and the fallback on any device;
- ``torch/``: tuned torch compositions (the CPU path; they run on any device);
- ``triton/``: Triton kernels (CUDA, or the CPU under ``TRITON_INTERPRET=1``);
- ``cuda.py``: glue to the compiled extension ``corda_kernels._C`` (cuBLAS, from ``csrc/``).
"""
