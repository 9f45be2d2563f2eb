"""The global PEFT patch: patch_peft() / unpatch_peft() / peft_patched() with no model.

Agreement: patched and unpatched PEFT, same model and data, give the same residual base weights and
adapter products s·B·A. Tolerances (relative Frobenius, per layer):

- ``EXACT_TOL`` (1e-5): the same factorization (OLoRA; PiSSA on separated singular values);
- ``PRODUCT_TOL`` (1e-3): PiSSA on random or real weights, whose top-r singular values nearly tie:
  PEFT's own fp32 SVD is that far from an fp64 SVD there (measured 4.5e-4 on SmolLM2's q_proj;
  ours is an fp64 solve), so both are compared as products, never as vectors, and ours must be at
  least as close to the fp64 oracle as PEFT's; CorDA likewise;
- ``"pissa_niter_N"`` is random on both sides: ours must be at least as close to the exact top-r
  product as PEFT's ``torch.svd_lowrank``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import os
import subprocess
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("peft.tuners.lora.corda")  # reached as peft.tuners.lora.corda below, also in a -k subset
from peft import EvaConfig, LoftQConfig, LoraConfig, PeftModel, get_peft_model, initialize_lora_eva_weights  # noqa: E402
from peft.tuners.lora.config import CordaConfig  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402
from peft.tuners.tuners_utils import BaseTuner  # noqa: E402

import corda_kernels as ck  # noqa: E402
from corda_kernels.integrations import peft_global, peft_init  # noqa: E402
from corda_kernels.integrations.peft_patch import is_patched  # noqa: E402
from corda_kernels.testing import peft_loftq_on_weight_device, tiny_gpt2, tiny_llama  # noqa: E402

co_svd_module = importlib.import_module("corda_kernels.linalg.co_svd")  # the module (the package exports the function)

EXACT_TOL = 1e-5
PRODUCT_TOL = 1e-3
LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj", "c_fc"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(ck.__file__)))  # the checkout holding corda_kernels


@pytest.fixture(autouse=True)
def _no_global_patch_left():
    yield
    ck.unpatch_peft()


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _lora_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}


def _product(layer):
    return layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def _compare(ours, ref, tol):
    """Worst relative difference of the residual weights and adapter products, both below tol.

    A layer whose singular values nearly tie at r may differ by more (PEFT's fp32 SVD and ours pick
    slightly different top-r subspaces): such a layer passes only if ours is at least as close as
    PEFT's to the exact (fp64) top-r product of the layer's original weight."""
    a, b = _lora_layers(ours), _lora_layers(ref)
    assert a.keys() == b.keys() and a
    worst_w = worst_p = 0.0
    for name in a:
        wa, wb = a[name].get_base_layer().weight, b[name].get_base_layer().weight
        assert wa.shape == wb.shape and wa.dtype == wb.dtype, name
        assert a[name].lora_A["default"].weight.dtype == b[name].lora_A["default"].weight.dtype, name
        pa, pb = _product(a[name]), _product(b[name])
        rel_w, rel_p = _rel(wa, wb), _rel(pa, pb)
        if max(rel_w, rel_p) > tol:
            original = wb.detach().double() + pb.detach().double()
            U, S, Vh = torch.linalg.svd(original, full_matrices=False)
            r = a[name].lora_A["default"].weight.shape[0]
            exact = (U[:, :r] * S[:r]) @ Vh[:r]
            assert _rel(pa, exact) <= 1.1 * _rel(pb, exact) + 1e-7, (name, _rel(pa, exact), _rel(pb, exact))
            assert _rel(wa.double() + pa.double(), original) <= 1e-5, name  # the residual still adds up
            continue
        worst_w, worst_p = max(worst_w, rel_w), max(worst_p, rel_p)
    assert worst_w <= tol and worst_p <= tol, (worst_w, worst_p)
    return worst_w, worst_p


def _pair(make, init, targets, **config):
    """(patched, unpatched) PeftModels built from two copies of one base model."""
    base = make()
    other = copy.deepcopy(base)

    def cfg():
        return LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **config)

    ref = get_peft_model(base, cfg())
    with ck.peft_patched():
        ours = get_peft_model(other, cfg())
    return ours, ref


@pytest.fixture
def engine_calls(monkeypatch):
    """Counts the layers our engine initialized, per method."""
    calls = {"pissa": 0, "olora": 0}
    for kind in calls:
        real = getattr(peft_init, f"_run_{kind}")

        def spy(chunk, rank, niter, _real=real, _kind=kind):
            calls[_kind] += len(chunk)
            return _real(chunk, rank, niter)

        monkeypatch.setattr(peft_init, f"_run_{kind}", spy)
    return calls


def _steep_llama():
    """A 1-block Llama whose weights have power-law spectra (the randomized solver converges)."""
    model = tiny_llama(hidden=512, layers=1, intermediate=640, heads=8, kv_heads=8, vocab=64)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                m, n = module.weight.shape
                k = min(m, n)
                U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
                V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
                S = torch.arange(1, k + 1, dtype=torch.float32) ** -1.0
                module.weight.copy_((U * S) @ V.T)
    return model


# ----------------------------------------------------------------------------------------------
# Agreement per initialization


@pytest.mark.parametrize("make,targets", [(tiny_llama, LLAMA), (tiny_gpt2, GPT2)], ids=["llama", "gpt2"])
def test_pissa_agrees_with_peft(make, targets, engine_calls):
    fan = {"fan_in_fan_out": True} if make is tiny_gpt2 else {}
    ours, ref = _pair(make, "pissa", targets, **fan)
    _compare(ours, ref, PRODUCT_TOL)
    assert engine_calls["pissa"] == len(_lora_layers(ours))
    _closer_to_fp64_than_peft(ours, ref, fan=bool(fan))


def _closer_to_fp64_than_peft(ours, ref, fan=False):
    """Per layer: our s·B·A is at least as close to the fp64 top-r product of W as PEFT's."""
    a = _lora_layers(ours)
    for name, layer in _lora_layers(ref).items():
        P_ref = _product(layer).detach().double()
        W = layer.get_base_layer().weight.detach().double()
        W = (W.T if fan else W) + P_ref
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        r = layer.r["default"]
        oracle = (U[:, :r] * S[:r]) @ Vh[:r]
        assert _rel(_product(a[name]), oracle) <= _rel(P_ref, oracle) + 1e-7, name


def test_pissa_separated_spectrum_agrees_exactly(engine_calls):
    ours, ref = _pair(_steep_llama, "pissa", LLAMA)
    _compare(ours, ref, EXACT_TOL)  # separated singular values: the same factors
    assert engine_calls["pissa"] == 7


def test_pissa_bf16_base_keeps_peft_dtypes():
    ours, ref = _pair(lambda: tiny_llama(dtype=torch.bfloat16), "pissa", LLAMA)
    _compare(ours, ref, 1e-2)  # bf16 residual: one rounding of W − s·B·A
    for layer in _lora_layers(ours).values():
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
        assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's autocast_adapter_dtype


