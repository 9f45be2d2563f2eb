"""smallest_singular_triplets against the tail of fp64 torch.linalg.svd, including ill-conditioned cases.

Tolerances: the method's singular values carry an absolute error of O(eps_fp64 · σ_max), so at
condition κ their relative error is ~κ · 1e-16 (plus the fp32 rounding of fp32 outputs, 6e-8).
The fp32 Gram matrix, and the fp64 Gram matrix with only a Rayleigh–Ritz step, are shown to miss
the same tolerances on the same matrices.
"""

import pytest
import torch
from svd_helpers import align_signs, with_spectrum

from corda_kernels.linalg.exact_svd import smallest_singular_triplets


def log_spaced(k, kappa):
    """``k`` singular values from 1 down to ``1 / kappa``, geometrically spaced (distinct)."""
    return torch.logspace(0, -torch.log10(torch.tensor(kappa)).item(), k, dtype=torch.float64)


def reference_tail(A, rank):
    U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    return U[..., -rank:], S[..., -rank:], Vh[..., -rank:, :]


def assert_tail_matches(A, rank, s_rtol, vec_atol):
    U, S, Vh = smallest_singular_triplets(A, rank)
    U0, S0, Vh0 = reference_tail(A, rank)
    assert U.shape == (*A.shape[:-1], rank) and S.shape == (*A.shape[:-2], rank)
    assert Vh.shape == (*A.shape[:-2], rank, A.shape[-1])
    assert bool((S[..., :-1] >= S[..., 1:]).all()), "S must be descending"
    rel = ((S.double() - S0).abs() / S0).max().item()
    assert rel <= s_rtol, f"singular values off by {rel:.2e} (relative)"
    sign = align_signs(U.double(), U0)
    torch.testing.assert_close(U.double() * sign, U0, atol=vec_atol, rtol=0)
    torch.testing.assert_close(Vh.double() * sign.mT, Vh0, atol=vec_atol, rtol=0)
    return U, S, Vh


@pytest.mark.parametrize(
    "m,n,rank",
    [(40, 30, 4), (30, 40, 4), (25, 25, 1), (36, 20, 20), (20, 36, 20), (70, 60, 5), (9, 70, 3)],
    ids=["tall", "wide", "rank1", "rank=n", "rank=m", "guard<k", "very-wide"],
)
def test_matches_fp64_svd_tail(m, n, rank):
    A = with_spectrum(m, n, log_spaced(min(m, n), 1e3), seed=1, dtype=torch.float32)
    U, S, Vh = assert_tail_matches(A, rank, s_rtol=2e-7, vec_atol=1e-5)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32


@pytest.mark.parametrize("kappa", [1e6, 1e8])
@pytest.mark.parametrize("m,n", [(120, 80), (80, 120)], ids=["tall", "wide"])
def test_ill_conditioned_fp64(kappa, m, n):
    """Geometric spectra down to 1/κ: the bottom cluster is tightly packed and tiny."""
    A = with_spectrum(m, n, log_spaced(80, kappa), seed=2)
    _, S, _ = assert_tail_matches(A, 12, s_rtol=kappa * 1e-15, vec_atol=kappa * 1e-14)
    assert S.dtype == torch.float64


@pytest.mark.parametrize("m,n", [(120, 80), (80, 120)], ids=["tall", "wide"])
def test_ill_conditioned_fp32_input(m, n):
    """fp32 in, fp32 out: the values are right to fp32 rounding even at κ = 1e8."""
    A = with_spectrum(m, n, log_spaced(80, 1e8), seed=3, dtype=torch.float32)
    U, S, Vh = smallest_singular_triplets(A, 12)
    _, S0, _ = reference_tail(A, 12)
    assert ((S.double() - S0).abs() / S0).max() <= 2e-7


def test_gram_shortcuts_fail_where_we_pass():
    """Why the method: fp32 Gram fails already at κ = 1e6, fp64 Gram + Rayleigh–Ritz at κ = 1e8."""
    rank = 12
    A6 = with_spectrum(120, 80, log_spaced(80, 1e6), seed=2, dtype=torch.float32)
    S0 = reference_tail(A6, rank)[1]
    gram32 = torch.linalg.eigvalsh(A6.mT @ A6)[:rank].flip(-1).clamp_min(0).sqrt().double()
    assert ((gram32 - S0).abs() / S0).max() > 0.5  # noise, or negative eigenvalues clamped to 0
    ours = smallest_singular_triplets(A6, rank)[1].double()
    assert ((ours - S0).abs() / S0).max() <= 2e-7

    A8 = with_spectrum(120, 80, log_spaced(80, 1e8), seed=2)
    S0 = reference_tail(A8, rank)[1]
    Z = torch.linalg.eigh(A8.mT @ A8).eigenvectors[:, :rank]
    gram64_rr = torch.linalg.svdvals(A8 @ Z)
    assert ((gram64_rr - S0).abs() / S0).max() > 1e-3
    ours = smallest_singular_triplets(A8, rank)[1]
    assert ((ours - S0).abs() / S0).max() <= 1e-7


