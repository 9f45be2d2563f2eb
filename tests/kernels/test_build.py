"""The compiled extension: what was built, and that the CUDA sources still compile without a GPU.

(a) ``corda_kernels._C`` exists exactly when there is CUDA to compile (a CUDA torch that sees a GPU),
    and then carries the CUDA entry points.
(b) When nvcc is found, every ``csrc/*.cu`` is compiled to an object file with nvcc, and
    ``csrc/extension.cpp`` with the host compiler under ``CORDA_WITH_CUDA``, using setup.py's own
    flags (one architecture, sm_90, to stay quick). A CPU-only torch ships the ATen/c10 CUDA headers,
    so this catches CUDA sources rotting on GPU-less machines. Linking needs a CUDA torch and is not
    attempted. Skipped when nvcc or the CUDA library headers (cuBLAS, cuSPARSE, cuSOLVER, which
    ATen/cuda includes) are missing; point ``CUDA_INC_PATH`` at them or pip-install the NVIDIA
    wheels (``nvidia-cublas nvidia-cusparse nvidia-cusolver``) to enable it. About 20 s per file.
(c) setup.py's decisions that need no compiler: skip switch, isolated build, FORCE_CUDA on CPU torch.
"""

from __future__ import annotations

import glob
import inspect
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETUP_PY = os.path.join(ROOT, "setup.py")
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
COMPILE_TIMEOUT_S = 600


def _setup_module() -> dict:
    """setup.py's namespace without running setup() (it runs only under __main__)."""
    return runpy.run_path(SETUP_PY, run_name="corda_kernels_setup")


# ---------------------------------------------------------------------------------------------- (a)


def _cuda_build_expected() -> bool:
    skip = any(
        os.environ.get(k, "0") not in ("", "0") for k in ("CORDA_KERNELS_SKIP_EXT", "CORDA_KERNELS_SKIP_CUDA_BUILD")
    )
    return not skip and torch.version.cuda is not None and torch.cuda.is_available()


def test_extension_built_exactly_when_there_is_cuda_to_compile():
    """``_C`` carries only CUDA ops: a CPU-only install compiles nothing; a GPU install has them all."""
    from corda_kernels import _backend

    ext = _backend.extension()
    if not _cuda_build_expected():
        assert ext is None or ext.built_with_cuda(), "a C++-only _C is dead weight (stale build in the tree?)"
        assert _backend.extension_has_cuda() == (ext is not None)
        return
    assert ext is not None, (
        "torch has CUDA and sees a GPU but _C was not built; `pip install --no-build-isolation -e .`"
    )
    assert ext.built_with_cuda() and hasattr(ext, "covariance_update_cublas")
    assert _backend.extension_has_cuda()


# ---------------------------------------------------------------------------------------------- (b)


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def _cuda_home() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME, "/usr/local/cuda"):
        if home and os.path.isdir(home):
            return home
    return None


def _torch_cxx_std() -> str:
    """The -std that torch's BuildExtension adds (setup.py leaves it to torch): c++20 in recent torch,
    c++17 before. Read from BuildExtension's source, where the flag is spelled out."""
    from torch.utils import cpp_extension

    found = re.findall(r"c\+\+(\d\d)", inspect.getsource(cpp_extension.BuildExtension))
    return f"c++{max(found, default='17')}"