@pytest.mark.parametrize("make,targets", [(_steep_llama, LLAMA), (tiny_gpt2, GPT2)], ids=["llama", "gpt2"])
def test_pissa_niter_at_least_as_accurate(make, targets, engine_calls):
    fan = {"fan_in_fan_out": True} if make is tiny_gpt2 else {}
    torch.manual_seed(0)
    ours, ref = _pair(make, "pissa_niter_2", targets, **fan)
    exact, _ = _pair(make, "pissa", targets, **fan)
    assert engine_calls["pissa"] == 2 * len(_lora_layers(ours))
    e = _lora_layers(exact)
    err_ours = sum(_rel(_product(m), _product(e[n])) for n, m in _lora_layers(ours).items())
    err_peft = sum(_rel(_product(m), _product(e[n])) for n, m in _lora_layers(ref).items())
    assert err_ours <= err_peft, (err_ours, err_peft)
    for n, m in _lora_layers(ours).items():  # residual + product is the original W, on both sides
        fan = getattr(m, "fan_in_fan_out", False)
        total = [x.get_base_layer().weight + (_product(x).T if fan else _product(x)) for x in (m, e[n])]
        assert _rel(total[0], total[1]) <= EXACT_TOL, n


def test_olora_agrees_with_peft(engine_calls):
    ours, ref = _pair(tiny_llama, "olora", LLAMA)
    _compare(ours, ref, EXACT_TOL)
    assert engine_calls["olora"] == 14


def test_olora_conv1d_falls_back_with_a_log_line(caplog, engine_calls):
    with caplog.at_level(logging.INFO, logger="corda_kernels.peft"):
        ours, ref = _pair(tiny_gpt2, "olora", GPT2, fan_in_fan_out=True)
    _compare(ours, ref, 0.0)  # PEFT's own code on both sides
    lines = [r.getMessage() for r in caplog.records if "OLoRA" in r.getMessage()]
    assert len(lines) == len(_lora_layers(ours)) and all("fan_in_fan_out" in line for line in lines)
    assert engine_calls["olora"] == 0


def _loftq_pair(make, targets, bits, iters, *, oracle_in_patched=False, **config):
    """(patched, unpatched-on-the-weight's-device, original weights) for ``init_lora_weights="loftq"``."""
    base = make()
    other = copy.deepcopy(base)
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}

    def cfg():
        loftq = LoftQConfig(loftq_bits=bits, loftq_iter=iters)
        return LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, init_lora_weights="loftq", loftq_config=loftq, **config
        )

    with peft_loftq_on_weight_device():
        ref = get_peft_model(base, cfg())
    with ck.peft_patched(), peft_loftq_on_weight_device() if oracle_in_patched else contextlib.nullcontext():
        ours = get_peft_model(other, cfg())
    return ours, ref, originals


def _compare_loftq(ours, ref, originals, q_tol, factor_tol=None):
    """Per layer: quantized bases within ``q_tol`` (relative; after a refinement a block's absmax
    one ulp apart moves the whole block), factors in PEFT's dtype and split (``sqrt(S)`` norms, to
    ``EXACT_TOL`` after one round, ``PRODUCT_TOL`` after refinements: ``W − Q`` is small, so Q's ulps
    move it), and B·A equal to ``PRODUCT_TOL``, or at least as close as PEFT's to the fp64 top-r of
    ``W − Q`` (the quantization error's spectrum is flat)."""
    a, b = _lora_layers(ours), _lora_layers(ref)
    assert a.keys() == b.keys() and a
    for name in a:
        qa, qb = a[name].get_base_layer().weight, b[name].get_base_layer().weight
        assert qa.dtype == qb.dtype and qa.shape == qb.shape, name
        assert _rel(qa, qb) <= q_tol, (name, _rel(qa, qb))
        for factor in ("lora_A", "lora_B"):
            fa, fb = getattr(a[name], factor)["default"].weight, getattr(b[name], factor)["default"].weight
            assert (fa.dtype, fa.shape, fa.device) == (fb.dtype, fb.shape, fb.device), (name, factor)
        # PEFT's split B = U·sqrt(S), A = sqrt(S)·Vh: row norms of A and column norms of B are sqrt(S).
        for factor, dim in (("lora_A", 1), ("lora_B", 0)):
            na = getattr(a[name], factor)["default"].weight.double().norm(dim=dim).sort().values
            nb = getattr(b[name], factor)["default"].weight.double().norm(dim=dim).sort().values
            tol = factor_tol or (EXACT_TOL if q_tol == 0 else PRODUCT_TOL)
            assert _rel(na, nb) <= tol, (name, factor, _rel(na, nb))
        pa, pb = _product(a[name]), _product(b[name])
        if _rel(pa, pb) > PRODUCT_TOL:
            U, S, Vh = torch.linalg.svd(originals[name.removeprefix("base_model.model.")].double() - qb.double())
            r = a[name].lora_A["default"].weight.shape[0]
            exact = b[name].scaling["default"] * (U[:, :r] * S[:r]) @ Vh[:r]
            assert _rel(pa, exact) <= 1.1 * _rel(pb, exact) + 1e-7, (name, _rel(pa, exact), _rel(pb, exact))


@pytest.fixture
def loftq_calls(monkeypatch):
    calls = []
    real = peft_init._run_loftq

    def spy(chunk, rank, bits, iters):
        calls.append((len(chunk), bits, iters))
        return real(chunk, rank, bits, iters)

    monkeypatch.setattr(peft_init, "_run_loftq", spy)
    return calls


@pytest.mark.parametrize("bits,iters", [(4, 1), (8, 1), (4, 3)])
def test_loftq_agrees_with_peft(bits, iters, loftq_calls):
    ours, ref, originals = _loftq_pair(tiny_llama, LLAMA, bits, iters)
    # One quantization round: the same bitsandbytes calls on the same fp32 weight, bit for bit.
    _compare_loftq(ours, ref, originals, 0.0 if iters == 1 else EXACT_TOL)
    assert sum(n for n, *_ in loftq_calls) == 14 and {(b, i) for _, b, i in loftq_calls} == {(bits, iters)}


def test_loftq_bf16_base_keeps_peft_dtypes(loftq_calls):
    ours, ref, originals = _loftq_pair(lambda: tiny_llama(dtype=torch.bfloat16), LLAMA, 4, 1)
    # PEFT moves the fp32 factors through the bf16 base dtype after its init (one bf16 rounding);
    # ours are written after that move, unrounded, as for PiSSA.
    _compare_loftq(ours, ref, originals, 0.0, factor_tol=1e-2)
    for layer in _lora_layers(ours).values():
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert sum(n for n, *_ in loftq_calls) == 14


@pytest.mark.skipif(torch.cuda.is_available(), reason="PEFT's own LoftQ runs where CUDA is present")
def test_loftq_runs_where_peft_needs_cuda():
    def cfg():
        return LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="loftq", loftq_config=LoftQConfig())

    with pytest.raises((AssertionError, RuntimeError), match="CUDA|cuda"):
        get_peft_model(tiny_llama(), cfg())  # PEFT 0.21 moves every weight to "cuda"
    with ck.peft_patched():
        model = get_peft_model(tiny_llama(), cfg())
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.device.type == "cpu"
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_loftq_conv1d_falls_back_with_a_log_line(caplog, loftq_calls):
    # PEFT's LoftQ factors a Conv1D's stored (in, out) weight as is: PEFT's own code on both sides.
    with caplog.at_level(logging.INFO, logger="corda_kernels.peft"):
        ours, ref, _ = _loftq_pair(tiny_gpt2, GPT2, 4, 1, oracle_in_patched=True, fan_in_fan_out=True)
    for name, layer in _lora_layers(ours).items():
        other = _lora_layers(ref)[name]
        for get in (lambda m: m.get_base_layer().weight, lambda m: m.lora_A["default"].weight):
            assert torch.equal(get(layer), get(other)), name
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoftQ of")]
    assert len(lines) == len(_lora_layers(ours)) and all("fan_in_fan_out" in line for line in lines)
    assert loftq_calls == []


