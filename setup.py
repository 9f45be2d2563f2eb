"""Build corda_kernels and, when torch is importable, its extension ``corda_kernels._C``.

Install with ``pip install --no-build-isolation .`` so the build uses the torch already installed
(build isolation would download a second, multi-GB torch just to compile against it). An isolated
build (plain ``pip install .`` / ``pip wheel .``) does not download torch: torch is not a build
requirement, so it finds no torch and produces a pure-Python package without ``_C``.

The extension only carries CUDA ops (cuBLAS paths Triton cannot reach), so it is built only when
there is CUDA to compile: with a CUDA torch that sees a GPU, or when forced. On a CPU-only torch the
install compiles nothing (the ops run through Triton/torch) and takes seconds.

Environment switches (same spirit as flash-attention / torchao):
  CORDA_KERNELS_SKIP_EXT=1         build no extension at all (pure Python + Triton package)
  CORDA_KERNELS_SKIP_CUDA_BUILD=1  build no extension even if CUDA is available
  CORDA_KERNELS_FORCE_CUDA=1       build the CUDA sources even if torch sees no GPU (needs nvcc and
                                   a CUDA build of torch; e.g. on a GPU-less build machine)
  CORDA_KERNELS_CUDA_ARCHS="8.0;9.0"  passed to TORCH_CUDA_ARCH_LIST when it is unset
  CUDA_INC_PATH                     an extra include dir for the CUDA library headers (torch's own
                                   convention); pip-installed NVIDIA wheels (nvidia-cublas, ...)
                                   are searched too when the toolkit lacks cublas_v2.h
  MAX_JOBS                          ninja parallelism

The compiler flags live in module-level names (CXX_FLAGS, NVCC_FLAGS, CUDA_DEFINE_MACROS) and
helpers (cuda_include_dirs) so that tests/kernels/test_build.py compiles csrc/*.cu with the same flags on
machines without a GPU. Importing this file does not run setup() (that happens under __main__, which
is how pip / setuptools execute it).
"""

import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
# No -std here: torch's BuildExtension adds the standard its headers need (c++17 up to some
# releases, c++20 in torch 2.13), and nvcc refuses two -std flags.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]
CUDA_DEFINE_MACROS = [("CORDA_WITH_CUDA", "1")]
CUDA_LIBRARIES = ["cublas"]
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"  # +PTX: newer GPUs (e.g. Blackwell) JIT the sm_90 PTX
# Headers that torch's ATen/cuda/CUDAContext.h pulls in besides the toolkit's own.
CUDA_LIBRARY_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _log(message: str) -> None:
    print(f"corda_kernels: {message}", file=sys.stderr)


def _nvidia_wheel_dirs(kind: str) -> list:
    """``include`` or ``lib`` dirs of pip-installed NVIDIA wheels: nvidia/cu13/<kind> (CUDA 13) or
    nvidia/<library>/<kind> (CUDA 12 wheels such as nvidia-cublas-cu12)."""
    try:
        import nvidia  # namespace package installed by nvidia-* wheels
    except ImportError:
        return []
    found = []
    for root in getattr(nvidia, "__path__", []):
        found.extend(sorted(d for d in glob.glob(os.path.join(root, "*", kind)) if os.path.isdir(d)))
    return found


def cuda_include_dirs(cuda_home) -> list:
    """Extra include dirs for the CUDA library headers (cuBLAS, cuSPARSE, cuSOLVER) when the toolkit
    at ``cuda_home`` does not ship them (e.g. a bare nvcc beside a pip-installed CUDA torch)."""
    dirs = []
    if os.environ.get("CUDA_INC_PATH"):
        dirs.append(os.environ["CUDA_INC_PATH"])
    if cuda_home and os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return dirs
    return dirs + [d for d in _nvidia_wheel_dirs("include") if d not in dirs]


def _cuda_link_args(cuda_home) -> list:
    """Link cuBLAS from a pip-installed NVIDIA wheel when the toolkit has no libcublas.so (those wheels
    ship only the versioned libcublas.so.N; torch has already loaded it when _C is imported)."""
    for sub in ("lib64", "lib"):
        if cuda_home and glob.glob(os.path.join(cuda_home, sub, "libcublas.so")):
            return []
    for lib_dir in _nvidia_wheel_dirs("lib"):
        versioned = sorted(glob.glob(os.path.join(lib_dir, "libcublas.so.*")))
        if versioned:
            return [f"-L{lib_dir}", f"-l:{os.path.basename(versioned[0])}"]
    return []


def _extensions():
    if _flag("CORDA_KERNELS_SKIP_EXT"):
        _log("CORDA_KERNELS_SKIP_EXT=1, building without corda_kernels._C")
        stale = glob.glob(os.path.join(HERE, "corda_kernels", "_C*.so")) + glob.glob(
            os.path.join(HERE, "corda_kernels", "_C*.pyd")
        )
        if stale:
            _log(
                f"note: an earlier build left {os.path.relpath(stale[0], HERE)} in the source tree; an "
                "editable install keeps importing it. Delete it to run without the extension."
            )
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        _log(
            "torch is not importable in this build environment (an isolated build?), so corda_kernels._C "
            "is not built and this is a pure-Python package (it works through Triton/torch). To build the "
            "extension, install torch first and use `pip install --no-build-isolation`."
        )
        return [], {}

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    nvcc = nvcc if nvcc and os.path.exists(nvcc) else None
    torch_has_cuda = torch.version.cuda is not None
    forced = _flag("CORDA_KERNELS_FORCE_CUDA")
    skip_cuda = _flag("CORDA_KERNELS_SKIP_CUDA_BUILD")
    want_cuda = not skip_cuda and (forced or (torch_has_cuda and torch.cuda.is_available()))
    why_not_cuda = "CORDA_KERNELS_SKIP_CUDA_BUILD=1" if skip_cuda else "no CUDA device visible to torch"
    if want_cuda and not (torch_has_cuda and nvcc and CUDA_HOME):
        why_not_cuda = "torch is a CPU-only build" if not torch_has_cuda else "nvcc / CUDA_HOME not found"
        if forced:
            raise RuntimeError(f"CORDA_KERNELS_FORCE_CUDA=1 but the CUDA extension cannot be built: {why_not_cuda}")
        want_cuda = False

    include_dirs = [CSRC]
    if want_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("CORDA_KERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        ext = CUDAExtension(
            "corda_kernels._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs + cuda_include_dirs(CUDA_HOME),
            define_macros=list(CUDA_DEFINE_MACROS),
            extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": list(NVCC_FLAGS)},
            libraries=list(CUDA_LIBRARIES) if not _cuda_link_args(CUDA_HOME) else [],
            extra_link_args=_cuda_link_args(CUDA_HOME),
        )
        _log(f"building corda_kernels._C with CUDA sources (archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
    else:
        _log(f"not building corda_kernels._C ({why_not_cuda}): it only carries CUDA ops; Triton/torch paths are used")
        return [], {}
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
