"""randomized_svd against fp64 torch.linalg.svd.

Test matrices have a known, well-separated spectrum (random singular vectors), so the top
singular vectors are determined up to sign and the defaults recover them to fp32 accuracy; a wrong
index, a lost transpose or a swapped U/V shows up as an O(1) error.
"""

import pytest
import torch
from svd_helpers import align_signs, with_spectrum

from corda_kernels.linalg.exact_svd import crop_svd
from corda_kernels.linalg.randomized_svd import default_oversample, randomized_svd


def geometric(m, n, batch=(), seed=0, ratio=0.6, dtype=torch.float64):
    k = min(m, n)
    return with_spectrum(m, n, ratio ** torch.arange(k, dtype=torch.float64), batch, seed, dtype)


def assert_matches_svd(A, U, S, Vh, rank, rtol):
    U0, S0, Vh0 = torch.linalg.svd(A.double(), full_matrices=False)
    U0, S0, Vh0 = U0[..., :rank], S0[..., :rank], Vh0[..., :rank, :]
    scale = S0[..., :1]
    assert bool(((S.double() - S0).abs() <= rtol * scale).all())
    sign = align_signs(U.double(), U0)
    torch.testing.assert_close(U.double() * sign, U0, atol=rtol * 10, rtol=0)
    torch.testing.assert_close(Vh.double() * sign.mT, Vh0, atol=rtol * 10, rtol=0)
    # The product is sign-free.
    torch.testing.assert_close(
        (U.double() * S.double()[..., None, :]) @ Vh.double(),
        (U0 * S0[..., None, :]) @ Vh0,
        atol=rtol * 10 * float(scale.max()),
        rtol=0,
    )