@pytest.mark.parametrize(
    "loftq,message", [(dict(loftq_bits=3), "Only nf4 and int8"), (dict(loftq_iter=0), "greater than 0")]
)
def test_loftq_bad_options_raise_peft_errors(loftq, message, caplog):
    config = dict(r=4, target_modules=["q_proj"], init_lora_weights="loftq", loftq_config=LoftQConfig(**loftq))
    with peft_loftq_on_weight_device(), pytest.raises(ValueError, match=message):
        get_peft_model(tiny_llama(), LoraConfig(**config))
    with caplog.at_level(logging.INFO, logger="corda_kernels.peft"), ck.peft_patched():
        with pytest.raises(ValueError, match=message):
            get_peft_model(tiny_llama(), LoraConfig(**config))
    assert any("PEFT's own check" in r.getMessage() for r in caplog.records)


def _peft_and_patched(build):
    """``(unpatched, patched)`` results of ``build()``, run as is and under ``ck.peft_patched()``;
    an exception raised is that side's result, for the caller to compare with PEFT's."""
    results = []
    for patched in (False, True):
        with ck.peft_patched() if patched else contextlib.nullcontext():
            try:
                results.append(build())
            except Exception as exc:  # noqa: BLE001  (compared with PEFT's own by the caller)
                results.append(exc)
    return tuple(results)


def _corda_pair(make, targets, method, **corda):
    """(patched, unpatched) CorDA PeftModels (``CordaConfig(corda_method=method, **corda)``) built
    from two copies of one base model on the same calibration batches."""
    base = make()
    other = copy.deepcopy(base)
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, 64, (1, 24), generator=g) for _ in range(6)]

    def cfg():
        return LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=targets,
            init_lora_weights="corda",
            corda_config=CordaConfig(corda_method=method, **corda),
        )

    def run(model):
        def run_model():
            for x in ids:
                model(input_ids=x)

        return run_model

    c_ref = cfg()
    peft.tuners.lora.corda.preprocess_corda(base, c_ref, run_model=run(base))
    ref = get_peft_model(base, c_ref)
    with ck.peft_patched():
        c_ours = cfg()
        peft.tuners.lora.corda.preprocess_corda(other, c_ours, run_model=run(other))
        ours = get_peft_model(other, c_ours)
    return ours, ref


@pytest.mark.parametrize("method", ["ipm", "kpm"])
@pytest.mark.parametrize("make,targets", [(tiny_llama, LLAMA), (tiny_gpt2, GPT2)], ids=["llama", "gpt2"])
def test_corda_agrees_with_peft(make, targets, method, monkeypatch):
    calls, damped = [], []
    real, real_shared, real_damp = peft_init.co_svd, peft_init.co_svd_shared, co_svd_module.damp_covariance
    monkeypatch.setattr(peft_init, "co_svd", lambda W, *a, **k: calls.append(W.shape[0]) or real(W, *a, **k))
    monkeypatch.setattr(
        peft_init, "co_svd_shared", lambda Ws, *a, **k: calls.append(len(Ws)) or real_shared(Ws, *a, **k)
    )
    monkeypatch.setattr(co_svd_module, "damp_covariance", lambda C, **k: damped.append(1) or real_damp(C, **k))
    ours, ref = _corda_pair(make, targets, method)
    # Random weights give W·C_d nearly tied singular values at r (products move by ~1e-4 under
    # rounding: our covariance op sums in another order); kpm's bottom components are solved in fp64
    # by us, in fp32 by PEFT. Both are compared as products to PRODUCT_TOL.
    _compare(ours, ref, PRODUCT_TOL)
    assert sum(calls) == len(_lora_layers(ours))
    # One damping (and factor) per distinct input: q/k/v and gate/up share theirs (GPT-2: none shared).
    blocks = len(ours.base_model.model.model.layers) if targets is LLAMA else len(ours.base_model.model.transformer.h)
    assert len(damped) == blocks * (4 if targets is LLAMA else len(GPT2) + 1)


LORA_OPTIONS = {
    "rank_pattern": dict(rank_pattern={"q_proj": 2, "down_proj": 8}, alpha_pattern={"k_proj": 3}),
    "rslora": dict(use_rslora=True),
    "layers_to_transform": dict(layers_to_transform=[0]),
    "embedding_target": dict(target_modules=["embed_tokens", "q_proj"]),
}


@pytest.mark.parametrize("option", sorted(LORA_OPTIONS))
@pytest.mark.parametrize("init", ["pissa", "olora", "corda-ipm", "corda-kpm"])
def test_lora_options_agree_with_peft(init, option, monkeypatch):
    """LoraConfig options beside the init (per-layer ranks and alphas, rsLoRA scaling, a subset of
    blocks, an Embedding among the targets): the patched PEFT model equals PEFT's (ranks and
    scalings too), or both raise the same error; our engine initialized the layers it covers."""
    ran = []
    for name in ("_run_pissa", "_run_olora", "co_svd", "co_svd_shared"):
        real = getattr(peft_init, name)
        monkeypatch.setattr(peft_init, name, lambda *a, _real=real, **k: ran.append(1) or _real(*a, **k))
    options = {"target_modules": LLAMA, **LORA_OPTIONS[option]}
    base = tiny_llama()
    ids = [torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    method = init.split("-")[1] if init.startswith("corda") else None
    corda = {"corda_config": CordaConfig(corda_method=method)} if method else {}

    def build():
        model = copy.deepcopy(base)
        config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=init.split("-")[0], **corda, **options)
        if method:
            peft.tuners.lora.corda.preprocess_corda(model, config, run_model=lambda: [model(input_ids=x) for x in ids])
        return get_peft_model(model, config)

    ref, ours = _peft_and_patched(build)
    if isinstance(ref, Exception):
        assert type(ours) is type(ref) and str(ours) == str(ref)
        return
    assert not isinstance(ours, Exception), ours
    _compare(ours, ref, PRODUCT_TOL)
    assert ran  # not PEFT's own code for every layer
    for name, layer in _lora_layers(ours).items():
        other = _lora_layers(ref)[name]
        assert layer.r == other.r and layer.scaling == other.scaling, name


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_bf16_base_keeps_peft_dtypes(method):
    """A bf16 base: PEFT's dtypes (bf16 residual, its factor dtypes) and its products to one bf16
    rounding (both sides' products are about 2e-3 from the fp64 CorDA of the same covariance)."""
    ours, ref = _corda_pair(lambda: tiny_llama(dtype=torch.bfloat16), LLAMA, method)
    _compare(ours, ref, 1e-2)  # also asserts equal residual and factor dtypes
    assert all(layer.get_base_layer().weight.dtype == torch.bfloat16 for layer in _lora_layers(ours).values())


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_closer_to_fp64_than_peft(method):
    """Per layer, the patched s·B·A is at least as close as PEFT's to the fp64 CorDA of PEFT's own
    covariance and damp (the kept r triplets of W·C_d by an fp64 SVD, V = C_d⁻¹ V_svd), and close
    to it in absolute terms (kpm's bottom components included)."""
    base = tiny_llama()
    weights = {name: m.weight.detach().double().clone() for name, m in base.named_modules() if hasattr(m, "weight")}
    ours, ref = _corda_pair(lambda: base, LLAMA, method, prune_temporary_fields=False)
    mine = _lora_layers(ours)
    for name, layer in _lora_layers(ref).items():
        W, C = weights[name.removeprefix("base_model.model.")], layer.get_base_layer().covariance_matrix
        damp = 0.01  # PEFT's search: doubled until its fp32 inverse is accurate
        while True:
            Cd = C + torch.eye(C.shape[0]) * C.diagonal().mean() * damp
            if torch.dist(Cd @ torch.linalg.inv(Cd), torch.eye(C.shape[0])) < 0.05:
                break
            damp *= 2
        Cd = C.double() + torch.eye(C.shape[0], dtype=torch.float64) * C.double().diagonal().mean() * damp
        U, S, Vh = torch.linalg.svd(W @ Cd, full_matrices=False)
        kept = slice(0, 4) if method == "ipm" else slice(-4, None)
        oracle = (U[:, kept] * S[kept]) @ torch.linalg.solve(Cd, Vh[kept].T).T
        ours_error, peft_error = _rel(_product(mine[name]), oracle), _rel(_product(layer), oracle)
        assert ours_error <= peft_error + 1e-7 and ours_error <= 1e-4, (name, ours_error, peft_error)