def test_rank_deficient_and_repeated_values():
    """Exact zeros (singular R) and a repeated value: compare values and spanned subspaces."""
    s = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 0.5] + [0.0] * 14, dtype=torch.float64)
    A = with_spectrum(30, 20, s, seed=4)
    U, S, Vh = smallest_singular_triplets(A, 17)
    expected = s[-17:]
    torch.testing.assert_close(S, expected, atol=1e-13, rtol=0)
    # Null space: A Vh^T ~ 0 for the zero values; the r triplets are orthonormal and consistent.
    torch.testing.assert_close(A @ Vh.mT, U * S, atol=1e-13, rtol=0)
    torch.testing.assert_close(U.mT @ U, torch.eye(17, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(Vh @ Vh.mT, torch.eye(17, dtype=torch.float64), atol=1e-12, rtol=0)
    # The triplets for σ = 1 (indices 0..1 of the 17: two of the three repeated ones) lie in that space.
    _, _, Vh0 = torch.linalg.svd(A)
    ones_space = Vh0[2:5]
    assert (Vh[:2] @ ones_space.mT).norm(dim=-1).min() > 1 - 1e-10


def test_batched_equals_per_matrix():
    A = with_spectrum(18, 26, log_spaced(18, 1e4), batch=(2, 3), seed=5, dtype=torch.float32)
    U, S, Vh = smallest_singular_triplets(A, 5)
    assert U.shape == (2, 3, 18, 5) and Vh.shape == (2, 3, 5, 26)
    for i in range(2):
        for j in range(3):
            u, s, vh = smallest_singular_triplets(A[i, j], 5)
            torch.testing.assert_close(S[i, j], s, rtol=1e-6, atol=0)
            sign = align_signs(U[i, j], u)
            torch.testing.assert_close(U[i, j] * sign, u, atol=1e-5, rtol=0)
            torch.testing.assert_close(Vh[i, j] * sign.mT, vh, atol=1e-5, rtol=0)
    assert_tail_matches(A, 5, s_rtol=2e-7, vec_atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    A = with_spectrum(24, 16, log_spaced(16, 1e2), seed=6).to(dtype)
    U, S, Vh = smallest_singular_triplets(A, 3)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    _, S0, _ = reference_tail(A, 3)
    assert ((S.double() - S0).abs() / S0).max() <= 2e-7


@pytest.mark.parametrize(
    "A,rank,exc,match",
    [
        (torch.randn(6, 4), 0, ValueError, r"rank must be an int in 1\.\.min\(m, n\) = 1\.\.4 .*\(6, 4\)"),
        (torch.randn(6, 4), 5, ValueError, r"1\.\.4"),
        (torch.ones(6, 4, dtype=torch.int32), 1, TypeError, "fp64"),
        (torch.ones(4), 1, ValueError, r"\(\.\.\., m, n\)"),
        (torch.full((2, 3, 3), float("inf")), 1, FloatingPointError, r"NaN or Inf in 2 of 2 matrices"),
    ],
    ids=["rank0", "rank>k", "int", "1d", "inf"],
)
def test_bad_input(A, rank, exc, match):
    with pytest.raises(exc, match=match):
        smallest_singular_triplets(A, rank)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n", [(4096, 4096), (11008, 4096)])
def test_gpu_llama_shapes(m, n, cuda_device):
    A = with_spectrum(m, n, log_spaced(4096, 1e7), dtype=torch.float32, device=cuda_device)
    U, S, Vh = smallest_singular_triplets(A, 128)
    S0 = torch.linalg.svdvals(A.double())[-128:]
    assert ((S.double() - S0).abs() / S0).max() <= 1e-6
    torch.testing.assert_close(A.double() @ Vh.double().mT, U.double() * S.double(), atol=1e-6, rtol=0)
