"""covariance_update against an fp64 oracle, on every backend that runs here.

Tolerance: fp16/bf16 products are exact in fp32 and fp32 products nearly so, so the only error is
fp32 accumulation. It is bounded elementwise by ``RTOL * (|X|ᵀ|X|)``; a wrong index or a dropped
token changes an entry by O(|X|ᵀ|X|) and fails.
"""

import pytest
import torch

import corda_kernels as ck
from corda_kernels.kernels.torch import covariance as covariance_cpu
from corda_kernels.ops import covariance as cov_ops

RTOL = 2e-5
CPU_BACKENDS = ["reference", "torch", "triton"]


def oracle(x, mask=None, upper_only=True):
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    rows = rows.double()
    gram, bound = rows.T @ rows, rows.abs().T @ rows.abs()
    return (gram.triu(), bound.triu()) if upper_only else (gram, bound)


def assert_close_to_oracle(cov, start, x, mask=None, upper_only=True):
    gram, bound = oracle(x, mask, upper_only)
    expected = start.double() + gram
    err = (cov.double() - expected).abs()
    limit = RTOL * (bound + start.double().abs()) + 1e-30
    assert bool((err <= limit).all()), f"max excess {(err - limit).max().item():.3e}"
    if upper_only:
        # The strict lower triangle is never touched.
        assert torch.equal(cov.tril(-1), start.tril(-1))