@pytest.mark.parametrize("option", ["covariance_file", "cache_file", "hooked_model"])
def test_corda_files_and_hooked_model_agree_with_peft(option, tmp_path):
    """preprocess_corda's covariance and cache files (written by either side, read by the other: one
    format) and a separate hooked model give PEFT's adapters under the patch."""
    base = tiny_llama()
    ids = [torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def build(patched, path=None):
        model, hooked = copy.deepcopy(base), copy.deepcopy(base) if option == "hooked_model" else None
        files = {option: str(path)} if path is not None else {}
        corda = CordaConfig(corda_method="ipm", **files)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="corda", corda_config=corda)
        runner = model if hooked is None else hooked
        with ck.peft_patched() if patched else contextlib.nullcontext():
            run = functools.partial(lambda m: [m(input_ids=x) for x in ids], runner)
            peft.tuners.lora.corda.preprocess_corda(model, config, run_model=run, hooked_model=hooked)
            return get_peft_model(model, config)

    if option == "hooked_model":
        _compare(build(True), build(False), PRODUCT_TOL)
        return
    written = {side: tmp_path / f"{option}_{side}.pt" for side in (False, True)}
    ref, ours = build(False, written[False]), build(True, written[True])
    _compare(ours, ref, PRODUCT_TOL)
    mine, theirs = torch.load(written[True]), torch.load(written[False])
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert mine[key].shape == value.shape and mine[key].dtype == value.dtype, key
    _compare(build(True, written[False]), ref, PRODUCT_TOL)  # PEFT's file read under the patch
    _compare(build(False, written[True]), ref, PRODUCT_TOL)  # ours read by PEFT


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora", "eva"])
def test_low_cpu_mem_usage_follows_peft(init):
    """``low_cpu_mem_usage=True`` puts the LoRA factors on the meta device: PEFT's pissa / olora init
    then raises, and so does the patched one (it used to fill the base with the residual and leave
    meta factors); EVA, initialized later from data, agrees."""
    base = tiny_llama()
    eva = {"eva_config": EvaConfig(tau=0.9)} if init == "eva" else {}
    seeds = [torch.Generator().manual_seed(i) for i in range(3)]
    batches = [{"input_ids": torch.randint(0, 64, (2, 16), generator=g)} for g in seeds]

    def build():
        config = LoraConfig(r=4, target_modules=LLAMA, init_lora_weights=init, **eva)
        model = get_peft_model(copy.deepcopy(base), config, low_cpu_mem_usage=True)
        if eva:
            initialize_lora_eva_weights(model, batches, show_progress_bar=False)
        return model

    ref, ours = _peft_and_patched(build)
    if init == "eva":
        _compare(ours, ref, EXACT_TOL)
        return
    assert isinstance(ref, RuntimeError) and type(ours) is type(ref) and str(ours) == str(ref)


def test_corda_stores_only_the_kept_components():
    model = tiny_llama()
    config = _ipm_config()
    seen = {}
    with ck.peft_patched():
        corda = peft.tuners.lora.corda
        real = corda.crop_corda_eigens

        def spy(model, config):
            for name, module in corda.target_modules(model, config):
                seen[name] = tuple(module.eigens.U_WC.shape)
            return real(model, config)

        corda.crop_corda_eigens = spy
        try:
            corda.preprocess_corda(model, config, run_model=lambda: model(input_ids=torch.randint(0, 64, (1, 16))))
        finally:
            corda.crop_corda_eigens = real
    assert seen and all(shape[1] == 4 for shape in seen.values())


def _ipm_config(**corda):
    """PEFT's CorDA (ipm, rank 4) on every LLaMA projection, with these CordaConfig options."""
    return LoraConfig(
        r=4, target_modules=LLAMA, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm", **corda)
    )


@pytest.mark.parametrize("prune", [True, False])
def test_corda_frees_each_covariance_after_its_eigens(prune, monkeypatch):
    """Peak memory of preprocess_corda: with prune_temporary_fields (PEFT then deletes every
    covariance after the eigens) each layer's covariance is dropped as soon as its eigens are
    stored, one covariance (the layers sharing it) per call on a CPU, the largest covariances last;
    without it, all are kept."""
    model = tiny_llama()
    config = _ipm_config(prune_temporary_fields=prune)
    corda = peft.tuners.lora.corda
    real = peft_init.co_svd_shared
    alive, widths, sizes = [], [], []

    def spy(weights, C, *args, **kwargs):
        alive.append(sum(hasattr(m, "covariance_matrix") for _, m in corda.target_modules(model, config)))
        widths.append(C.shape[-1])
        sizes.append(len(weights))
        assert C.dim() == 2  # one covariance per call on a CPU
        return real(weights, C, *args, **kwargs)

    monkeypatch.setattr(peft_init, "co_svd_shared", spy)
    with ck.peft_patched():
        corda.preprocess_corda(
            model, config, run_model=lambda: [model(input_ids=torch.randint(0, 64, (1, 16))) for _ in range(2)]
        )
    n = len(list(corda.target_modules(model, config)))
    blocks = len(model.model.layers)
    assert sum(sizes) == n and sorted(sizes) == sorted([3, 1, 2, 1] * blocks)  # q/k/v, o, gate/up, down
    done = [sum(sizes[:i]) for i in range(len(sizes))]
    assert alive == ([n - d for d in done] if prune else [n] * len(sizes))
    assert widths == sorted(widths)  # down_proj (the widest covariance) runs when the others are gone
    assert all(hasattr(m, "covariance_matrix") != prune for _, m in corda.target_modules(model, config))