@pytest.mark.parametrize(
    "m,n,rank",
    [(200, 150, 5), (150, 200, 5), (130, 130, 1), (211, 113, 3), (113, 211, 16)],
    ids=["tall", "wide", "rank1", "odd-tall", "odd-wide"],
)
def test_matches_fp64_svd(m, n, rank):
    """Defaults, sketch narrower than min(m, n): the randomized path."""
    A = geometric(m, n, dtype=torch.float64)
    assert rank + default_oversample(rank) < min(m, n)
    U, S, Vh = randomized_svd(A, rank)
    assert U.shape == (m, rank) and S.shape == (rank,) and Vh.shape == (rank, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float64
    assert bool((S[:-1] >= S[1:]).all()), "S must be descending"
    assert_matches_svd(A, U, S, Vh, rank, rtol=1e-9)


@pytest.mark.parametrize(
    "m,n,rank,oversample",
    [(40, 30, 5, 4), (30, 40, 5, 4), (33, 17, 1, 0), (17, 33, 3, 2)],
    ids=["tall", "wide", "rank1-no-oversampling", "odd-wide"],
)
def test_small_sketch(m, n, rank, oversample):
    A = geometric(m, n, seed=1, dtype=torch.float64)
    U, S, Vh = randomized_svd(A, rank, oversample=oversample, n_iter=12)
    assert U.shape == (m, rank) and Vh.shape == (rank, n)
    assert_matches_svd(A, U, S, Vh, rank, rtol=1e-6)


@pytest.mark.parametrize("m,n,rank", [(40, 30, 5), (50, 20, 20), (20, 50, 20)], ids=["l>k", "rank=n", "rank=m"])
def test_sketch_spanning_everything_is_the_exact_svd(m, n, rank):
    A = geometric(m, n, seed=2, dtype=torch.float32)
    U, S, Vh = randomized_svd(A, rank)
    U0, S0, Vh0 = torch.linalg.svd(A, full_matrices=False)
    assert torch.equal(U, U0[:, :rank]) and torch.equal(S, S0[:rank]) and torch.equal(Vh, Vh0[:rank])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    A = geometric(48, 36).to(dtype)
    U, S, Vh = randomized_svd(A, 6)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    # Against the SVD of the very matrix given (its rounding to bf16/fp16 is part of the input).
    assert_matches_svd(A.float(), U, S, Vh, 6, rtol=2e-5)
    torch.testing.assert_close(U.mT @ U, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.mT, torch.eye(6), atol=1e-5, rtol=0)


def test_batched_equals_per_matrix():
    A = geometric(24, 36, batch=(2, 3), seed=1, dtype=torch.float32)
    U, S, Vh = randomized_svd(A, 4, oversample=4, n_iter=8)
    assert U.shape == (2, 3, 24, 4) and S.shape == (2, 3, 4) and Vh.shape == (2, 3, 4, 36)
    for i in range(2):
        for j in range(3):
            u, s, vh = randomized_svd(A[i, j], 4, oversample=4, n_iter=8)
            torch.testing.assert_close(S[i, j], s, atol=1e-5, rtol=1e-5)
            sign = align_signs(U[i, j], u)
            torch.testing.assert_close(U[i, j] * sign, u, atol=1e-4, rtol=0)
            torch.testing.assert_close(Vh[i, j] * sign.mT, vh, atol=1e-4, rtol=0)
    assert_matches_svd(A, U, S, Vh, 4, rtol=2e-5)


def flat(m=60, n=80, seed=3):
    """A flat spectrum: one sketch without power iterations leaves a visibly seed-dependent result."""
    return with_spectrum(m, n, torch.linspace(1.0, 0.5, min(m, n)), seed=seed, dtype=torch.float32)


def test_deterministic_under_seed_and_generator():
    A = flat()
    kw = dict(oversample=3, n_iter=1)
    first = randomized_svd(A, 5, seed=7, **kw)
    again = randomized_svd(A, 5, seed=7, **kw)
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    via_generator = randomized_svd(A, 5, generator=torch.Generator().manual_seed(7), **kw)
    for x, y in zip(first, via_generator):
        assert torch.equal(x, y)
    other = randomized_svd(A, 5, seed=8, **kw)
    assert not torch.equal(first[1], other[1])


def test_independent_sketch_per_batch_element():
    A = flat()
    twins = torch.stack([A, A])
    _, S, _ = randomized_svd(twins, 5, oversample=0, n_iter=0)
    # Same matrix, different sketches: a one-shot sketch of a flat spectrum differs visibly.
    assert (S[0] - S[1]).abs().max() > 1e-3
    # With enough iterations both converge to the same (exact) values.
    _, S, _ = randomized_svd(twins, 5, oversample=20, n_iter=30)
    S0 = torch.linalg.svdvals(A.double())[:5]
    torch.testing.assert_close(S.double(), S0.expand(2, 5), atol=1e-4, rtol=0)


def test_non_contiguous_input():
    base = geometric(36, 28, seed=4, dtype=torch.float32)
    A = base.T  # a transposed view: (28, 36)
    assert not A.is_contiguous()
    U, S, Vh = randomized_svd(A, 5, oversample=5, n_iter=8)
    assert_matches_svd(A, U, S, Vh, 5, rtol=2e-5)
    assert U.is_contiguous() and Vh.is_contiguous()


def test_default_accuracy_on_a_flat_power_law():
    """The documented target: relative excess Frobenius error <= 1e-4 vs the exact truncated SVD."""
    m, n, r = 300, 200, 16
    s = torch.arange(1, 201, dtype=torch.float64) ** -0.5
    A = with_spectrum(m, n, s, seed=5, dtype=torch.float32)
    U, S, Vh = randomized_svd(A, r)
    err = (A.double() - (U.double() * S.double()) @ Vh.double()).norm()
    opt = s[r:].square().sum().sqrt()
    assert (err - opt) / opt <= 1e-4


@pytest.mark.parametrize("rank", [0, 31, -1, 2.0, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match=r"rank must be an int in 1\.\.min\(m, n\) = 1\.\.30 .*\(40, 30\)"):
        randomized_svd(torch.randn(40, 30), rank)


@pytest.mark.parametrize(
    "A,kwargs,exc,match",
    [
        (torch.ones(5, 4, dtype=torch.int64), {}, TypeError, "bf16, fp16, fp32 or fp64"),
        (torch.ones(5, 4, dtype=torch.complex64), {}, TypeError, "complex64"),
        (torch.ones(5), {}, ValueError, r"shape \(\.\.\., m, n\)"),
        (torch.ones(2, 0, 4), {}, ValueError, "empty"),
        (torch.ones(5, 4), {"oversample": -1}, ValueError, "oversample"),
        (torch.ones(5, 4), {"n_iter": 1.5}, ValueError, "n_iter"),
        ([[1.0, 2.0]], {}, TypeError, "tensor"),
    ],
    ids=["int", "complex", "1d", "empty", "oversample", "n_iter", "list"],
)
def test_bad_input(A, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        randomized_svd(A, 1, **kwargs)


def test_non_finite_input_names_the_matrix():
    A = torch.randn(3, 4, 6, 5)
    A[2, 1, 0, 3] = float("nan")
    A[0, 3, 1, 1] = float("inf")
    with pytest.raises(
        FloatingPointError,
        match=r"A of shape \(3, 4, 6, 5\) holds NaN or Inf in 2 of 12 matrices "
        r"\(first at batch index \(0, 3\)\)",
    ):
        randomized_svd(A, 2)
    with pytest.raises(FloatingPointError, match="holds NaN or Inf"):
        randomized_svd(A[2, 1], 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_check_finite_finds_every_kind(dtype, value):
    """check_finite reads amax / amin: NaN, +Inf and -Inf each caught, in any matrix of a batch,
    also through a transposed view; all-finite input passes."""
    from corda_kernels.linalg._checks import check_finite

    A = torch.randn(2, 3, 7, 5).to(dtype)
    check_finite(A, "op")
    check_finite(A[:, :, :0], "op")  # empty: nothing to check
    for index in [(0, 0, 0, 0), (1, 2, 6, 4), (1, 0, 3, 2)]:
        B = A.clone()
        B[index] = value
        with pytest.raises(FloatingPointError, match=rf"first at batch index \({index[0]}, {index[1]}\)"):
            check_finite(B, "op")
        with pytest.raises(FloatingPointError, match="holds NaN or Inf"):
            check_finite(B.mT, "op")
        with pytest.raises(FloatingPointError, match="holds NaN or Inf"):
            check_finite(B[index[0], index[1]], "op")


@pytest.mark.gpu
@pytest.mark.parametrize("m,n", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_gpu_llama_shapes(m, n, cuda_device):
    s = torch.arange(1, 4097, dtype=torch.float64) ** -0.5
    A = with_spectrum(m, n, s, batch=(2,), dtype=torch.float32, device=cuda_device)
    U, S, Vh = randomized_svd(A, 64, seed=1)
    again = randomized_svd(A, 64, seed=1)
    assert all(torch.equal(x, y) for x, y in zip((U, S, Vh), again))
    err = (A.double() - (U.double() * S.double()[..., None, :]) @ Vh.double()).flatten(-2).norm(dim=-1)
    opt = s[64:].square().sum().sqrt().to(cuda_device)
    assert bool((((err - opt) / opt) <= 1e-4).all())
    torch.testing.assert_close(S[0].double().cpu(), s[:64], rtol=2e-3, atol=0)


def test_per_matrix_seeds_make_results_batch_independent():
    g = torch.Generator().manual_seed(11)
    A = torch.randn(3, 40, 30, generator=g) @ torch.diag(torch.logspace(0, -3, 30))
    batched = randomized_svd(A, 5, oversample=2, n_iter=1, seed=[7, 8, 9])
    for i, s in enumerate([7, 8, 9]):
        alone = randomized_svd(A[i], 5, oversample=2, n_iter=1, seed=[s])
        for got, want in zip(batched, alone):
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="2 seeds for a batch of 3"):
        randomized_svd(A, 5, oversample=2, seed=[1, 2])


def dominant_then_clustered(m, n, batch=(), seed=0, tail_gap=0.005, dtype=torch.float32):
    """PEFT's CorDA test spectrum in miniature: one dominant value (600x the rest), then a tail
    that decays by ``tail_gap`` per value (σ_r and σ_{r+1} differ by ~0.5%)."""
    k = min(m, n)
    s = 1.5 * (1 - tail_gap) ** torch.arange(k, dtype=torch.float64)
    s[0] = 1000.0
    return with_spectrum(m, n, s, batch, seed, torch.float64).to(dtype)


def _product(U, S, Vh):
    return (U.double() * S.double()[..., None, :]) @ Vh.double()


def test_checked_result_is_the_exact_one_where_the_sketch_cannot_separate_the_tail(monkeypatch):
    """A narrow sketch with few iterations cannot resolve a clustered tail under a dominant value
    (the default CorDA-IPA setting on PEFT's test model): without the check the rank-r product is
    far off; with it, each matrix is refined or replaced by the exact SVD and agrees with it."""
    A = dominant_then_clustered(400, 300, batch=(2,))
    rank = 8
    U, S, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    exact = _product(U[..., :rank], S[..., :rank], Vh[..., :rank, :])

    def error(result):  # against σ_r, the scale of what the tail components carry
        return float((torch.linalg.matrix_norm(_product(*result) - exact) / S[..., rank - 1]).max())

    unchecked = error(randomized_svd(A, rank, oversample=40, n_iter=2, seed=[1, 2]))
    checked = error(randomized_svd(A, rank, oversample=40, n_iter=2, seed=[1, 2], tol=1e-3))
    floor = error(crop_svd(A, rank))  # the fp32 exact SVD's own error (σ_1 / σ_r = 670)
    assert unchecked > 50 * floor  # the failure the check exists for
    assert checked <= 2 * floor


def test_check_keeps_the_randomized_result_on_separated_spectra(monkeypatch):
    """On a steep, separated spectrum the first result passes: no exact SVD is taken."""
    import sys

    module = sys.modules["corda_kernels.linalg.randomized_svd"]  # the package exports a function of that name

    def no_exact(*args):
        raise AssertionError("fell back to the exact SVD on a separated spectrum")

    monkeypatch.setattr(module, "crop_svd", no_exact)
    A = geometric(400, 300, batch=(3,), ratio=0.8, dtype=torch.float32)
    U, S, Vh = randomized_svd(A, 8, oversample=40, n_iter=2, seed=[1, 2, 3], tol=1e-3)
    assert_matches_svd(A, U, S, Vh, 8, rtol=1e-5)


def test_ritz_residuals_and_gaps_judge_each_component():
    """ritz_check on an exact basis: residuals at rounding level, gaps the spectrum's differences;
    on a poor basis a component's residual exceeds tol times its gap."""
    from corda_kernels.linalg.randomized_svd import converged, ritz_check

    s = torch.tensor([10.0, 5.0, 4.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    A = with_spectrum(30, 20, torch.cat([s, torch.full((14,), 0.01, dtype=torch.float64)]))
    U = torch.linalg.svd(A, full_matrices=False)[0]
    residual, gaps, sigma1 = ritz_check(A, U[:, :6], 3)
    assert residual.max() < 1e-12
    torch.testing.assert_close(gaps, torch.tensor([5.0, 1.0, 3.0], dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(sigma1, torch.tensor(10.0, dtype=torch.float64))
    assert bool(converged(residual, gaps, 1e-3))
    poor = torch.linalg.qr(U[:, :6] + 0.05 * torch.randn(30, 6, generator=torch.Generator().manual_seed(0))).Q
    residual, gaps, _ = ritz_check(A, poor, 3)
    assert not bool(converged(residual, gaps, 1e-3))


def _spy_iterations(monkeypatch):
    """Records the iteration counts of every ``_iterate`` call and every exact SVD taken."""
    import sys

    module = sys.modules["corda_kernels.linalg.randomized_svd"]
    calls = {"iterate": [], "exact": 0}
    iterate, crop = module._iterate, module.crop_svd

    def spy_iterate(M, Q, n):
        calls["iterate"].append(n)
        return iterate(M, Q, n)

    def spy_crop(A, rank):
        calls["exact"] += 1
        return crop(A, rank)

    monkeypatch.setattr(module, "_iterate", spy_iterate)
    monkeypatch.setattr(module, "crop_svd", spy_crop)
    return calls


def test_refinement_iterates_as_predicted_where_the_spectrum_decays(monkeypatch):
    """One iteration is too few for a slowly decaying spectrum, but its Ritz values predict how
    many more pass: one refinement round (no doubling rounds), no exact SVD, an accurate result."""
    calls = _spy_iterations(monkeypatch)
    A = geometric(400, 300, batch=(2,), ratio=0.9, dtype=torch.float64)
    U, S, Vh = randomized_svd(A, 8, oversample=8, n_iter=1, seed=[1, 2], tol=1e-3)
    assert calls["exact"] == 0 and len(calls["iterate"]) == 2 and calls["iterate"][1] > 1, calls
    assert_matches_svd(A, U, S, Vh, 8, rtol=1e-4)  # vectors to sin θ <= tol: 10 x 1e-4


def test_flat_spectrum_goes_exact_after_one_check(monkeypatch):
    """A flat spectrum around σ_r (a Gaussian matrix) cannot pass within the cost of a full SVD:
    the first check sends it to the exact SVD, with no refinement iterations spent before."""
    calls = _spy_iterations(monkeypatch)
    A = torch.randn(2, 400, 300, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    U, S, Vh = randomized_svd(A, 16, oversample=40, n_iter=3, seed=[1, 2], tol=1e-3)
    assert calls == {"iterate": [3], "exact": 1}, calls
    assert_matches_svd(A, U, S, Vh, 16, rtol=1e-9)
