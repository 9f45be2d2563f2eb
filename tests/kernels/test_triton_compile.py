"""Every Triton kernel, as the launchers call it on a GPU, compiles for Hopper and Ampere, fits in
shared memory, and (on aligned shapes) does not spill registers.

The interpreter (how CI runs the kernels) checks the math, not what only a real compile sees: bf16
``tl.dot`` operands, tensor-core layouts, pipelining, shared memory, registers. Here the launchers
run on CPU tensors with their CUDA configuration while every kernel launch is recorded instead of
executed. Each launch goes through Triton's own argument binder for the GPU target, so it gets the
specialization the JIT would give it on a GPU (integer arguments equal to 1 folded, 16-byte
alignment of pointers and divisibility of integers), and every distinct result (argument dtypes,
flags, tile sizes, warps, stages, every autotune candidate that the dtype keeps) is compiled ahead
of time by Triton's NVIDIA backend (LLVM -> PTX -> ptxas -> cubin, no GPU needed) for sm_90
(H100/H200) and sm_80 (A100). Checked: a cubin exists; its shared memory fits the device's
per-block limit; register spills (the stack frame ``cuobjdump --dump-resource-usage`` reports) are
zero on aligned shapes with 16-bit inputs: for the covariance and skinny kernels (the segmented
many-adapter op's shrink / expand / gram kernels included), and for at least one autotune candidate of
every flag set of the fused GEMM. The fused GEMM dequantizing an NF4 /
int8 base (``QUANT``, one fixed tile, not autotuned) is compiled and checked for shared memory only.

This runs in subprocesses without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit``
builds interpreter objects, not compilable ones): ``python tests/kernels/test_triton_compile.py sm_90``
prints its findings as JSON.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from unittest import mock

import pytest
import torch

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
TARGETS = {"sm_90": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}
H100_SMS = 132
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FLAGS = ("HAS_", "ATOMIC", "BLOCK_", "QUANT")


class _Recorder:
    """Stands in for a ``@triton.jit`` (or autotuned) kernel: ``kernel[grid](*args, **kwargs)`` records
    the launch with the current case label."""

    def __init__(self, kernel, launches: list, case: list):
        self.kernel, self.launches, self.case = kernel, launches, case

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.case[0], self.kernel, args, kwargs))


def record() -> list:
    """``(case, kernel, args, kwargs)`` of every launch the launchers make with their CUDA
    configuration; recorded, not executed. ``case``: ``(op, dtype name, aligned)``."""
    from corda_kernels.kernels.triton import covariance as ct
    from corda_kernels.kernels.triton import lowrank_linear as lt
    from corda_kernels.kernels.triton import segmented as st

    launches: list = []
    case = [None]
    patches = [
        mock.patch.object(ct, "launch_config", lambda d, n, dtype, device: ct.gpu_config(d, n, dtype, H100_SMS)),
        mock.patch.object(lt, "launch_config", lambda dtype, r, device: lt.gpu_config(dtype, r)),
        mock.patch.object(lt, "sm_count", lambda device: H100_SMS),
        mock.patch.object(st, "launch_config", lambda dtype, r, rows, n, device: st.gpu_config(dtype, r, rows, n)),
        mock.patch.object(st, "sm_count", lambda device: H100_SMS),
    ]
    for module, name in [
        (ct, "_covariance_kernel"),
        (lt, "_project_kernel"),
        (lt, "_fused_gemm_kernel"),
        (lt, "_fused_gemm_tuned"),
        (lt, "_gram_kernel"),
        (st, "_seg_shrink_kernel"),
        (st, "_seg_expand_kernel"),
        (st, "_seg_gram_kernel"),
    ]:
        patches.append(mock.patch.object(module, name, _Recorder(getattr(module, name), launches, case)))
    for patch in patches:
        patch.start()
    try:
        _covariance_launches(ct, case)
        _lowrank_launches(lt, case)
        _quantized_lowrank_launches(lt, case)
        _segmented_launches(st, case)
    finally:
        for patch in patches:
            patch.stop()
    return launches


def _covariance_launches(ct, case):
    for dtype, masked, (d, n) in itertools.product(DTYPES, (False, True), [(4096, 8192), (64, 4096), (200, 100)]):
        case[0] = ("covariance", str(dtype), d % 16 == 0)
        x = torch.zeros(2, n // 2, d, dtype=dtype)
        mask = torch.ones(2, n // 2, dtype=torch.bool) if masked else None
        ct.covariance_update(torch.zeros(d, d), x, mask, upper_only=True)


def _launch_lowrank(lt, weight, dtype, shape, flags) -> None:
    """One forward and one backward (dx, dA, dB) of the fused op on zero inputs of ``shape``
    ``(out, in, n, r)`` with ``flags`` ``(rows, cols, dropout, bias)``; ``weight`` dense or quantized."""
    out_f, in_f, n, r = shape
    rows, cols, dropout, bias = flags
    dropout = 0.1 if dropout else 0.0
    x = torch.zeros(n, in_f, dtype=dtype)
    row_index = torch.arange(0, out_f, 2) if rows else None
    col_index = torch.arange(0, in_f, 2) if cols else None
    A = torch.zeros(r, in_f // 2 if cols else in_f, dtype=dtype)
    B = torch.zeros(out_f // 2 if rows else out_f, r, dtype=dtype)
    seed = torch.zeros((), dtype=torch.int64) if dropout else None
    b = torch.zeros(out_f, dtype=dtype) if bias else None
    opts = lt.Options(1.0, b, row_index, col_index, None, dropout, seed)
    lt.forward(x, weight, A, B, opts)
    dy, u = torch.zeros(n, out_f, dtype=dtype), torch.zeros(n, r)
    needs = (True, False, True, True, False, False)
    lt.backward(dy, x, weight, A, B, u, opts, needs)


def _lowrank_launches(lt, case):
    """Every flag combination on an aligned shape; all flags at once on an odd one."""
    combos = list(itertools.product((False, True), repeat=4))
    for dtype, (out_f, in_f, n, r), flags in [(dt, (256, 128, 128, 16), f) for dt in DTYPES for f in combos] + [
        (dt, (96, 72, 50, 12), (True,) * 4) for dt in DTYPES
    ]:
        case[0] = ("lowrank", str(dtype), out_f % 32 == 0 and in_f % 32 == 0 and n % 16 == 0)
        weight = torch.zeros(out_f, in_f, dtype=dtype)
        _launch_lowrank(lt, weight, dtype, (out_f, in_f, n, r), flags)


def _quantized_lowrank_launches(lt, case):
    """The fused GEMM dequantizing NF4 / int8 tiles (forward and dx), aligned, plain and all flags."""
    try:
        import bitsandbytes  # noqa: F401

        from corda_kernels.ops.quantized import quantize_weight
    except ImportError:
        return
    shape = (256, 128, 128, 16)
    for dtype, fmt, flags in itertools.product(DTYPES, ("nf4", "int8"), [(False,) * 4, (True,) * 4]):
        case[0] = ("lowrank-" + fmt, str(dtype), True)
        weight = quantize_weight(torch.randn(shape[0], shape[1]).to(dtype), fmt)
        _launch_lowrank(lt, weight, dtype, shape, flags)


def _segmented_launches(st, case):
    """One forward and one backward (dx, dA, dB) of the segmented op per shape ``(out, in, N, n, r_max)``:
    row tiles of 32 / 64 / 16 rows (mean segment 32, 128, 1), ranks 16 to 128 (padded: ranks vary),
    split (atomic) and single-pass reductions, and an odd shape."""
    shapes = [(256, 128, 128, 4, 16), (256, 128, 512, 4, 64), (256, 128, 64, 64, 128), (256, 128, 4096, 4, 64)]
    for dtype, (out_f, in_f, n_rows, n, r) in [(dt, s) for dt in DTYPES for s in shapes + [(96, 72, 50, 3, 12)]]:
        case[0] = ("segmented", str(dtype), out_f % 32 == 0 and in_f % 32 == 0 and n_rows % 16 == 0)
        x = torch.zeros(n_rows, in_f, dtype=dtype)
        weight = torch.zeros(out_f, in_f, dtype=dtype)
        A, B = torch.zeros(n, r, in_f, dtype=dtype), torch.zeros(n, out_f, r, dtype=dtype)
        index = torch.arange(n_rows) % (n + 1) - 1  # every adapter and -1
        scales, ranks = torch.ones(n), torch.arange(n) % r + 1
        _, u = st.forward(x, weight, A, B, index, scales, ranks, None)
        dy = torch.zeros(n_rows, out_f, dtype=dtype)
        st.backward(dy, x, weight, A, B, index, scales, ranks, u, (True, False, True, True, False))


def _compile_inputs(kernel, args, kwargs, backend):
    """``(jit function, candidate, signature, constexprs, attrs, options)`` for every compile the
    launch can trigger on ``backend``, exactly as ``JITFunction.run`` would derive them."""
    import triton
    from triton.runtime.jit import create_function_from_signature

    configs = [None]
    if isinstance(kernel, triton.runtime.Autotuner):
        named = dict(zip(kernel.fn.arg_names, args))
        configs = kernel.early_config_prune(kernel.configs, named) if kernel.early_config_prune else kernel.configs
        kernel = kernel.fn
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    out = []
    for index, config in enumerate(configs):
        kw = dict(kwargs, **(config.all_kwargs() if config else {}))
        bound, specialization, options = binder(*args, **kw)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, specialization, options)
        out.append((kernel, index if config else None, signature, constexprs, attrs, options))
    return out


def _stack_bytes(cubin: bytes) -> int:
    """The per-thread stack frame (register spills) of a cubin's kernel, from Triton's cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        report = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True, check=True)
    return int(re.search(r"STACK:(\d+)", report.stdout).group(1))