def test_corda_shared_input_sums_equal_per_layer_sums():
    """_SharedInputs (one covariance sum per group of layers fed the same tensors) gives every layer
    the sum of its own calls, whatever the call pattern: shared, diverging, repeated, modified."""
    from corda_kernels.ops.covariance import covariance_update, symmetrize_

    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        layers = [torch.nn.Identity() for _ in range(5)]
        inputs = [torch.randn(1, 6, 4, generator=rng) for _ in range(3)]
        shared, ref = peft_init._SharedInputs(), {}
        for _ in range(int(torch.randint(1, 25, (1,), generator=rng))):
            layer = layers[int(torch.randint(0, 5, (1,), generator=rng))]
            x = inputs[int(torch.randint(0, 3, (1,), generator=rng))]
            if float(torch.rand((), generator=rng)) < 0.1:
                x.mul_(1.0)  # modified in place: no longer the tensor a group took
            shared.call(layer, x)
            y = x.squeeze(0) / x.max().abs()
            covariance_update(ref.setdefault(layer, torch.zeros(4, 4)), y, check_finite=False)
        shared.finish()
        got = shared.accumulators()
        assert set(got) == set(ref)
        for layer, acc in ref.items():
            torch.testing.assert_close(got[layer], symmetrize_(acc), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad", ["nan", "+inf", "-inf", "overflow"])
def test_corda_non_finite_input_raises_peft_error(bad):
    """A calibration input holding NaN / ±Inf, or whose scaling by ``|max x|`` overflows, raises
    PEFT's own ValueError under the patch too (the hook's check reads ``aminmax``)."""
    width = tiny_llama().model.layers[0].mlp.down_proj.in_features
    x = torch.randn(1, 8, width, generator=torch.Generator().manual_seed(0))
    if bad == "overflow":  # max x is a tiny positive number: x / |max x| leaves fp32's range
        x = torch.full((1, 8, width), 1e-39)
        x[0, 3, 5] = -1.0
    else:
        x[0, 2, 7] = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}[bad]
    errors = []
    for patched in (False, True):
        model = tiny_llama()
        down = model.model.layers[0].mlp.down_proj
        with ck.peft_patched() if patched else contextlib.nullcontext(), pytest.raises(ValueError) as info:
            peft.tuners.lora.corda.preprocess_corda(model, _ipm_config(), run_model=functools.partial(down, x))
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "Invalid value found in input" in errors[0]


@pytest.mark.parametrize("case", ["batch of two", "single vector", "mixed"])
def test_corda_input_shapes_follow_peft(case):
    """PEFT's hook squeezes the batch dim and sums ``xᵀx``: a batch of several sequences raises in
    ``t()``, a single vector sums the scalar ``x·x`` (its eigens step then raises), and a layer fed
    both adds that scalar to every entry. The patched calibration does the same."""
    ids = torch.randint(0, 64, (2 if case == "batch of two" else 1, 16), generator=torch.Generator().manual_seed(0))
    targets = LLAMA if case == "mixed" else ["layers.0.self_attn.q_proj"]
    models = []

    def build():
        model = tiny_llama()
        models.append(model)
        q = model.model.layers[0].self_attn.q_proj
        vector = torch.randn(q.in_features, generator=torch.Generator().manual_seed(1))

        def run():
            if case != "single vector":
                model(input_ids=ids)
            if case != "batch of two":
                q(vector)

        config = LoraConfig(r=4, target_modules=targets, init_lora_weights="corda", corda_config=CordaConfig())
        peft.tuners.lora.corda.preprocess_corda(model, config, run_model=run)
        return get_peft_model(model, config)

    ref, ours = _peft_and_patched(build)
    assert not any("_ck_peft_sum" in m.__dict__ for model in models for m in model.modules())  # none of ours left
    if case == "mixed":
        _compare(ours, ref, PRODUCT_TOL)
    else:
        expected = RuntimeError if case == "batch of two" else IndexError
        assert type(ref) is expected and type(ours) is expected and str(ours) == str(ref)


def test_corda_q_k_v_share_one_covariance():
    model = tiny_llama()
    config = _ipm_config(prune_temporary_fields=False)
    with ck.peft_patched():
        peft.tuners.lora.corda.preprocess_corda(
            model, config, run_model=lambda: model(input_ids=torch.randint(0, 64, (1, 16)))
        )
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.covariance_matrix is attn.k_proj.covariance_matrix is attn.v_proj.covariance_matrix
    assert mlp.gate_proj.covariance_matrix is mlp.up_proj.covariance_matrix
    assert attn.o_proj.covariance_matrix is not attn.q_proj.covariance_matrix
    assert mlp.down_proj.covariance_matrix is not mlp.up_proj.covariance_matrix


# ----------------------------------------------------------------------------------------------
# Layers run fused; fallbacks