def _abi_flags() -> list[str]:
    from torch.utils import cpp_extension

    getter = getattr(cpp_extension, "_get_glibcxx_abi_build_flags", None)
    if getter is not None:
        return list(getter())
    return [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def _common_args(setup_ns: dict) -> list[str]:
    """Defines and include dirs shared by the nvcc and host compiles (what BuildExtension passes)."""
    from torch.utils.cpp_extension import include_paths

    torch_includes = include_paths()
    args = [f"-D{k}={v}" for k, v in setup_ns["CUDA_DEFINE_MACROS"]]
    args += ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", *_abi_flags()]
    # A CPU-only torch does not ship the generated c10/cuda/impl/cuda_cmake_macros.h; it only holds
    # the Windows DLL-export switch, which the documented macro below skips.
    if not any(os.path.exists(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in torch_includes):
        args.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    includes = [setup_ns["CSRC"], *torch_includes, *setup_ns["cuda_include_dirs"](_cuda_home())]
    cuda_home = _cuda_home()
    if cuda_home:
        includes.append(os.path.join(cuda_home, "include"))
    includes.append(sysconfig.get_paths()["include"])
    return args + [f"-I{d}" for d in includes]


@pytest.fixture(scope="module")
def nvcc_setup():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    from torch.utils import cpp_extension

    setup_ns = _setup_module()
    common = _common_args(setup_ns)
    probe = "".join(f"#include <{h}>\n" for h in setup_ns["CUDA_LIBRARY_HEADERS"])
    check = subprocess.run(
        [nvcc, "-E", "-x", "cu", "-", "-o", os.devnull, *[a for a in common if a.startswith("-I")]],
        input=probe,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check.returncode != 0:
        lines = check.stderr.strip().splitlines() or [""]
        reason = next((line for line in lines if "error" in line), lines[-1])
        pytest.skip(
            "CUDA library headers not found (set CUDA_INC_PATH or pip-install nvidia-cublas nvidia-cusparse "
            f"nvidia-cusolver): {reason.strip()}"
        )
    nvcc_flags = [
        *cpp_extension.COMMON_NVCC_FLAGS,
        "--compiler-options",
        "-fPIC",
        *setup_ns["NVCC_FLAGS"],
        f"-std={_torch_cxx_std()}",
        "-gencode=arch=compute_90,code=sm_90",
    ]
    return {"nvcc": nvcc, "common": common, "nvcc_flags": nvcc_flags, "cxx_flags": setup_ns["CXX_FLAGS"]}


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    log = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, f"{what} failed:\n{' '.join(cmd)}\n{log[-6000:]}"


@pytest.mark.skipif(not CU_SOURCES, reason="no csrc/*.cu sources")
@pytest.mark.parametrize("source", CU_SOURCES, ids=[os.path.basename(s) for s in CU_SOURCES])
def test_cuda_source_compiles(source, nvcc_setup, tmp_path):
    obj = tmp_path / (os.path.basename(source) + ".o")
    _run([nvcc_setup["nvcc"], "-c", source, "-o", str(obj), *nvcc_setup["nvcc_flags"], *nvcc_setup["common"]], "nvcc")
    assert obj.stat().st_size > 0


def test_cuda_bindings_compile(nvcc_setup, tmp_path):
    """extension.cpp's CORDA_WITH_CUDA branch (never compiled by a CPU build) matches the .cu signatures."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    obj = tmp_path / "extension.o"
    source = os.path.join(ROOT, "csrc", "extension.cpp")
    _run(
        [
            cxx,
            "-c",
            source,
            "-o",
            str(obj),
            "-fPIC",
            f"-std={_torch_cxx_std()}",
            *nvcc_setup["cxx_flags"],
            *nvcc_setup["common"],
        ],
        "host compile of extension.cpp with CORDA_WITH_CUDA",
    )
    assert obj.stat().st_size > 0


# ---------------------------------------------------------------------------------------------- (c)


def test_setup_skip_ext(monkeypatch):
    monkeypatch.setenv("CORDA_KERNELS_SKIP_EXT", "1")
    assert _setup_module()["_extensions"]() == ([], {})


def test_setup_without_torch_builds_pure_python(monkeypatch, capsys):
    """An isolated build has no torch: no extension, a clear message, and no attempt to get torch."""
    monkeypatch.delenv("CORDA_KERNELS_SKIP_EXT", raising=False)
    ns = _setup_module()
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    assert ns["_extensions"]() == ([], {})
    assert "--no-build-isolation" in capsys.readouterr().err


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_setup_with_cpu_torch_compiles_nothing(monkeypatch, capsys):
    for name in ("CORDA_KERNELS_SKIP_EXT", "CORDA_KERNELS_SKIP_CUDA_BUILD", "CORDA_KERNELS_FORCE_CUDA"):
        monkeypatch.delenv(name, raising=False)
    assert _setup_module()["_extensions"]() == ([], {})
    assert "not building corda_kernels._C (no CUDA device visible to torch)" in capsys.readouterr().err


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_setup_force_cuda_with_cpu_torch_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("CORDA_KERNELS_SKIP_EXT", raising=False)
    monkeypatch.delenv("CORDA_KERNELS_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setenv("CORDA_KERNELS_FORCE_CUDA", "1")
    with pytest.raises(RuntimeError, match="CORDA_KERNELS_FORCE_CUDA=1 .*CPU-only"):
        _setup_module()["_extensions"]()


def test_pyproject_does_not_require_torch_to_build():
    """torch in [build-system].requires would make every isolated build download a second torch."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        requires = tomllib.load(fh)["build-system"]["requires"]
    assert not [r for r in requires if re.match(r"\s*torch\b", r)], requires