def _inputs(shape, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, d, generator=g).to(dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape,d",
    [((40,), 1), ((7,), 33), ((3, 11), 17), ((2, 3, 5), 16), ((64,), 48)],
    ids=["d1", "tokens<d", "3d-odd", "4d", "2d-multiple-of-tile"],
)
def test_matches_fp64(backend, dtype, shape, d, force_backend):
    force_backend(backend)
    x = _inputs(shape, d, dtype)
    start = torch.randn(d, d)
    cov = start.clone()
    out = ck.covariance_update(cov, x)
    assert out is cov
    assert_close_to_oracle(cov, start, x)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bf16_on_torch_backends(backend, force_backend):
    force_backend(backend)
    x = _inputs((5, 9), 21, torch.bfloat16)
    cov = torch.zeros(21, 21)
    ck.covariance_update(cov, x)
    assert_close_to_oracle(cov, torch.zeros(21, 21), x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mask_kind", ["all-true", "all-false", "random"])
def test_token_mask(backend, mask_kind, force_backend):
    force_backend(backend)
    x = _inputs((3, 13), 19, torch.float32, seed=1)
    mask = {
        "all-true": torch.ones(3, 13, dtype=torch.bool),
        "all-false": torch.zeros(3, 13, dtype=torch.bool),
        "random": torch.rand(3, 13, generator=torch.Generator().manual_seed(3)) > 0.4,
    }[mask_kind]
    # Padding rows hold garbage that must not leak in.
    x[~mask] = 1e4
    cov = torch.zeros(19, 19)
    ck.covariance_update(cov, x, mask)
    assert_close_to_oracle(cov, torch.zeros(19, 19), x, mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend, force_backend):
    force_backend(backend)
    base = _inputs((4, 10), 26, torch.float32, seed=2)
    views = {
        "sliced-tokens": base[:, ::2],
        "transposed-batch": base.transpose(0, 1),
        "feature-stride": _inputs((30,), 52, torch.float32)[:, ::2],
        "column-major": _inputs((23,), 17, torch.float32).T.contiguous().T,
    }
    for name, x in views.items():
        assert not x.is_contiguous(), name
        d = x.shape[-1]
        mask = torch.rand(x.shape[:-1], generator=torch.Generator().manual_seed(4)) > 0.3
        cov = torch.zeros(d, d)
        ck.covariance_update(cov, x, mask)
        assert_close_to_oracle(cov, torch.zeros(d, d), x, mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_full_square(backend, force_backend):
    force_backend(backend)
    x = _inputs((21,), 18, torch.float16)
    start = torch.randn(18, 18)
    cov = start.clone()
    ck.covariance_update(cov, x, upper_only=False)
    assert_close_to_oracle(cov, start, x, upper_only=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_streaming_equals_one_call(backend, force_backend):
    force_backend(backend)
    chunks = [_inputs((2, 5 + i), 20, torch.float32, seed=10 + i) for i in range(3)]
    masks = [torch.rand(c.shape[:-1], generator=torch.Generator().manual_seed(i)) > 0.2 for i, c in enumerate(chunks)]
    streamed = torch.zeros(20, 20)
    for c, m in zip(chunks, masks):
        ck.covariance_update(streamed, c, m)
    rows = torch.cat([c.reshape(-1, 20)[m.reshape(-1)] for c, m in zip(chunks, masks)])
    once = torch.zeros(20, 20)
    ck.covariance_update(once, rows)
    torch.testing.assert_close(streamed, once, rtol=1e-5, atol=1e-5)
    assert_close_to_oracle(streamed, torch.zeros(20, 20), rows)


def test_triton_split_tokens_with_atomics(force_backend, monkeypatch):
    """The split-K path (few tiles, many tokens) adds partial tiles atomically."""
    from corda_kernels.kernels.triton import covariance as covariance_triton

    x = _inputs((97,), 20, torch.float32, seed=5)
    mask = torch.rand(97, generator=torch.Generator().manual_seed(6)) > 0.5
    cov = torch.zeros(20, 20)
    cfg = dict(block_d=16, block_k=16, num_warps=1, num_stages=1, split=3)
    monkeypatch.setattr(covariance_triton, "launch_config", lambda d, n, dtype, device: cfg)
    covariance_triton.covariance_update(cov, x, mask, True)
    assert_close_to_oracle(cov, torch.zeros(20, 20), x, mask)


def test_cpu_blocked_triangle(monkeypatch, force_backend):
    """Exercise the column-blocked BLAS path and the chunking at a small width."""
    force_backend("torch")
    monkeypatch.setattr(covariance_cpu, "BLOCKED_FROM", 8)
    monkeypatch.setattr(covariance_cpu, "BLOCK", 7)
    monkeypatch.setattr(covariance_cpu, "CHUNK_BYTES", 4 * 30 * 16)  # 16-row chunks (min 256 rows per chunk)
    x = _inputs((300,), 30, torch.bfloat16, seed=7)
    mask = torch.rand(300, generator=torch.Generator().manual_seed(8)) > 0.5
    start = torch.randn(30, 30)
    cov = start.clone()
    ck.covariance_update(cov, x, mask)
    assert_close_to_oracle(cov, start, x, mask)


def test_finalize_and_accumulator():
    acc = ck.CovarianceAccumulator(12)
    x1, x2 = _inputs((2, 7), 12, torch.float16, 1), _inputs((9,), 12, torch.float32, 2)
    m1 = torch.rand(2, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    assert acc.update(x1, m1) == int(m1.sum())
    acc.update(x2)
    assert acc.count == int(m1.sum()) + 9
    rows = torch.cat([x1.reshape(-1, 12)[m1.reshape(-1)].double(), x2.double()])
    expected = rows.T @ rows / rows.shape[0]
    C = acc.finalize()
    torch.testing.assert_close(C.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(C, C.T)
    # State round trip and merging shards.
    other = ck.CovarianceAccumulator(12)
    other.load_state_dict(acc.state_dict())
    assert other.count == acc.count and torch.equal(other.cov, acc.cov)
    other.merge_(acc)
    torch.testing.assert_close(other.finalize(), C)


def test_symmetrize_blocked():
    a = torch.randn(23, 23)
    out = ck.symmetrize_(a.clone(), block=5)
    torch.testing.assert_close(out, a.triu() + a.triu(1).T)


def test_finalize_without_tokens_is_an_error():
    with pytest.raises(ValueError, match="no tokens"):
        ck.finalize_covariance(torch.zeros(3, 3), 0)


@pytest.mark.parametrize(
    "cov,x,mask,exc,match",
    [
        (torch.zeros(4, 4, dtype=torch.float16), torch.randn(3, 4), None, TypeError, "float32"),
        (torch.zeros(4, 5), torch.randn(3, 4), None, ValueError, "square"),
        (torch.zeros(5, 5), torch.randn(3, 4), None, ValueError, "d=4"),
        (torch.zeros(4, 4), torch.ones(3, 4, dtype=torch.int64), None, TypeError, "bf16, fp16 or fp32"),
        (torch.zeros(4, 4), torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), ValueError, "token_mask shape"),
        (torch.zeros(4, 4), torch.randn(3, 4), torch.ones(3, dtype=torch.int64), TypeError, "bool"),
        (torch.zeros(4, 4, device="meta"), torch.randn(3, 4), None, ValueError, "meta"),
    ],
    ids=["cov-fp16", "cov-not-square", "d-mismatch", "int-x", "mask-shape", "mask-dtype", "device"],
)
def test_bad_input(cov, x, mask, exc, match):
    with pytest.raises(exc, match=match):
        ck.covariance_update(cov, x, mask)


def test_non_finite_input_is_reported_and_cov_kept():
    x = torch.randn(2, 6, 5)
    x[1, 3, 2] = float("nan")
    cov = torch.randn(5, 5)
    before = cov.clone()
    with pytest.raises(FloatingPointError, match=r"layers.0.mlp holds NaN or Inf"):
        ck.covariance_update(cov, x, name="layers.0.mlp")
    assert torch.equal(cov, before)
    x[0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="2 token row"):
        ck.covariance_update(cov, x)
    # NaN only in padding rows is fine: they are excluded.
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3] = mask[0, 0] = False
    ck.covariance_update(cov, x, mask)
    assert torch.isfinite(cov).all()


def test_forced_backend_that_cannot_run(force_backend):
    force_backend("cuda")
    with pytest.raises(RuntimeError, match="CORDA_KERNELS_BACKEND=cuda"):
        ck.covariance_update(torch.zeros(3, 3), torch.randn(4, 3))


def test_opcheck():
    x = torch.randn(2, 5, 8)
    mask = torch.rand(2, 5) > 0.5
    for args in [(torch.zeros(8, 8), x, mask, True), (torch.zeros(8, 8), x.half(), None, False)]:
        torch.library.opcheck(cov_ops._covariance_update_op, args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d", [(2048, 4096), (1000, 1537), (64, 300)])
def test_gpu_matches_fp64(backend, dtype, n, d, force_backend, cuda_device):
    from corda_kernels import _backend

    if backend == "cuda" and not _backend.extension_has_cuda():
        pytest.skip("corda_kernels._C was built without CUDA")
    force_backend(backend)
    x = torch.randn(n, d, device=cuda_device).to(dtype)
    start = torch.randn(d, d, device=cuda_device)
    cov = start.clone()
    ck.covariance_update(cov, x)
    gram, bound = oracle(x)
    err = (cov.double() - start.double() - gram).abs()
    assert bool((err <= RTOL * (bound + start.double().abs())).all())
    assert torch.equal(cov.tril(-1), start.tril(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "auto"])
def test_gpu_masked_bf16_3d(backend, force_backend, cuda_device):
    """Padding excluded on every GPU backend (cuBLAS compacts the kept rows first)."""
    from corda_kernels import _backend

    if backend == "cuda" and not _backend.extension_has_cuda():
        pytest.skip("corda_kernels._C was built without CUDA")
    force_backend(backend)
    x = torch.randn(4, 1000, 576, device=cuda_device, dtype=torch.bfloat16)[:, ::2]
    mask = torch.rand(4, 500, device=cuda_device) > 0.3
    cov = torch.zeros(576, 576, device=cuda_device)
    ck.covariance_update(cov, x, mask)
    gram, bound = oracle(x, mask)
    assert bool(((cov.double() - gram).abs() <= RTOL * bound).all())


@pytest.mark.gpu
def test_gpu_cuda_backend_layouts(force_backend, cuda_device, monkeypatch):
    """cuBLAS path beyond test_gpu_matches_fp64: full square, rows whose stride exceeds d (the GEMMs
    read x in place with ld = row stride), fp32 with TF32 switched on globally (must stay fp32), and an
    empty input."""
    from corda_kernels import _backend

    if not _backend.extension_has_cuda():
        pytest.skip("corda_kernels._C was built without CUDA")
    force_backend("cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    wide = torch.randn(700, 1300, device=cuda_device)
    for dtype, upper_only in [(torch.bfloat16, False), (torch.float16, True), (torch.float32, True)]:
        x = wide.to(dtype)[:, 5:1205]  # (700, 1200), row stride 1300; crosses the 1024-column block
        assert x.stride() == (1300, 1)
        start = torch.randn(1200, 1200, device=cuda_device)
        cov = start.clone()
        ck.covariance_update(cov, x, upper_only=upper_only)
        assert_close_to_oracle(cov, start, x, upper_only=upper_only)
    cov = torch.randn(64, 64, device=cuda_device)
    before = cov.clone()
    ck.covariance_update(cov, torch.empty(0, 64, device=cuda_device, dtype=torch.bfloat16))
    assert torch.equal(cov, before)