def test_built_and_loaded_layers_run_fused(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama()
    ids = torch.randint(0, 128, (2, 10))
    config = LoraConfig(r=4, target_modules=LLAMA, init_lora_weights=False)
    ref = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    ref.save_pretrained(tmp_path / "adapter")
    with ck.peft_patched():
        built = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
        assert all(is_patched(m) for m in _lora_layers(built).values())
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
        layers = _lora_layers(loaded)
        assert len(layers) == 14 and all(is_patched(m) for m in layers.values())
        with torch.no_grad():
            got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not any(is_patched(m) for m in layers.values())  # unpatched on exit


def test_dora_pissa_falls_back_with_a_log_line(caplog):
    base = tiny_llama()
    config = dict(r=4, lora_alpha=8, target_modules=LLAMA, init_lora_weights="pissa", use_dora=True)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    with caplog.at_level(logging.INFO, logger="corda_kernels.peft"), ck.peft_patched():
        ours = get_peft_model(base, LoraConfig(**config))
        fused = sum(is_patched(m) for m in _lora_layers(ours).values())
    _compare(ours, ref, 0.0)  # PEFT's own PiSSA (DoRA reads the residual at its init)
    pissa = [r.getMessage() for r in caplog.records if r.getMessage().startswith("PiSSA of")]
    assert len(pissa) == 14 and all("LoRA variant" in m for m in pissa)
    # Each layer either runs fused or says (one line) why it runs PEFT's forward.
    forward = [r.getMessage() for r in caplog.records if "runs PEFT's own forward" in r.getMessage()]
    assert fused + len(forward) == 14


# ----------------------------------------------------------------------------------------------
# EVA: get_eva_state_dict / initialize_lora_eva_weights
#
# Ours runs PEFT's incremental PCA step for step with an exact solve where PEFT uses a randomized
# SVD (torch.svd_lowrank, q = 2k, 4 iterations), so the components differ by that SVD's error.
# Compared per layer, rows sign-aligned (a sign is arbitrary; PEFT's rule picks it from the largest
# entry, which two close vectors may place differently): relative Frobenius difference of lora_A at
# most EVA_TOL, or, for nearly tied components, spans (projectors) within EVA_TOL. Ranks, scalings,
# target modules and the zero lora_B must be equal. A layer beyond EVA_TOL (nearly tied components,
# where PEFT's randomized SVD errs most) passes only if ours is at least as close as PEFT's to the
# oracle: PEFT's own algorithm run with an exact SVD (IncrementalPCA(lowrank=False)).

EVA_TOL = 5e-2


def _eva_batches(vocab, n_batches=6, batch=4, seq=32, labels=False):
    from corda_kernels.testing import token_batches

    out = token_batches(vocab, n_batches=n_batches, batch=batch, seq=seq)
    if labels:
        for b in out:
            b["labels"] = b["input_ids"].masked_fill(torch.rand(b["input_ids"].shape) < 0.3, -100)
    return out


def _eva_pair(make, targets, loader, *, r=4, **eva):
    from peft import EvaConfig, initialize_lora_eva_weights

    base = make()
    other = copy.deepcopy(base)

    def build(model):
        config = LoraConfig(
            r=r, lora_alpha=8, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(**eva)
        )
        return get_peft_model(model, config)

    third = copy.deepcopy(base)
    ref = build(base)
    initialize_lora_eva_weights(ref, loader, show_progress_bar=False)
    with ck.peft_patched():
        ours = build(other)
        initialize_lora_eva_weights(ours, loader, show_progress_bar=False)
    oracle = build(third)
    with _exact_ipca():
        initialize_lora_eva_weights(oracle, loader, show_progress_bar=False)
    return ours, ref, oracle


@contextlib.contextmanager
def _exact_ipca():
    """PEFT's EVA with an exact SVD per incremental-PCA step (IncrementalPCA(lowrank=False))."""
    from peft.tuners.lora import eva
    from peft.utils.incremental_pca import IncrementalPCA

    real = eva.IncrementalPCA
    eva.IncrementalPCA = lambda **kw: IncrementalPCA(**{**kw, "lowrank": False})
    try:
        yield
    finally:
        eva.IncrementalPCA = real


def _aligned(a, b):
    """``a``'s rows with the signs that bring them closest to ``b``'s."""
    signs = torch.sign((a.double() * b.double()).sum(-1))
    return a * torch.where(signs == 0, 1.0, signs).to(a.dtype)[:, None]


def _compare_eva(ours, ref, oracle):
    ca, cb = ours.peft_config["default"], ref.peft_config["default"]
    assert ca.rank_pattern == cb.rank_pattern and ca.alpha_pattern == cb.alpha_pattern
    assert set(ca.target_modules) == set(cb.target_modules)
    a, b = _lora_layers(ours), _lora_layers(ref)
    assert a.keys() == b.keys() and a
    worst = 0.0
    for name in a:
        Aa, Ab = a[name].lora_A["default"].weight, b[name].lora_A["default"].weight
        assert Aa.shape == Ab.shape and Aa.dtype == Ab.dtype, name
        assert a[name].scaling["default"] == b[name].scaling["default"], name
        assert not a[name].lora_B["default"].weight.any() and not b[name].lora_B["default"].weight.any()
        rel = _rel(_aligned(Aa, Ab), Ab)
        if rel > EVA_TOL:  # PEFT's randomized SVD is that far: ours must be at least as close to the oracle
            Ao = _lora_layers(oracle)[name].lora_A["default"].weight
            assert Ao.shape == Aa.shape, name
            assert _rel(_aligned(Aa, Ao), Ao) <= _rel(_aligned(Ab, Ao), Ao) + 1e-3, name
            continue
        worst = max(worst, rel)
    return worst


@pytest.fixture
def eva_solves(monkeypatch):
    """Counts the batched component solves of our EVA engine."""
    from corda_kernels.integrations import peft_eva

    calls = {"hooks": 0}
    real = peft_eva.solve

    def spy(hooks):
        calls["hooks"] += sum(h.fresh for h in hooks)
        return real(hooks)

    monkeypatch.setattr(peft_eva, "solve", spy)
    return calls


@pytest.mark.parametrize(
    "make,targets,vocab", [(tiny_llama, LLAMA, 128), (tiny_gpt2, GPT2, 100)], ids=["llama", "gpt2"]
)
def test_eva_agrees_with_peft(make, targets, vocab, eva_solves):
    ours, ref, oracle = _eva_pair(make, targets, _eva_batches(vocab))
    assert eva_solves["hooks"] > 0
    assert _compare_eva(ours, ref, oracle) <= EVA_TOL


@pytest.mark.parametrize(
    "eva",
    [dict(rho=1.0, whiten=True), dict(adjust_scaling_factors=False, tau=0.9, use_label_mask=False)],
    ids=["rho1-whiten", "no-scaling-tau0.9-no-label-mask"],
)
def test_eva_options_agree_with_peft(eva, eva_solves):
    ours, ref, oracle = _eva_pair(tiny_llama, LLAMA, _eva_batches(128, labels=True), **eva)
    assert eva_solves["hooks"] > 0
    assert _compare_eva(ours, ref, oracle) <= EVA_TOL


@pytest.mark.parametrize(
    "make,targets,vocab", [(tiny_llama, LLAMA, 128), (tiny_gpt2, GPT2, 100)], ids=["llama", "gpt2"]
)
def test_eva_row_gram_solve_agrees_with_peft(make, targets, vocab, monkeypatch, eva_solves):
    """Batches of fewer tokens than the layers' widths: every step solves the n x n row Gram matrix."""
    from corda_kernels.integrations import peft_eva

    calls = {"rows": 0}
    real = peft_eva._row_gram_top

    def spy(X, k):
        calls["rows"] += X.shape[0]
        return real(X, k)

    monkeypatch.setattr(peft_eva, "_row_gram_top", spy)
    ours, ref, oracle = _eva_pair(make, targets, _eva_batches(vocab, n_batches=8, batch=2, seq=10))
    assert calls["rows"] > 0 and calls["rows"] == eva_solves["hooks"]
    assert _compare_eva(ours, ref, oracle) <= EVA_TOL


def test_eva_row_gram_top_is_the_exact_svd():
    from corda_kernels.integrations.peft_eva import _row_gram_top

    g = torch.Generator().manual_seed(0)
    X = torch.randn(3, 20, 50, dtype=torch.float64, generator=g) * torch.logspace(0, -2, 50, dtype=torch.float64)
    values, V, ok = _row_gram_top(X, 6)
    S, Vh = torch.linalg.svd(X, full_matrices=False)[1:]
    assert ok.all()
    torch.testing.assert_close(values, S[:, :6].square(), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        (V.mT * Vh[:, :6]).sum(-1).abs(), torch.ones(3, 6, dtype=torch.float64), rtol=0, atol=1e-10
    )
    # Rank-deficient rows (a first batch of exactly k tokens, centered: rank k - 1): not accepted.
    Y = torch.randn(2, 6, 50, dtype=torch.float64, generator=g)
    assert not _row_gram_top(Y - Y.mean(-2, keepdim=True), 6)[2].any()


def test_eva_rank_deficient_rows_use_the_exact_scatter_solve():
    """A layer whose first batch has exactly k tokens: PEFT's centered matrix has rank k - 1."""
    from corda_kernels.integrations.peft_eva import _hook_classes, solve

    _, CovarianceHook = _hook_classes()
    hook = CovarianceHook(
        n_components=6, sim_thresh=0.99, name="layer", prepare_layer_inputs_fn=None, gather_distributed_inputs=False
    )
    X = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    hook.add(X)
    assert hook.stacked is not None and hook.stacked.shape == (6, 40)
    solve([hook])
    Xc = (X - X.mean(0)).double()
    values, vectors = torch.linalg.eigh(Xc.T @ Xc)
    top = vectors[:, -5:].flip(-1)  # the 5 nonzero components
    torch.testing.assert_close(hook.singular_values_[:5].double().square(), values[-5:].flip(-1), rtol=1e-5, atol=1e-6)
    assert ((hook.components_[:5].double() @ top).abs().diagonal() - 1).abs().max() < 1e-5
    C = hook.components_.double()
    torch.testing.assert_close(C @ C.T, torch.eye(6, dtype=torch.float64), rtol=0, atol=1e-5)


def test_eva_forwards_stop_after_the_last_collecting_layer():
    """With PEFT's default forward_fn the loop's forwards stop once every collecting layer has its
    input (the LM head never runs after the first forward); the components are bit-equal to those
    of full forwards (a caller's own forward_fn runs them to the end)."""
    from peft import EvaConfig, get_eva_state_dict

    config = LoraConfig(r=4, target_modules=LLAMA, init_lora_weights="eva", eva_config=EvaConfig())
    loader = _eva_batches(128)
    runs = {}
    for label, kwargs in [("default", {}), ("own", {"forward_fn": lambda model, inputs: model(**inputs)})]:
        model = tiny_llama()
        heads = []
        model.lm_head.register_forward_hook(lambda *args, heads=heads: heads.append(1))
        with ck.peft_patched():
            runs[label] = (get_eva_state_dict(model, loader, config, show_progress_bar=False, **kwargs), len(heads))
    (early, heads_early), (full, heads_full) = runs["default"], runs["own"]
    assert heads_early == 1 and heads_full > 2
    assert early.keys() == full.keys()
    for name in full:
        assert torch.equal(early[name], full[name]), name


def test_eva_later_passes_replay_the_first_passes_layer_inputs(monkeypatch, caplog):
    """PEFT cycles the same batches: from the second pass on, the layer inputs recorded in the first
    are fed to the hooks instead of running the model (one forward per batch of the first pass,
    plus PEFT's equal-input forward); the components are bit-equal to those of the forwards, which
    run every pass when the inputs exceed the budget (logged)."""
    from peft import EvaConfig, get_eva_state_dict

    from corda_kernels.integrations import peft_eva

    config = LoraConfig(r=4, target_modules=LLAMA, init_lora_weights="eva", eva_config=EvaConfig())
    loader = _eva_batches(128, n_batches=3)
    runs = {}
    for label, budget in [("replay", peft_eva.REPLAY_BYTES), ("forwards", 1)]:
        monkeypatch.setattr(peft_eva, "REPLAY_BYTES", budget)
        model = tiny_llama()
        calls = []
        model.model.embed_tokens.register_forward_hook(lambda *args, calls=calls: calls.append(1))
        caplog.clear()
        with ck.peft_patched(), caplog.at_level(logging.INFO, logger="corda_kernels.peft"):
            state = get_eva_state_dict(model, loader, config, show_progress_bar=False)
        runs[label] = (state, len(calls), caplog.text)
    (replayed, n_replayed, log_replayed), (forwarded, n_forwarded, log_forwarded) = runs["replay"], runs["forwards"]
    assert n_replayed == len(loader) + 1 and n_forwarded > 2 * len(loader) + 1  # several passes
    assert "later passes run the forwards" in log_forwarded and "later passes" not in log_replayed
    assert replayed.keys() == forwarded.keys()
    for name in forwarded:
        assert torch.equal(replayed[name], forwarded[name]), name


def test_eva_replay_budget_is_a_quarter_of_available_memory(monkeypatch):
    """The replay keeps at most REPLAY_BYTES, and at most a quarter of what the host can still give
    (MemAvailable: page cache counts as available)."""
    from corda_kernels.integrations import peft_eva

    assert peft_eva._available_host_bytes() > 0
    monkeypatch.setattr(peft_eva, "_available_host_bytes", lambda: 400 << 20)
    assert peft_eva._replay_budget(torch.device("cpu")) == 100 << 20
    monkeypatch.setattr(peft_eva, "_available_host_bytes", lambda: 64 << 30)
    assert peft_eva._replay_budget(torch.device("cpu")) == peft_eva.REPLAY_BYTES


def test_eva_replay_feeds_only_what_a_forward_would():
    """_Replay: a position is fed only when the first pass recorded it and every layer now
    collecting was called then (else the forward runs); converged layers are skipped; a recorded
    input is a copy (a later in-place change of the activation does not reach it)."""
    from corda_kernels.integrations.peft_eva import _Replay

    fed = []

    class Hook:
        def __init__(self, name):
            self.name = name

        def consume(self, states):
            fed.append((self.name, states.clone()))

    hooks = {n: (Hook(n), None) for n in "abc"}
    replay = _Replay()
    x, y = torch.ones(3, 4), torch.full((3, 4), 2.0)
    assert not replay.feed(0, hooks, ["a"])  # nothing recorded yet
    replay.begin(0)
    replay.record("a", x)
    replay.record("b", y)
    replay.record("a", y)  # a layer called twice in one forward
    replay.end()
    x.add_(5)
    replay.begin(1)  # the first pass's position 1: "c" only
    replay.record("c", y)
    replay.end()
    assert not replay.feed(0, hooks, ["a", "c"]) and not fed  # "c" was not called at position 0
    assert replay.feed(0, hooks, ["a"])  # "b" has converged: skipped
    assert [n for n, _ in fed] == ["a", "a"] and torch.equal(fed[0][1], torch.ones(3, 4))
    assert not replay.feed(2, hooks, ["a"])  # beyond the first pass
    replay.begin(0)  # a later pass's forward (a miss) records nothing
    replay.record("c", x)
    replay.end()
    assert [n for n, _ in replay.entries[0]] == ["a", "b", "a"]


def test_eva_closer_than_peft_to_its_exact_svd_version(monkeypatch, eva_solves):
    """PEFT's algorithm with an exact SVD per step (the oracle) vs PEFT's randomized one and ours."""
    from peft import EvaConfig, get_eva_state_dict
    from peft.tuners.lora import eva
    from peft.utils.incremental_pca import IncrementalPCA

    config = LoraConfig(r=4, target_modules=LLAMA, init_lora_weights="eva", eva_config=EvaConfig())
    loader = _eva_batches(128)
    ref = get_eva_state_dict(tiny_llama(), loader, config, show_progress_bar=False)
    with ck.peft_patched():
        ours = get_eva_state_dict(tiny_llama(), loader, config, show_progress_bar=False)
    monkeypatch.setattr(eva, "IncrementalPCA", lambda **kw: IncrementalPCA(**{**kw, "lowrank": False}))
    oracle = get_eva_state_dict(tiny_llama(), loader, config, show_progress_bar=False)
    assert eva_solves["hooks"] > 0 and ours.keys() == ref.keys() == oracle.keys()
    err_ours = sum(_rel(_aligned(ours[n], oracle[n]), oracle[n]) for n in oracle if ours[n].shape == oracle[n].shape)
    err_peft = sum(_rel(_aligned(ref[n], oracle[n]), oracle[n]) for n in oracle if ref[n].shape == oracle[n].shape)
    assert err_ours <= err_peft, (err_ours, err_peft)


def test_eva_state_dict_of_a_plain_model_agrees(eva_solves):
    from peft import EvaConfig, get_eva_state_dict

    config = LoraConfig(r=4, target_modules=LLAMA, init_lora_weights="eva", eva_config=EvaConfig())
    loader = _eva_batches(128)
    ref = get_eva_state_dict(tiny_llama(), loader, config, show_progress_bar=False)
    with ck.peft_patched():
        ours = get_eva_state_dict(tiny_llama(), loader, config, show_progress_bar=False)
    assert eva_solves["hooks"] > 0 and ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].shape == ref[name].shape and ours[name].dtype == ref[name].dtype
        assert _rel(_aligned(ours[name], ref[name]), ref[name]) <= EVA_TOL, name