def compile_all(target: str, shard: int = 0, shards: int = 1) -> dict:
    """Compile every distinct launch (those of ``shard`` out of ``shards``) for ``target``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    capability, smem_limit = TARGETS[target]
    gpu = GPUTarget("cuda", capability, 32)
    backend = make_backend(gpu)
    launches = record()
    specs: dict = {}
    for case, kernel, args, kwargs in launches:
        for kernel_fn, candidate, signature, constexprs, attrs, options in _compile_inputs(
            kernel, args, kwargs, backend
        ):
            key = (kernel_fn.__name__, repr(signature), repr(constexprs), repr(attrs), repr(options))
            spec = specs.setdefault(
                key, {"fn": kernel_fn, "inputs": (signature, constexprs, attrs, options), "uses": []}
            )
            launch_flags = {k: v for k, v in kwargs.items() if k.startswith(FLAGS)}
            spec["uses"].append([list(case), _kernel_name(kernel), json.dumps(launch_flags, sort_keys=True), candidate])
    results = []
    for key in sorted(specs)[shard::shards]:
        spec = specs[key]
        signature, constexprs, attrs, options = spec["inputs"]
        compiled = triton.compile(
            ASTSource(spec["fn"], signature, constexprs, attrs), target=gpu, options=options.__dict__
        )
        if not compiled.asm.get("cubin"):
            raise RuntimeError(f"{spec['fn'].__name__}: no cubin for {target}")
        results.append(
            {
                "kernel": spec["fn"].__name__,
                "shared": compiled.metadata.shared,
                "smem_limit": smem_limit,
                "stack": _stack_bytes(compiled.asm["cubin"]),
                "uses": spec["uses"],
                "options": {"num_warps": options.num_warps, "num_stages": options.num_stages},
                "constexprs": {
                    spec["fn"].arg_names[k[0]]: v
                    for k, v in constexprs.items()
                    if spec["fn"].arg_names[k[0]].startswith(FLAGS)
                },
            }
        )
    return {
        "kernels": sorted({_kernel_name(k) for _, k, _, _ in launches}),
        "atomic": sorted({kw["ATOMIC"] for _, _, _, kw in launches if "ATOMIC" in kw}),
        "results": results,
    }


def _kernel_name(kernel) -> str:
    return getattr(kernel, "fn", kernel).__name__


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_launch_compiles_for_the_gpu(target):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    shards = min(4, os.cpu_count() or 1)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, target, str(i), str(shards)],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(shards)
    ]
    found = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err[-4000:]
        found.append(json.loads(out.strip().splitlines()[-1]))
    assert found[0]["kernels"] == [
        "_covariance_kernel",
        "_fused_gemm_kernel",
        "_gram_kernel",
        "_project_kernel",
        "_seg_expand_kernel",
        "_seg_gram_kernel",
        "_seg_shrink_kernel",
    ]
    assert found[0]["atomic"] == [False, True]  # split and single-pass reductions both compiled
    results = [r for f in found for r in f["results"]]
    assert len(results) >= 60

    too_big = [r for r in results if r["shared"] > r["smem_limit"]]
    assert not too_big, f"shared memory over the {target} per-block limit: {too_big}"

    def aligned_16bit(r):
        return any(case[2] and case[1] != str(torch.float32) for case, _, _, _ in r["uses"])

    # 16-bit inputs (the dtypes the GPU targets are about; fp32 is supported, not tuned: on sm_80 its
    # FMA-based dots keep 16-byte stack frames, and the gram kernel's 64 x 64 fp32 tiles spill).
    spilling = [r for r in results if r["kernel"] == "_covariance_kernel" and aligned_16bit(r) and r["stack"]]
    assert not spilling, f"covariance kernel spills registers on {target} (stack bytes): {spilling}"
    # The autotuner times every candidate; each 16-bit (dtype, flags) launch of the fused GEMM on
    # aligned shapes must keep one that does not spill.
    best: dict = {}
    for r in results:
        for case, kernel, flags, candidate in r["uses"]:
            if kernel == "_fused_gemm_kernel" and candidate is not None and case[2] and case[1] != str(torch.float32):
                key = (case[1], flags)
                best[key] = min(best.get(key, r["stack"]), r["stack"])
    assert best and not {k: v for k, v in best.items() if v}, (
        f"fused GEMM launches with every candidate spilling: {best}"
    )
    skinny_kernels = ("_project_kernel", "_gram_kernel", "_seg_shrink_kernel", "_seg_expand_kernel", "_seg_gram_kernel")
    skinny = [r for r in results if r["kernel"] in skinny_kernels and aligned_16bit(r) and r["stack"]]
    assert not skinny, f"16-bit skinny kernels spill registers on {target}: {skinny}"


if __name__ == "__main__":
    print(json.dumps(compile_all(sys.argv[1], *map(int, sys.argv[2:]))))
