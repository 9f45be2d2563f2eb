"""top_eigenpairs: full eigh without a start; warm-started subspace iteration agrees with eigh."""

from __future__ import annotations

import torch

from corda_kernels.linalg.eigen import basis_width, top_eigenpairs


def _psd(batch, d, decay, seed):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(batch, d, d, generator=g)).Q
    values = torch.arange(1, d + 1, dtype=torch.float32) ** -decay
    return (Q * values) @ Q.mT


def test_cold_start_is_eigh():
    C = _psd(3, 40, 1.0, 0)
    values, vectors, basis = top_eigenpairs(C, 5)
    ref = torch.linalg.eigh(C)
    assert torch.allclose(values, ref.eigenvalues.flip(-1)[..., :5], rtol=1e-5)
    assert basis.shape == (3, 40, basis_width(5, 40))
    assert torch.allclose(
        (vectors.mT @ ref.eigenvectors.flip(-1)[..., :5]).abs(), torch.eye(5).expand(3, 5, 5), atol=1e-4
    )


def test_warm_start_agrees_with_eigh():
    C = _psd(4, 200, 1.0, 1)
    rank = 8
    _, _, basis = top_eigenpairs(C, rank)
    C2 = C + 1e-3 * _psd(4, 200, 0.5, 2)  # the next batch moves the matrix a little
    values, vectors, next_basis = top_eigenpairs(C2, rank, basis)
    ref = torch.linalg.eigh(C2.double())
    assert torch.allclose(values.double(), ref.eigenvalues.flip(-1)[..., :rank], rtol=1e-4)
    overlap = (vectors.double().mT @ ref.eigenvectors.flip(-1)[..., :rank]).abs().diagonal(dim1=-2, dim2=-1)
    assert overlap.min() > 1 - 1e-4
    assert next_basis.shape == basis.shape
    residual = C2 @ vectors - vectors * values[..., None, :]
    assert residual.norm(dim=-2).max() <= 1e-5 * values[..., :1].max() * 2


def test_max_iter_falls_back_to_eigh():
    C = _psd(2, 120, 0.01, 3)  # flat spectrum: subspace iteration cannot converge in one step
    rank = 4
    start = torch.linalg.qr(torch.randn(2, 120, basis_width(rank, 120))).Q
    values, vectors, _ = top_eigenpairs(C, rank, start, max_iter=1)
    ref = torch.linalg.eigh(C)
    assert torch.allclose(values, ref.eigenvalues.flip(-1)[..., :rank], rtol=1e-5)