def test_eva_bad_input_raises_peft_errors(caplog):
    from peft import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights

    config = LoraConfig(r=4, target_modules=LLAMA, init_lora_weights="eva", eva_config=EvaConfig())
    cases = [
        (lambda: get_eva_state_dict(tiny_llama(), [], config), "dataloader is empty"),
        (
            lambda: get_eva_state_dict(tiny_llama(), _eva_batches(128), config, prepare_layer_inputs_fn={"nope": None}),
            "not found in the model",
        ),
        (lambda: initialize_lora_eva_weights(get_peft_model(tiny_llama(), config)), "dataloader is required"),
        (lambda: get_eva_state_dict(tiny_llama(), _eva_batches(128), LoraConfig(r=40, target_modules=["q_proj"])), ""),
    ]
    for call, message in cases:
        with pytest.raises(Exception) as unpatched:
            call()
        with ck.peft_patched(), pytest.raises(type(unpatched.value)) as patched:
            call()
        assert str(patched.value) == str(unpatched.value) and message in str(patched.value)


def test_eva_engine_error_falls_back_to_peft(monkeypatch, caplog):
    from corda_kernels.integrations import peft_eva

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(peft_eva, "top_eigenpairs", broken)
    with caplog.at_level(logging.INFO, logger="corda_kernels.peft"):
        ours, ref, oracle = _eva_pair(tiny_llama, LLAMA, _eva_batches(128))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("EVA runs PEFT's own code")]
    assert len(lines) == 1 and "injected" in lines[0]
    assert _compare_eva(ours, ref, oracle) == 0.0
    assert not any(m._forward_hooks for m in ours.modules())


