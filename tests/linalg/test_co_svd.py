"""damp_covariance and co_svd against PEFT's CorDA code (the peer oracle) and an fp64 oracle.

PEFT's ``collect_eigens_for_layer`` (damping loop, full fp32 SVD of W·C_d, V = (Vh·inv(C_d))^T)
and ``crop_corda_eigens`` (first r for "ipm", last r for "kpm") are run as shipped; the damp PEFT
picks is recomputed by a verbatim copy of its loop (``peft_damp``), and the S it returns would
differ if our damp differed.
"""

import importlib
from collections import OrderedDict

import pytest
import torch
from svd_helpers import align_signs, with_spectrum
from torch import nn

from corda_kernels.linalg import largest_singular_triplets, randomized_svd, smallest_singular_triplets
from corda_kernels.linalg.co_svd import co_svd, damp_covariance

peft_corda = pytest.importorskip("peft.tuners.lora.corda")
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora.config import CordaConfig  # noqa: E402

co_svd_module = importlib.import_module("corda_kernels.linalg.co_svd")  # the module (the package exports the function)


def peft_damp(C):
    """The damp PEFT's collect_eigens_for_layer settles on (its loop, verbatim, fp32)."""
    covariance_matrix = C.float()
    damp = 0.01
    while True:
        compensate = torch.diag(
            torch.ones(covariance_matrix.size(0)) * torch.mean(torch.diag(covariance_matrix)) * damp
        )
        fix_covariance_matrix = covariance_matrix + compensate
        cov_inv = torch.linalg.inv(fix_covariance_matrix)
        inv_error = torch.dist(fix_covariance_matrix @ cov_inv, torch.eye(covariance_matrix.size(0))).item()
        if inv_error < 0.05:
            return damp
        damp = damp * 2


def peft_corda_eigens(W, C, rank, method):
    """PEFT's CorDA factors of one nn.Linear: collect_eigens_for_layer, then crop_corda_eigens."""
    linear = nn.Linear(W.shape[1], W.shape[0], bias=False)
    linear.weight.data = W.clone()
    linear.covariance_matrix = C.clone()
    model = nn.Sequential(OrderedDict(proj=linear))
    config = LoraConfig(
        r=rank, target_modules=["proj"], init_lora_weights="corda", corda_config=CordaConfig(corda_method=method)
    )
    linear.eigens = peft_corda.collect_eigens_for_layer(linear, config)
    linear.corda_method, linear.rank = method, rank
    peft_corda.crop_corda_eigens(model, config)
    return linear.eigens.U_WC, linear.eigens.S_WC, linear.eigens.V_WC


def activation_covariance(n, tokens, seed=0, outliers=2, outlier_scale=30.0):
    """A realistic covariance: log-normal channel scales, a few outlier channels, correlated inputs."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n**0.5)
    scales = torch.exp(0.5 * torch.randn(n, generator=g))
    scales[:outliers] *= outlier_scale
    X = X * scales
    return (X.T @ X / tokens).float()


def weight(out, inn, seed=0, decay=0.03):
    """A weight with a decaying, distinct spectrum."""
    k = min(out, inn)
    return with_spectrum(
        out, inn, torch.exp(-decay * torch.arange(k, dtype=torch.float64)) + 0.05, seed=seed, dtype=torch.float32
    )


def nearly_singular_at_first_damp(n=40, seed=0, factor=1.0):
    """Symmetric C with one eigenvalue at -factor · 0.01 · mean(diag C): C + 0.01 · mean · I is
    singular (factor 1) or indefinite (factor > 1)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    lam = torch.linspace(1.0, 3.0, n, dtype=torch.float64)
    lam[0] = 0.0
    mean = lam.sum() / (n + 0.01 * factor)  # solve lam0 = -0.01 · factor · mean(lam with lam0)
    lam[0] = -0.01 * factor * mean
    C = (Q * lam) @ Q.T
    return ((C + C.T) / 2).float()


# ---------------------------------------------------------------------------------------------
# damp_covariance


