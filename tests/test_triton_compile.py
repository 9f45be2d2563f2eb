"""Every Triton kernel, as the launchers call it on a GPU, compiles for Hopper and Ampere.

The interpreter (how CI runs the kernels) checks the math, not what only a real compile sees: bf16
``tl.dot`` operands, tensor-core layouts, pipelining, shared memory. Here the launchers run on CPU
tensors with their CUDA configuration while every kernel launch is recorded instead of executed;
each distinct launch (argument dtypes, flags, tile sizes, warps, stages, every autotune candidate
that the dtype keeps) is then compiled ahead of time with Triton's own NVIDIA backend (LLVM ->
PTX -> ptxas -> cubin, no GPU needed) for sm_90 (H100/H200) and sm_80 (A100), and its static
shared memory checked against the device's per-block limit. This runs in a subprocess without
``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` builds interpreter objects, not
compilable ones): ``python tests/test_triton_compile.py sm_90`` prints its findings as JSON.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
TARGETS = {"sm_90": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}
H100_SMS = 132
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64", torch.uint8: "u8"}  # fmt: skip


class _Recorder:
    """Stands in for a ``@triton.jit`` (or autotuned) kernel: ``kernel[grid](*args, **kwargs)`` records."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, args, kwargs))


def _specs(kernel, args, kwargs):
    """``(jit function, signature, constexprs, options)`` of every compile a launch can trigger."""
    import triton

    configs = [None]
    if isinstance(kernel, triton.runtime.Autotuner):
        named = dict(zip(kernel.fn.arg_names, args))
        configs = kernel.early_config_prune(kernel.configs, named) if kernel.early_config_prune else kernel.configs
        kernel = kernel.fn
    out = []
    for config in configs:
        values = dict(zip(kernel.arg_names, args), **kwargs, **(config.kwargs if config else {}))
        options = {"num_warps": values.pop("num_warps", config.num_warps if config else 4),
                   "num_stages": values.pop("num_stages", config.num_stages if config else 3)}  # fmt: skip
        signature, constexprs = {}, {}
        for param in kernel.params:
            value = values[param.name]
            if param.is_constexpr:
                signature[param.name], constexprs[param.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + _TYPES[value.dtype]
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{kernel.__name__}: unexpected argument {param.name}={value!r}")
            elif isinstance(value, int):
                signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            else:
                signature[param.name] = "fp32"
        out.append((kernel, signature, constexprs, options))
    return out


def _key(spec):
    kernel, signature, constexprs, options = spec
    return (kernel.__name__, tuple(signature.items()), tuple(constexprs.items()), tuple(options.items()))


def record() -> list:
    """Run the launchers with their CUDA configuration, every kernel launch recorded, not executed."""
    from corda_kernels.kernels import covariance_triton as ct
    from corda_kernels.kernels import lowrank_triton as lt

    launches: list = []
    patches = [mock.patch.object(ct, "launch_config", lambda d, n, dtype, device: ct.gpu_config(d, n, dtype, H100_SMS)),
               mock.patch.object(lt, "launch_config", lambda dtype, r, device: lt.gpu_config(dtype, r)),
               mock.patch.object(lt, "_sm_count", lambda device: H100_SMS)]  # fmt: skip
    for module, name in [(ct, "_covariance_kernel"), (lt, "_project_kernel"), (lt, "_fused_gemm_kernel"),
                         (lt, "_fused_gemm_tuned"), (lt, "_gram_kernel")]:  # fmt: skip
        patches.append(mock.patch.object(module, name, _Recorder(getattr(module, name), launches)))
    for patch in patches:
        patch.start()
    try:
        _covariance_launches(ct)
        _lowrank_launches(lt)
    finally:
        for patch in patches:
            patch.stop()
    return launches


def _covariance_launches(ct):
    for dtype, masked, (d, n) in itertools.product(DTYPES, (False, True), [(4096, 8192), (64, 4096), (200, 100)]):
        x = torch.zeros(2, n // 2, d, dtype=dtype)
        mask = torch.ones(2, n // 2, dtype=torch.bool) if masked else None
        ct.covariance_update(torch.zeros(d, d), x, mask, upper_only=True)


def _lowrank_launches(lt):
    out_f, in_f, n, r = 96, 80, 64, 16
    for dtype, rows, cols, dropout, bias in itertools.product(DTYPES, (False, True), (False, True), (0.0, 0.1), (False, True)):
        x = torch.zeros(n, in_f, dtype=dtype)
        weight = torch.zeros(out_f, in_f, dtype=dtype)
        row_index = torch.arange(0, out_f, 2) if rows else None
        col_index = torch.arange(0, in_f, 2) if cols else None
        A = torch.zeros(r, in_f // 2 if cols else in_f, dtype=dtype)
        B = torch.zeros(out_f // 2 if rows else out_f, r, dtype=dtype)
        seed = torch.zeros((), dtype=torch.int64) if dropout else None
        b = torch.zeros(out_f, dtype=dtype) if bias else None
        lt.forward(x, weight, A, B, b, row_index, col_index, None, seed, dropout, 1.0)
        u = torch.zeros(n, r)
        lt.backward(torch.zeros(n, out_f, dtype=dtype), x, weight, A, B, None, u, row_index, col_index, seed, dropout,
                    1.0, (True, False, True, True, False, False))  # fmt: skip


def compile_all(target: str, shard: int = 0, shards: int = 1) -> dict:
    """Compile every distinct recorded launch (those of ``shard`` out of ``shards``) for ``target``:
    which kernels were launched, how many launches compiled, which exceed the shared memory limit."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launches = record()
    specs = {}
    for kernel, args, kwargs in launches:
        for spec in _specs(kernel, args, kwargs):
            specs.setdefault(_key(spec), spec)
    capability, smem_limit = TARGETS[target]
    too_big = []
    for kernel, signature, constexprs, options in list(specs.values())[shard::shards]:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", capability, 32), options=options)  # fmt: skip
        if not compiled.asm.get("cubin"):
            raise RuntimeError(f"{kernel.__name__}: no cubin for {target}")
        if compiled.metadata.shared > smem_limit:
            too_big.append([kernel.__name__, repr(constexprs), repr(options), compiled.metadata.shared])
    return {
        "kernels": sorted({_kernel_name(k) for k, _, _ in launches}),
        "atomic": sorted({kw["ATOMIC"] for _, _, kw in launches if "ATOMIC" in kw}),
        "compiled": len(list(specs)[shard::shards]),
        "too_big": too_big,
    }


def _kernel_name(kernel) -> str:
    return getattr(kernel, "fn", kernel).__name__


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_launch_compiles_for_the_gpu(target):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    shards = min(4, os.cpu_count() or 1)
    procs = [subprocess.Popen([sys.executable, __file__, target, str(i), str(shards)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(shards)]  # fmt: skip
    found = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err[-4000:]
        found.append(json.loads(out.strip().splitlines()[-1]))
    assert found[0]["kernels"] == ["_covariance_kernel", "_fused_gemm_kernel", "_gram_kernel", "_project_kernel"]
    assert found[0]["atomic"] == [False, True]  # split and single-pass reductions both compiled
    assert sum(f["compiled"] for f in found) >= 40
    too_big = [entry for f in found for entry in f["too_big"]]
    assert not too_big, f"shared memory over the {target} per-block limit: {too_big}"


if __name__ == "__main__":
    print(json.dumps(compile_all(sys.argv[1], *map(int, sys.argv[2:]))))
