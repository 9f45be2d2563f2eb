"""Build corda_kernels and, when torch is importable, its extension ``corda_kernels._C``.

Install with ``pip install --no-build-isolation .`` so the build uses the torch already installed
(build isolation would download a second, multi-GB torch just to compile against it).

Environment switches (same spirit as flash-attention / torchao):
  CORDA_KERNELS_SKIP_EXT=1         build no extension at all (pure Python + Triton package)
  CORDA_KERNELS_SKIP_CUDA_BUILD=1  build only the C++ sources, even if CUDA is available
  CORDA_KERNELS_FORCE_CUDA=1       build the CUDA sources even if torch sees no GPU (needs nvcc and
                                   a CUDA build of torch; e.g. on a GPU-less build machine)
  CORDA_KERNELS_CUDA_ARCHS="8.0;9.0"  passed to TORCH_CUDA_ARCH_LIST when it is unset
  MAX_JOBS                          ninja parallelism
"""

import glob
import os
import shutil
import sys

from setuptools import setup


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _extensions():
    if _flag("CORDA_KERNELS_SKIP_EXT"):
        print("corda_kernels: CORDA_KERNELS_SKIP_EXT=1, building without corda_kernels._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "corda_kernels: torch is not importable in this build environment, so corda_kernels._C is not "
            "built (the package still works through Triton/torch). Install torch first and use "
            "`pip install --no-build-isolation` to build the extension.",
            file=sys.stderr,
        )
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    torch_has_cuda = torch.version.cuda is not None
    want_cuda = not _flag("CORDA_KERNELS_SKIP_CUDA_BUILD") and (
        _flag("CORDA_KERNELS_FORCE_CUDA") or (torch_has_cuda and torch.cuda.is_available())
    )
    if want_cuda and not (torch_has_cuda and nvcc and CUDA_HOME):
        reason = "torch is a CPU-only build" if not torch_has_cuda else "nvcc / CUDA_HOME not found"
        if _flag("CORDA_KERNELS_FORCE_CUDA"):
            raise RuntimeError(f"CORDA_KERNELS_FORCE_CUDA=1 but the CUDA extension cannot be built: {reason}")
        want_cuda = False

    cxx_flags = ["-O3", "-std=c++17"]
    include_dirs = [os.path.join(here, "csrc")]
    if want_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("CORDA_KERNELS_CUDA_ARCHS", "8.0;8.6;8.9;9.0")
        ext = CUDAExtension(
            "corda_kernels._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("CORDA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
            libraries=["cublas", "cublasLt"],
        )
        print("corda_kernels: building corda_kernels._C with CUDA sources", file=sys.stderr)
    else:
        ext = CppExtension("corda_kernels._C", cpp_sources, include_dirs=include_dirs, extra_compile_args=cxx_flags)
        print("corda_kernels: building corda_kernels._C (C++ only)", file=sys.stderr)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