@pytest.mark.parametrize(
    "n,tokens,outliers",
    [(24, 200, 1), (64, 32, 2), (160, 640, 4), (160, 40, 0)],
    ids=["small", "rank-deficient", "outliers", "few-tokens"],
)
def test_damp_matches_peft_on_ordinary_covariances(n, tokens, outliers):
    C = activation_covariance(n, tokens, seed=n + tokens, outliers=outliers)
    damped, L, damp = damp_covariance(C)
    assert damp.dtype == torch.float64 and damp.shape == ()
    assert damp.item() == peft_damp(C) == 0.01
    expected = C + 0.01 * C.diagonal().mean() * torch.eye(n)
    torch.testing.assert_close(damped, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(L @ L.mT, damped, rtol=1e-5, atol=1e-5 * float(damped.diagonal().max()))
    assert torch.equal(L, L.tril())


def test_fp64_factor_is_column_major_and_equals_torch_cholesky():
    """Peak memory: the fp64 factor is built in LAPACK's layout and factored in place; same values
    as torch.linalg.cholesky of the damped C, and the solves that use it as cholesky_solve."""
    C = torch.stack([activation_covariance(48, 200), activation_covariance(48, 100)])
    damped, L, _ = damp_covariance(C, factor_dtype=torch.float64)
    assert L.dtype == torch.float64 and L.mT.is_contiguous()
    assert torch.equal(L, torch.linalg.cholesky(damped.double()))
    B = torch.randn(2, 48, 5, dtype=torch.float64)
    torch.testing.assert_close(co_svd_module._cholesky_solve(B, L), torch.cholesky_solve(B, L), rtol=1e-12, atol=0)


def test_fp64_product_by_panels_equals_the_whole_product(monkeypatch):
    from corda_kernels.linalg import _products

    monkeypatch.setattr(_products, "FP64_PANEL", 7)
    W = torch.randn(3, 20, 30, dtype=torch.float64)
    Cd = activation_covariance(30, 80)
    whole = W @ Cd.double()
    # The same sums; BLAS may block a narrow panel differently (fp64 rounding, measured 2e-14).
    torch.testing.assert_close(_products.times_fp64(W, Cd), whole, rtol=1e-12, atol=1e-13 * whole.abs().max())


def test_damp_doubles_like_peft_when_singular():
    C = nearly_singular_at_first_damp()
    assert peft_damp(C) == 0.02
    damped, L, damp = damp_covariance(C)
    assert damp.item() == 0.02
    torch.testing.assert_close(damped, C + 0.02 * C.diagonal().mean() * torch.eye(40), rtol=1e-6, atol=1e-7)


def test_damp_is_per_matrix_in_a_batch():
    ordinary = activation_covariance(40, 100)
    singular = nearly_singular_at_first_damp()
    C = torch.stack([torch.stack([ordinary, singular]), torch.stack([singular, singular])])
    damped, L, damp = damp_covariance(C)
    assert damp.shape == (2, 2)
    assert damp.tolist() == [[0.01, 0.02], [0.02, 0.02]]
    single = damp_covariance(singular)
    torch.testing.assert_close(damped[0, 1], single.covariance)
    torch.testing.assert_close(L[1, 1], single.cholesky)


def test_indefinite_covariance_is_damped_until_positive_definite():
    """A documented difference: PEFT accepts an indefinite C_d whose LU inverse is accurate; the
    Cholesky factorization needs C_d positive definite, so the damp keeps growing."""
    C = nearly_singular_at_first_damp(factor=3.0)  # eigenvalue -0.03 · mean
    assert peft_damp(C) == 0.01
    damped, L, damp = damp_covariance(C)
    assert damp.item() == 0.04
    assert torch.linalg.eigvalsh(damped.double()).min() > 0


def test_fp64_covariance():
    C = activation_covariance(32, 100).double()
    damped, L, damp = damp_covariance(C)
    assert damped.dtype == L.dtype == torch.float64 and damp.item() == 0.01
    torch.testing.assert_close(L @ L.mT, damped, rtol=1e-12, atol=1e-12)
    _, L32, _ = damp_covariance(C.float())
    assert L32.dtype == torch.float32
    _, L64, _ = damp_covariance(C.float(), factor_dtype=torch.float64)
    assert L64.dtype == torch.float64
    torch.testing.assert_close(L64.float(), L32, rtol=1e-4, atol=1e-5)


def test_still_singular_names_the_layer():
    n = 64
    Q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0))).Q
    lam = torch.ones(n)
    lam[0] = -5.0  # needs damp > 5 / mean ≈ 5.6, i.e. 10 doublings of 0.01
    C = (Q * lam) @ Q.T
    C = (C + C.T) / 2
    with pytest.raises(
        ValueError, match=r"damp_covariance \(layers\.3\.mlp\.down_proj\): .*still singular .* after 5 damp"
    ):
        damp_covariance(C, max_increases=5, name="layers.3.mlp.down_proj")
    assert damp_covariance(C, max_increases=10).damp.item() == 0.01 * 2**10


