"""top_singular_triplets against fp64 torch.linalg.svd: at least as accurate as fp32 torch.linalg.svd
(PEFT's "pissa"), through both paths (block Krylov accepted; Krylov given up -> fp64 Gram).

Tolerances: the contract is an fp32 SVD's backward error (``tol = 5e-7 σ_1`` per triplet), so the
singular values must match fp64 to ~1e-6 relative, and the top-r product ``U S Vh`` must be at
least as close to the exact one as fp32 ``torch.linalg.svd``'s (with a 1.5x margin for rounding).
The Krylov path is exercised at small sizes by lowering its size threshold.
"""

import pytest
import torch
from svd_helpers import with_spectrum

import corda_kernels.linalg.top_svd as top_svd
from corda_kernels.linalg import top_singular_triplets


def product(U, S, Vh):
    return (U.double() * S.double()[..., None, :]) @ Vh.double()


def exact_product(A, rank):
    U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    return product(U[..., :rank], S[..., :rank], Vh[..., :rank, :]), S[..., :rank]


def rel(P, P0):
    return ((P - P0).norm(dim=(-2, -1)) / P0.norm(dim=(-2, -1))).max().item()


def decaying(m, n, batch=(), seed=0):
    """A spectrum decaying like ``1/i`` over a flat floor (Krylov converges in a basis of about k/5)."""
    k = min(m, n)
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) + 0.02
    return with_spectrum(m, n, s, batch=batch, seed=seed, dtype=torch.float32)


class Spy:
    def __init__(self, monkeypatch):
        self.krylov, self.gram = [], []
        krylov, gram = top_svd._krylov_basis, top_svd.gram_top_triplets

        def k(*args, **kwargs):
            out = krylov(*args, **kwargs)
            self.krylov.append(out is not None)
            return out

        def g(*args, **kwargs):
            self.gram.append(True)
            return gram(*args, **kwargs)

        monkeypatch.setattr(top_svd, "_krylov_basis", k)
        monkeypatch.setattr(top_svd, "gram_top_triplets", g)


@pytest.fixture
def small_krylov(monkeypatch):
    monkeypatch.setattr(top_svd, "KRYLOV_MIN_SIDE", 64)
    return Spy(monkeypatch)


@pytest.mark.parametrize("shape", [(1024, 768), (768, 1024), (2, 800, 800)])
@pytest.mark.parametrize("rank", [4, 16])
def test_krylov_path_matches_fp64_at_least_like_fp32_svd(small_krylov, shape, rank):
    *batch, m, n = shape
    A = decaying(m, n, batch=tuple(batch), seed=rank)
    U, S, Vh = top_singular_triplets(A, rank)
    assert small_krylov.krylov == [True] and not small_krylov.gram
    assert U.shape == (*A.shape[:-1], rank) and S.shape == (*A.shape[:-2], rank) and Vh.shape[-2:] == (rank, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    P0, S0 = exact_product(A, rank)
    assert ((S.double() - S0).abs() / S0).max().item() <= 2e-6
    U32, S32, Vh32 = torch.linalg.svd(A, full_matrices=False)
    peft_error = rel(product(U32[..., :rank], S32[..., :rank], Vh32[..., :rank, :]), P0)
    assert rel(product(U, S, Vh), P0) <= max(1.5 * peft_error, 1e-6)
    eye = torch.eye(rank, dtype=torch.float64)
    torch.testing.assert_close(U.double().mT @ U.double(), eye.expand(*batch, rank, rank), atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh.double() @ Vh.double().mT, eye.expand(*batch, rank, rank), atol=1e-5, rtol=0)


def test_flat_spectrum_gives_up_on_krylov_and_goes_exact(small_krylov):
    A = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))  # Marchenko-Pastur: flat top
    U, S, Vh = top_singular_triplets(A, 16)
    assert small_krylov.krylov == [False] and small_krylov.gram == [True]
    P0, S0 = exact_product(A, 16)
    assert rel(product(U, S, Vh), P0) <= 1e-6  # the fp64 Gram path: far better than fp32's
    assert ((S.double() - S0).abs() / S0).max().item() <= 1e-6


def test_small_matrices_take_the_gram_path(monkeypatch):
    spy = Spy(monkeypatch)
    A = decaying(96, 64)
    U, S, Vh = top_singular_triplets(A, 8)
    assert not spy.krylov and spy.gram == [True]
    P0, _ = exact_product(A, 8)
    assert rel(product(U, S, Vh), P0) <= 1e-6


def test_low_rank_matrix_is_exact(small_krylov):
    # Rank 5 < r: the Krylov space is exhausted; the result must still be the exact top-r.
    spectrum = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    A = with_spectrum(300, 260, spectrum, dtype=torch.float32)
    U, S, Vh = top_singular_triplets(A, 8)
    torch.testing.assert_close(S[:5].double(), spectrum, atol=1e-5, rtol=0)
    assert S[5:].abs().max().item() <= 1e-5
    torch.testing.assert_close(product(U, S, Vh), A.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(small_krylov, dtype):
    A = decaying(300, 260).to(dtype)
    U, S, Vh = top_singular_triplets(A, 8)
    assert S.dtype == torch.float32
    P0, _ = exact_product(A, 8)
    assert rel(product(U, S, Vh), P0) <= 2e-6


def test_seeded_and_deterministic(small_krylov):
    A = decaying(300, 260)
    first = top_singular_triplets(A, 8, seed=3)
    again = top_singular_triplets(A, 8, seed=3)
    for x, y in zip(first, again):
        assert torch.equal(x, y)


def test_rank_equal_to_the_smaller_side():
    A = decaying(40, 24)
    U, S, Vh = top_singular_triplets(A, 24)
    torch.testing.assert_close(product(U, S, Vh), A.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rank=0), ValueError, "rank"),
        (dict(rank=65), ValueError, "rank"),
        (dict(rank=4, tol=0.0), ValueError, "tol"),
        (dict(rank=4, tol=1.5), ValueError, "tol"),
        (dict(rank=4, tol="x"), ValueError, "tol"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        top_singular_triplets(torch.randn(80, 64), **kwargs)


def test_bad_matrices():
    with pytest.raises(FloatingPointError, match="top_singular_triplets"):
        top_singular_triplets(torch.full((8, 8), float("nan")), 2)
    with pytest.raises(TypeError, match="top_singular_triplets"):
        top_singular_triplets(torch.ones(8, 8, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="top_singular_triplets"):
        top_singular_triplets(torch.ones(8), 2)