def test_engine_error_falls_back_to_peft(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(peft_init, "top_singular_triplets", broken)
    with caplog.at_level(logging.INFO, logger="corda_kernels.peft"):
        ours, ref = _pair(tiny_llama, "pissa", LLAMA)
    _compare(ours, ref, 0.0)
    assert any("injected" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# The mechanism


def _attrs():
    import peft.tuners.lora.corda as corda
    import peft.tuners.lora.eva as eva

    return (
        BaseTuner.__dict__["inject_adapter"],
        LoraLayer.__dict__["pissa_init"],
        LoraLayer.__dict__["olora_init"],
        LoraLayer.__dict__["loftq_init"],
        corda.calib_cov_distribution,
        corda.collect_eigens,
        eva._get_eva_state_dict,
    )


def test_unpatch_restores_exactly_and_is_idempotent():
    before = _attrs()
    ck.unpatch_peft()  # without a patch: a no-op
    assert _attrs() == before
    assert ck.patch_peft() is None
    patched = _attrs()
    assert all(a is not b for a, b in zip(patched, before))
    ck.patch_peft()  # idempotent: nothing wrapped twice
    assert _attrs() == patched
    assert peft_global.is_globally_patched()
    ck.unpatch_peft()
    assert all(a is b for a, b in zip(_attrs(), before))
    assert not peft_global.is_globally_patched()
    ck.unpatch_peft()
    assert all(a is b for a, b in zip(_attrs(), before))


def test_context_manager_nests_in_a_global_patch():
    before = _attrs()
    with ck.peft_patched():
        inside = _attrs()
        assert inside != before
    assert _attrs() == before
    ck.patch_peft()
    on = _attrs()
    assert all(a is not b for a, b in zip(on, before)) and inside != before
    with ck.peft_patched():
        pass
    assert _attrs() == on  # it was on before the block: still on after


def test_patch_peft_with_a_model_keeps_its_strict_meaning():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    assert len(ck.patch_peft(model)) == 2
    assert not peft_global.is_globally_patched()
    assert len(ck.unpatch_peft(model)) == 2
    with pytest.raises(ValueError, match="has no PEFT LoRA layers to patch"):
        ck.patch_peft(tiny_llama())


def test_unsupported_version_raises_before_patching(monkeypatch):
    before = _attrs()
    monkeypatch.setattr(peft, "__version__", "0.19.1")
    with pytest.raises(RuntimeError, match=r"PEFT 0\.19\.1 .*peft>=0\.21\.0,<0\.22\.0"):
        ck.patch_peft()
    assert _attrs() == before and not peft_global.is_globally_patched()


def test_broken_install_raises_before_patching(monkeypatch):
    before = BaseTuner.__dict__["inject_adapter"], LoraLayer.__dict__["pissa_init"]
    monkeypatch.delattr(LoraLayer, "olora_init")
    with pytest.raises(RuntimeError, match=r"lacks peft\.tuners\.lora\.layer\.LoraLayer\.olora_init.*peft>=0\.21"):
        ck.patch_peft()
    assert (BaseTuner.__dict__["inject_adapter"], LoraLayer.__dict__["pissa_init"]) == before
    assert not peft_global.is_globally_patched()


_SCRIPT = """
import sys
{first}
import corda_kernels
corda_kernels.patch_peft()
import peft
from peft import LoraConfig, get_peft_model
from corda_kernels.integrations.peft_patch import is_patched
from corda_kernels.testing import tiny_llama
model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
layers = [m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
assert layers and all(is_patched(m) for m in layers), layers
corda_kernels.unpatch_peft()
assert not any(is_patched(m) for m in layers)
print("ok", "peft" in sys.modules)
"""


@pytest.mark.parametrize("first", ["", "import peft"], ids=["peft-after", "peft-before"])
def test_import_order(first):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(first=first)], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok True")


_PLUGIN_TEST = """
from peft import LoraConfig, get_peft_model
from corda_kernels.integrations.peft_patch import is_patched
from corda_kernels.testing import tiny_llama


def test_layers_are_fused():
    for dora in (False, True):
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=dora))
        layers = [m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj")) and hasattr(m, "lora_A")]
        assert len(layers) == 4 and all(is_patched(m) for m in layers)
"""


def test_pytest_plugin_patches_and_counts(tmp_path):
    (tmp_path / "test_with_plugin.py").write_text(_PLUGIN_TEST)
    plugin_dir = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join([plugin_dir, ROOT, os.environ.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "peft_global_plugin", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "corda_kernels global PEFT patch: on" in out.stdout
    assert "4  LoRA layers fused" in out.stdout and "4  DoRA layers fused" in out.stdout, out.stdout[-2000:]


# ----------------------------------------------------------------------------------------------
# The embedded SmolLM2


@pytest.mark.slow
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_smollm2_agrees_with_peft(smollm2, init):
    from corda_kernels.integrations.loading import load_model

    base = load_model(*smollm2)[0]
    other = copy.deepcopy(base)

    def cfg():
        return LoraConfig(r=16, lora_alpha=16, target_modules=LLAMA, init_lora_weights=init)

    ref = get_peft_model(base, cfg())
    with ck.peft_patched():
        ours = get_peft_model(other, cfg())
    assert len(_lora_layers(ours)) == 210
    _compare(ours, ref, PRODUCT_TOL if init == "pissa" else EXACT_TOL)


@pytest.mark.slow
def test_smollm2_loftq_agrees_with_peft(smollm2):
    from corda_kernels.integrations.loading import load_model

    base = load_model(*smollm2)[0]
    targets = r"model\.layers\.([0-9]|1[0-4])\..*_proj"  # half the blocks: 105 projections
    ours, ref, originals = _loftq_pair(lambda: base, targets, 4, 1)
    assert len(_lora_layers(ours)) == 105
    _compare_loftq(ours, ref, originals, 0.0)


@pytest.mark.slow
def test_smollm2_eva_agrees_with_peft(smollm2):
    from corda_kernels.integrations.loading import load_model

    base = load_model(*smollm2)[0]
    # Four projections of the first two blocks (EVA cycles the batches until every layer converges:
    # all 210 layers, three times over, is tens of minutes on 2 cores).
    targets = r"model\.layers\.[01]\.self_attn\.(q_proj|v_proj)"
    ours, ref, oracle = _eva_pair(lambda: base, targets, _eva_batches(base.config.vocab_size, seq=32), r=16, tau=0.9)
    assert len(_lora_layers(ref)) > 0
    assert _compare_eva(ours, ref, oracle) <= EVA_TOL