def test_asymmetry_by_panels_equals_the_whole_difference():
    """_check_covariance's max |C - Cᵀ| read by row panels finds one asymmetric pair anywhere (each
    panel against the columns right of its start, across panel borders, per matrix of a batch)."""
    asymmetry = importlib.import_module("corda_kernels.linalg.co_svd")._asymmetry
    n = 600  # panels of 256: 0..255, 256..511, 512..599
    X = torch.randn(3, n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    C = X + X.mT
    torch.testing.assert_close(asymmetry(C), torch.zeros(3, dtype=torch.float64))
    for b, i, j in [(0, 0, 599), (1, 599, 0), (2, 300, 255), (0, 256, 256), (1, 511, 512), (2, 599, 598)]:
        D = C.clone()
        D[b, i, j] += 0.5
        expected = (D - D.mT).abs().flatten(-2).amax(-1)
        torch.testing.assert_close(asymmetry(D), expected, rtol=0, atol=0)
        assert asymmetry(D)[b] == (0.5 if i != j else 0.0)


@pytest.mark.parametrize(
    "C,kwargs,exc,match",
    [
        (torch.zeros(2, 5, 5), {}, ValueError, "non-positive mean diagonal at flat batch index 0"),
        (torch.full((3, 3), float("nan")), {}, FloatingPointError, "C of shape"),
        (torch.eye(4).triu() + torch.ones(4, 4).triu(1), {}, ValueError, "not symmetric.*finalize_covariance"),
        (torch.ones(3, 4), {}, ValueError, "square"),
        (torch.ones(3, 3, dtype=torch.int64), {}, TypeError, "C must be"),
        (torch.eye(3), {"growth": 1.0}, ValueError, "growth > 1"),
        (torch.eye(3), {"damp": 0.0}, ValueError, "damp > 0"),
    ],
    ids=["zero", "nan", "upper-only", "not-square", "int", "growth", "damp"],
)
def test_damp_bad_input(C, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        damp_covariance(C, **kwargs)


# ---------------------------------------------------------------------------------------------
# co_svd against PEFT


def fp64_corda(W, C, rank, method, damp):
    """PEFT's computation (same damp) in fp64: the oracle both implementations are measured against."""
    C64 = C.double()
    damped = C64 + damp * C64.diagonal().mean() * torch.eye(C.shape[0], dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(W.double() @ damped, full_matrices=False)
    V = torch.linalg.solve(damped, Vh.T)
    sl = slice(None, rank) if method == "ipm" else slice(-rank, None)
    return U[:, sl], S[sl], V[:, sl]


def errors(U, S, V, oracle):
    """Max errors of S, U, V (up to the sign of each column) and of U·diag(S)·V^T, relative to the
    largest entry of each oracle quantity."""
    U0, S0, V0 = oracle
    sign = align_signs(U.double(), U0)
    P, P0 = (U.double() * S.double()) @ V.double().T, (U0 * S0) @ V0.T
    return {
        "S": ((S.double() - S0).abs().max() / S0.max()).item(),
        "U": (U.double() * sign - U0).abs().max().item(),
        "V": ((V.double() * sign - V0).abs().max() / V0.abs().max()).item(),
        "USV^T": ((P - P0).abs().max() / P0.abs().max()).item(),
    }


@pytest.mark.parametrize("out,inn", [(160, 112), (104, 144)], ids=["tall", "wide"])
@pytest.mark.parametrize("mode,method", [("ipa", "exact"), ("ipa", "randomized"), ("ipa", "top"), ("kpa", "exact")])
def test_matches_peft(out, inn, mode, method):
    """Same damp; same S, U, V (up to sign) and product as PEFT, to within PEFT's own fp32 error.

    PEFT's error is measured against the fp64 oracle of its computation; ours must be within 3x
    of it plus a floor of fp32 noise (both are dominated by the rounding of an fp32 SVD, so the
    DESIGN's 2x rule is too tight by chance), and so within 4x of PEFT itself. The randomized
    method's defaults target the approximation (excess/deficit <= 1e-4), not fp32-exact vectors:
    its floor is 1e-4.
    """
    rank, floor = 6, 1e-4 if method == "randomized" else 1e-5
    peft_method = "ipm" if mode == "ipa" else "kpm"
    W = weight(out, inn, seed=out)
    C = activation_covariance(inn, 4 * inn, seed=inn)
    U0, S0, V0 = peft_corda_eigens(W, C, rank, peft_method)
    res = co_svd(W, C, rank, mode=mode, svd=method)
    assert res.damp.item() == peft_damp(C) == 0.01
    assert res.U.shape == (out, rank) and res.S.shape == (rank,) and res.V.shape == (inn, rank)
    assert res.U.dtype == res.S.dtype == res.V.dtype == torch.float32
    oracle = fp64_corda(W, C, rank, peft_method, 0.01)
    peft_err, ours_err = errors(U0, S0, V0, oracle), errors(res.U, res.S, res.V, oracle)
    vs_peft = errors(res.U, res.S, res.V, (U0.double(), S0.double(), V0.double()))
    for key in peft_err:
        assert ours_err[key] <= 3 * peft_err[key] + floor, (key, ours_err, peft_err)
        assert vs_peft[key] <= 4 * peft_err[key] + floor, (key, vs_peft, peft_err)


def test_damp_agrees_with_peft_through_collect_eigens():
    """With a covariance PEFT damps twice, PEFT's S (which depends on the damp) is reproduced."""
    W = weight(30, 40, seed=1)
    C = nearly_singular_at_first_damp()
    U0, S0, V0 = peft_corda_eigens(W, C, 5, "ipm")
    res = co_svd(W, C, 5, svd="exact")
    assert res.damp.item() == 0.02
    torch.testing.assert_close(res.S, S0, rtol=1e-5, atol=0)
    other = co_svd(W, C, 5, svd="exact", damp=0.04)
    assert (other.S - S0).abs().max() > 1e-3 * S0.max()  # the comparison is sensitive to the damp


# ---------------------------------------------------------------------------------------------
# co_svd against an fp64 oracle


def oracle(W, C, rank, mode):
    damped = damp_covariance(C).covariance.double()
    U, S, Vh = torch.linalg.svd(W.double() @ damped, full_matrices=False)
    sl = slice(None, rank) if mode == "ipa" else slice(-rank, None)
    return U[:, sl], S[sl], Vh[sl].T, damped


@pytest.mark.parametrize("mode,method", [("ipa", "exact"), ("ipa", "randomized"), ("ipa", "top"), ("kpa", "exact")])
def test_matches_fp64_oracle(mode, method):
    W, C = weight(120, 150, seed=2), activation_covariance(150, 600, seed=3)
    U0, S0, Vsvd0, damped = oracle(W, C, 7, mode)
    res = co_svd(W, C, 7, mode=mode, svd=method)
    torch.testing.assert_close(res.S.double(), S0, rtol=1e-5, atol=0)
    sign = align_signs(res.U.double(), U0)
    torch.testing.assert_close(res.U.double() * sign, U0, atol=1e-4, rtol=0)
    # V = C_d^{-1} V_svd: C_d V gives back the orthonormal right singular vectors.
    torch.testing.assert_close((damped @ res.V.double()) * sign, Vsvd0, atol=1e-4, rtol=0)


def test_kpa_is_accurate_when_w_c_is_ill_conditioned():
    """Bottom values of W·C_d at condition > 1e6: fp64 inside keeps them to fp32 rounding, while an
    fp32 SVD of the fp32 product (PEFT's way) loses 100x more."""
    n = 96
    W = with_spectrum(n, n, torch.logspace(0, -4, n, dtype=torch.float64), seed=4, dtype=torch.float32)
    C = activation_covariance(n, 400, seed=5, outliers=3, outlier_scale=100.0)
    _, S0, _, damped = oracle(W, C, 8, "kpa")
    assert S0[0] / torch.linalg.svdvals(W.double() @ damped)[0] < 1e-6
    res = co_svd(W, C, 8, mode="kpa")
    assert ((res.S.double() - S0).abs() / S0).max() < 1e-6
    S32 = torch.linalg.svdvals(W @ damped.float())[-8:]
    assert ((S32.double() - S0).abs() / S0).max() > 1e-4


def test_shared_covariance_broadcasts_over_layers():
    W = torch.stack([weight(24, 32, seed=s) for s in range(3)])
    C = activation_covariance(32, 100)
    res = co_svd(W, C, 4, svd="exact")
    assert res.U.shape == (3, 24, 4) and res.V.shape == (3, 32, 4) and res.damp.shape == (3,)
    for i in range(3):
        one = co_svd(W[i], C, 4, svd="exact")
        torch.testing.assert_close(res.S[i], one.S, rtol=1e-6, atol=0)
        sign = align_signs(res.U[i], one.U)
        torch.testing.assert_close(res.V[i] * sign, one.V, rtol=0, atol=1e-5 * float(one.V.abs().max()))
    # Two groups of layers, one covariance per group.
    W2 = torch.stack([W[:2], W[1:]])  # (2, 2, 24, 32)
    C2 = torch.stack([C, nearly_singular_at_first_damp(32)])[:, None]  # (2, 1, 32, 32)
    res2 = co_svd(W2, C2, 4, mode="kpa")
    assert res2.damp.tolist() == [[0.01, 0.01], [0.02, 0.02]]
    torch.testing.assert_close(res2.S[0, 1], co_svd(W[1], C, 4, mode="kpa").S, rtol=1e-6, atol=0)


def test_bf16_weight():
    W, C = weight(128, 112, seed=6).bfloat16(), activation_covariance(112, 400)
    res = co_svd(W, C, 3)
    assert res.U.dtype == res.S.dtype == res.V.dtype == torch.float32
    _, S0, _, _ = oracle(W.float(), C, 3, "ipa")
    torch.testing.assert_close(res.S.double(), S0, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "W,C,rank,kwargs,exc,match",
    [
        (torch.randn(8, 6), torch.eye(6), 2, {"mode": "ipm"}, ValueError, "PEFT's 'ipm' is 'ipa'"),
        (torch.randn(8, 6), torch.eye(6), 2, {"mode": "kpa", "svd": "randomized"}, ValueError, "svd for mode"),
        (torch.randn(8, 6), torch.eye(8), 2, {}, ValueError, r"in = W.shape\[-1\] = 6"),
        (torch.randn(2, 8, 6), torch.eye(6).expand(3, 6, 6), 2, {}, ValueError, "broadcast"),
        (torch.randn(8, 6), torch.eye(6).expand(2, 6, 6), 2, {}, ValueError, "broadcast"),
        (torch.randn(8, 6), torch.eye(6), 7, {"name": "l.q"}, ValueError, r"\(l\.q\): rank must be .* W of shape"),
        (torch.full((8, 6), float("inf")), torch.eye(6), 2, {}, FloatingPointError, "W of shape"),
    ],
    ids=["peft-mode-name", "kpa-randomized", "in-mismatch", "batch-mismatch", "c-batch-bigger", "rank", "inf"],
)
def test_co_svd_bad_input(W, C, rank, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        co_svd(W, C, rank, **kwargs)


# ---------------------------------------------------------------------------------------------
# The plain SVD triplets of PiSSA / MiLoRA / SiVA


@pytest.mark.parametrize("mode,method", [("top", "randomized"), ("top", "exact"), ("bottom", "exact")])
def test_svd_triplets(mode, method):
    W = weight(150, 120, seed=7)
    solver = {"randomized": randomized_svd, "exact": largest_singular_triplets}[method] if mode == "top" else None
    U, S, Vh = (solver or smallest_singular_triplets)(W, 4)
    U0, S0, Vh0 = torch.linalg.svd(W.double(), full_matrices=False)
    sl = slice(None, 4) if mode == "top" else slice(-4, None)
    torch.testing.assert_close(S.double(), S0[sl], rtol=1e-5, atol=0)
    sign = align_signs(U.double(), U0[:, sl])
    torch.testing.assert_close(Vh.double() * sign.T, Vh0[sl], atol=1e-4, rtol=0)


def test_co_svd_method_is_a_deprecated_alias_of_svd():
    W, C = weight(24, 16, seed=1), activation_covariance(16, 64)
    with pytest.warns(DeprecationWarning, match="svd="):
        old = co_svd(W, C, 3, method="exact")
    torch.testing.assert_close(old.S, co_svd(W, C, 3, svd="exact").S, rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass only svd=|pass svd= only"):
        co_svd(W, C, 3, method="exact", svd="randomized")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_gpu_llama_shapes_match_cpu(mode, cuda_device):
    W = torch.randn(2, 4096, 4096, generator=torch.Generator().manual_seed(0)) / 64
    X = torch.randn(8192, 4096, generator=torch.Generator().manual_seed(1))
    X[:, :4] *= 30
    C = X.T @ X / 8192
    res = co_svd(W.to(cuda_device), C.to(cuda_device), 128, mode=mode, svd="exact" if mode == "kpa" else None)
    ref = co_svd(W[0], C, 128, mode=mode, svd="exact")
    torch.testing.assert_close(res.S[0].cpu(), ref.S, rtol=1e-4, atol=0)
    assert res.damp.tolist() == [ref.damp.item()] * 2


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_cov_index_equals_each_layer_with_its_covariance(mode, monkeypatch):
    """Layers sharing inputs (q/k/v) pass the distinct covariances once and an index per layer: the
    same result as each layer with its own covariance, each distinct covariance factored once."""
    import importlib

    module = importlib.import_module("corda_kernels.linalg.co_svd")  # the module (the package exports the function)
    W = torch.stack([weight(24, 32, seed=s) for s in range(4)])
    C = torch.stack([activation_covariance(32, 100, seed=7), nearly_singular_at_first_damp(32)])
    index = torch.tensor([0, 1, 1, 0])
    factored = []
    real = module._factor
    monkeypatch.setattr(module, "_factor", lambda d, *a, **k: factored.append(d.shape[0]) or real(d, *a, **k))
    svd = "exact"
    res = co_svd(W, C, 4, mode=mode, svd=svd, cov_index=index)
    assert factored == ([2] if mode == "kpa" else [])  # ipa: V = Wᵀ U S⁻¹, no factor
    assert res.damp.tolist() == [0.01, 0.02, 0.02, 0.01]
    for i in range(4):
        one = co_svd(W[i], C[index[i]], 4, mode=mode, svd=svd)
        torch.testing.assert_close(res.S[i], one.S, rtol=1e-6, atol=0)
        sign = align_signs(res.U[i], one.U)
        torch.testing.assert_close(res.V[i] * sign, one.V, rtol=0, atol=1e-5 * float(one.V.abs().max()))
    with pytest.raises(ValueError, match=r"cov_index must lie in \[0, 2\)"):
        co_svd(W, C, 4, mode=mode, cov_index=torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("mode,svd", [("ipa", "top"), ("ipa", "randomized"), ("ipa", "exact"), ("kpa", "exact")])
def test_shared_equals_co_svd_of_each_layer(mode, svd, monkeypatch):
    """co_svd_shared (q/k/v-like layers of different shapes on one input): each result is co_svd's
    for that layer alone, bit for bit, with the covariance damped and factored once."""
    from corda_kernels.linalg import co_svd_shared

    weights = [weight(40, 32, seed=1), weight(12, 32, seed=2), weight(12, 32, seed=3).bfloat16()]
    C = nearly_singular_at_first_damp(32)
    damped, factored = [], []
    real_damp, real_factor = co_svd_module.damp_covariance, co_svd_module._factor
    monkeypatch.setattr(co_svd_module, "damp_covariance", lambda C, **k: damped.append(1) or real_damp(C, **k))
    monkeypatch.setattr(co_svd_module, "_factor", lambda d, *a, **k: factored.append(1) or real_factor(d, *a, **k))
    ranks, seeds = [4, 3, 5], [0, 1, 2]
    res = co_svd_shared(weights, C, ranks, mode=mode, svd=svd, seeds=seeds, names=["q", "k", "v"])
    assert len(damped) == 1 and len(factored) == (mode == "kpa")  # ipa: V = Wᵀ U S⁻¹, no factor
    for W, r, s, got in zip(weights, ranks, seeds, res):
        one = co_svd(W, C, r, mode=mode, svd=svd, seed=s)
        for a, b in zip(got, one):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert got.damp.item() == 0.02


@pytest.mark.parametrize(
    "weights,C,ranks,kwargs,exc,match",
    [
        ([], torch.eye(6), 2, {}, ValueError, "one or more weights"),
        ([torch.randn(8, 6)] * 2, torch.eye(6), [2], {}, ValueError, "2 weights, 1 ranks"),
        (
            [torch.randn(8, 6)],
            torch.eye(6),
            2,
            {"names": ["a", "b"]},
            ValueError,
            "1 weights, 1 ranks, 1 seeds, 2 names",
        ),
        ([torch.randn(8, 6)], torch.eye(6).expand(2, 6, 6), 2, {}, ValueError, r"one \(in, in\) matrix"),
        (
            [torch.randn(8, 6), torch.randn(4, 5)],
            torch.eye(6),
            2,
            {"names": ["q", "k"]},
            ValueError,
            r"\(k\): W must be \(out, in\) with in = 6",
        ),
        (
            [torch.randn(8, 6), torch.randn(4, 6)],
            torch.eye(6),
            [2, 5],
            {"names": ["q", "k"]},
            ValueError,
            r"\(k\): rank must be",
        ),
        ([torch.randn(8, 6)], torch.eye(6), 2, {"mode": "kpa", "svd": "top"}, ValueError, "svd for mode"),
        (
            [torch.full((8, 6), float("nan"))],
            torch.eye(6),
            2,
            {"names": ["l.v"]},
            FloatingPointError,
            r"\(l\.v\): W of shape",
        ),
        ([torch.randn(8, 6)], torch.full((6, 6), float("nan")), 2, {}, FloatingPointError, "C of shape"),
    ],
    ids=["none", "ranks", "names", "batched-c", "in-mismatch", "rank", "kpa-top", "nan-w", "nan-c"],
)
def test_shared_bad_input(weights, C, ranks, kwargs, exc, match):
    from corda_kernels.linalg import co_svd_shared

    with pytest.raises(exc, match=match):
        co_svd_shared(weights, C, ranks, **kwargs)


@pytest.mark.parametrize("svd", ["top", "randomized", "exact"])
def test_ipa_right_vectors_without_the_factor_equal_the_solve(svd, monkeypatch):
    """ipa's V = Wᵀ U S⁻¹ is C_d⁻¹ V_svd (V_svd = C_d Wᵀ U S⁻¹ for the triplets of W·C_d): equal
    to the fp64 Cholesky solve on an ill-conditioned covariance; components at noise level (a
    rank-deficient W) are solved with the factor instead, finite."""
    W, C = weight(60, 48, seed=4), nearly_singular_at_first_damp(48)
    res = co_svd(W, C, 6, svd=svd)
    damped = damp_covariance(C)
    L = co_svd_module._factor(damped.covariance, torch.float64)
    U, S, Vh = torch.linalg.svd(W.double() @ damped.covariance.double(), full_matrices=False)
    solved = co_svd_module._cholesky_solve(Vh[:6].mT, L)
    sign = align_signs(res.U.double(), U[:, :6])
    torch.testing.assert_close(res.V.double() * sign, solved, rtol=0, atol=1e-5 * float(solved.abs().max()))

    low = W.clone()
    low[:, 2:] = 0  # rank 2: components 3.. of W·C_d are noise
    factored = []
    real = co_svd_module._factor
    monkeypatch.setattr(co_svd_module, "_factor", lambda d, *a, **k: factored.append(1) or real(d, *a, **k))
    out = co_svd(low, C, 4, svd=svd)
    assert factored == [1] and bool(torch.isfinite(out.V).all())
    ref = co_svd_module._cholesky_solve(
        out.S.new_tensor(0).double()
        + torch.linalg.svd(low.double() @ damped.covariance.double(), full_matrices=False).Vh[:2].mT,
        L,
    )
    sign = align_signs(out.U[:, :2].double(), torch.linalg.svd(low.double() @ damped.covariance.double()).U[:, :2])
    torch.testing.assert_close(out.V[:, :2].double() * sign, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
