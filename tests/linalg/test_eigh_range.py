"""eigh_range: a range of eigenpairs equals the same range of a full fp64 eigh, on both paths."""

import pytest
import torch

from corda_kernels.linalg import _eigh
from corda_kernels.linalg._eigh import eigh_range


def _sym(batch, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n, 2 * n, generator=g, dtype=torch.float64)
    return (X @ X.mT / n).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("n,first,count", [(200, 0, 20), (200, 180, 20), (200, 37, 11), (40, 30, 10), (200, 0, 120)])
@pytest.mark.parametrize("batch", [(), (3,), (2, 2)])
def test_matches_full_eigh(batch, n, first, count, dtype, tol):
    G = _sym(batch, n, dtype)
    values, vectors = eigh_range(G, first, count)
    assert values.shape == (*batch, count) and vectors.shape == (*batch, n, count)
    assert values.dtype == vectors.dtype == dtype
    ref_values, ref_vectors = torch.linalg.eigh(G.double())
    ref_values, ref_vectors = ref_values[..., first : first + count], ref_vectors[..., first : first + count]
    scale = ref_values.abs().amax()
    assert (values.double() - ref_values).abs().max() <= tol * scale
    assert torch.all(values[..., 1:] >= values[..., :-1])  # ascending
    # Vectors up to sign (the spectrum of a Wishart matrix has no ties): |cos| = 1.
    cos = (vectors.double() * ref_vectors).sum(-2).abs()
    assert (cos - 1).abs().max() <= 100 * tol
    # Residuals ||G v - θ v|| and orthonormality, in fp64.
    Gd, V = G.double(), vectors.double()
    assert (Gd @ V - V * values.double()[..., None, :]).norm(dim=-2).max() <= 10 * tol * scale
    eye = torch.eye(count, dtype=torch.float64)
    assert (V.mT @ V - eye).abs().max() <= 10 * tol


def test_small_range_of_a_large_matrix_skips_the_full_decomposition(monkeypatch):
    G = _sym((2,), 256, torch.float64)
    expected = torch.linalg.eigh(G).eigenvalues[..., -16:]

    def refuse(*args, **kwargs):
        raise AssertionError("full eigh called")

    monkeypatch.setattr(torch.linalg, "eigh", refuse)
    values, _ = eigh_range(G, 240, 16)
    assert torch.allclose(values, expected, rtol=0, atol=1e-12 * expected.abs().max())
    with pytest.raises(AssertionError, match="full eigh"):
        eigh_range(G, 0, int(_eigh.SUBSET_MAX_FRACTION * 256) + 1)  # a large share: the full one


@pytest.mark.parametrize("first,count", [(-1, 2), (0, 0), (5, 4), (8, 1)])
def test_bad_range_names_itself(first, count):
    with pytest.raises(ValueError, match=r"eigh_range: eigenpairs .* of a 8 x 8 matrix"):
        eigh_range(_sym((), 8, torch.float64), first, count)


@pytest.mark.parametrize("dtype,out", [(torch.float64, None), (torch.float32, None), (torch.float32, torch.float64)])
@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("shape", [(150, 90), (90, 150), (3, 150, 90), (2, 2, 70, 80), (20, 30)])
@pytest.mark.parametrize("view", ["contiguous", "transposed"])
def test_gram_lower_is_the_gram_lower_triangle(shape, rows, dtype, out, view, monkeypatch):
    """gram_lower (?syrk on a CPU above SYRK_MIN_SIDE, torch below; fp32 data with an fp64 result
    converted by panels, here of 16 rows or columns: full ones and a partial last one): the lower
    triangle of Aᵀ A or A Aᵀ to the product's rounding, any batch and stride; eigh_range of it is
    the Gram's."""
    from corda_kernels.linalg import _products

    monkeypatch.setattr(_products, "FP64_PANEL", 16)
    g = torch.Generator().manual_seed(3)
    A = torch.randn(*shape, generator=g, dtype=dtype)
    if view == "transposed":
        A = A.mT.contiguous().mT  # the same values, Fortran-ordered matrices
    G = _products.gram_lower(A, rows=rows, dtype=out)
    ref = A.double() @ A.double().mT if rows else A.double().mT @ A.double()
    assert G.shape == ref.shape and G.dtype == (out or dtype)
    eps = torch.finfo(out or dtype).eps
    tol = 4 * eps * shape[-1 if rows else -2] * float(ref.diagonal(dim1=-2, dim2=-1).abs().amax())
    assert float((G.double().tril() - ref.tril()).abs().max()) <= tol
    side = G.shape[-1]
    values = eigh_range(G, side - 5, 5)[0]
    torch.testing.assert_close(values.double(), torch.linalg.eigvalsh(ref)[..., -5:], rtol=0, atol=tol * side)


def test_gram_lower_keeps_autograd():
    from corda_kernels.linalg._products import gram_lower

    A = torch.randn(80, 70, dtype=torch.float64, requires_grad=True)
    gram_lower(A).sum().backward()
    torch.testing.assert_close(A.grad, 2 * A.detach() @ torch.ones(70, 70, dtype=torch.float64))
