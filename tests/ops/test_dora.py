"""dora_linear (fused DoRA) against an fp64 oracle that forms ``W + s·B·A`` densely, on every
backend here (Triton through the interpreter in fp32 / fp16; it cannot run bf16), with
near-cancelling rows, zero rows of W and full rank; the registered op (opcheck); a bf16 autocast
training step; PEFT's DoRA layer (outputs and gradients).

Tolerances as in tests/test_lowrank_linear.py: fp32 results agree normwise to ``FP32_RTOL``
(``max|err| <= rtol * max|expected|``: a wrong row of the norm or a wrong index is off by O(1)
there); 16-bit results within twice the error of the plain same-dtype composition (PEFT's).
"""

import math

import pytest
import torch
from torch.nn import functional as F

import corda_kernels as ck
from corda_kernels.ops import dora as dora_ops

BACKENDS = ["reference", "torch", "triton"]
NAMES = ("x", "A", "B", "magnitude", "bias")
FP32_RTOL = 2e-5


def make_inputs(out_f=29, in_f=37, r=5, lead=(3, 7), seed=0, scale=0.75):
    """fp64 tensors: W, A, B of unit-ish size, B nonzero (so the norm differs from ‖W‖), and a
    magnitude near the norm (as after training)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    W = randn(out_f, in_f) / math.sqrt(in_f)
    A = randn(r, in_f) / math.sqrt(in_f)
    B = randn(out_f, r) / math.sqrt(r)
    n = torch.linalg.vector_norm(W + scale * B @ A, dim=1)
    magnitude = n * (1.0 + 0.3 * randn(out_f))
    return dict(x=randn(*lead, in_f), weight=W, A=A, B=B, magnitude=magnitude, bias=randn(out_f)), scale


def oracle(x, weight, A, B, magnitude, bias, scale):
    """fp64 DoRA as PEFT writes it: the dense adapted weight, its row norms detached."""
    adapted = weight + scale * B @ A
    n = torch.linalg.vector_norm(adapted, dim=1).detach()
    y = (magnitude / n) * (x @ weight.T + scale * (x @ A.T) @ B.T)
    return y if bias is None else y + bias


def run(tensors, scale, *, dtype, impl="op", factor_dtype=None, grads=NAMES, device="cpu"):
    """Forward + backward; ``{"y": y, name: grad}``. ``impl``: "op", "oracle" (fp64, inputs rounded
    as the op rounds them) or "plain" (the oracle's products in ``dtype``: PEFT's precision)."""
    factor_dtype = factor_dtype or dtype
    leaves = {}
    for k, v in tensors.items():
        if v is None:
            continue
        dt = factor_dtype if k in ("A", "B", "magnitude") else dtype
        if impl == "oracle":
            v = v.to(dt).to(dtype).double() if k in ("A", "B") else v.to(dt).double()
        elif impl == "plain" and k in ("A", "B", "magnitude"):
            v = v.to(dt).to(dtype)
        else:
            v = v.to(dt)
        leaves[k] = v.detach().to(device).requires_grad_(k in grads)
    x, w, A, B, m, bias = (leaves.get(k) for k in ("x", "weight", "A", "B", "magnitude", "bias"))
    if impl == "op":
        y = ck.dora_linear(x, w, A, B, m, scale=scale, bias=bias)
    else:
        y = oracle(x, w, A, B, m, bias, scale)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(device, y.dtype)
    wrt = [k for k in NAMES if k in leaves and k in grads]
    out = {"y": y.detach()}
    out.update(zip(wrt, torch.autograd.grad(y, [leaves[k] for k in wrt], dy)))
    return out


def max_rel_err(actual, expected):
    if expected.numel() == 0:
        return 0.0
    scale = max(expected.abs().max().item(), 1e-30)
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item() / scale


def assert_matches(got, expected, rtol):
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k].shape == expected[k].shape, k
        assert torch.isfinite(got[k]).all(), k
        err = max_rel_err(got[k], expected[k])
        assert err <= rtol, f"{k}: relative error {err:.2e} > {rtol:.0e}"


SHAPES = {
    "small": dict(),
    "2-D x, bigger r": dict(out_f=33, in_f=20, r=12, lead=(11,)),
    "r = min(out, in)": dict(out_f=18, in_f=24, r=18, lead=(9,)),
    "r = in < out": dict(out_f=24, in_f=10, r=10, lead=(2, 3)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_matches_fp64_oracle(backend, shape, force_backend):
    force_backend(backend)
    tensors, scale = make_inputs(**SHAPES[shape])
    got = run(tensors, scale, dtype=torch.float32)
    assert_matches(got, run(tensors, scale, dtype=torch.float32, impl="oracle"), FP32_RTOL)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fp64_is_exact(backend, force_backend):
    force_backend(backend)
    tensors, scale = make_inputs(out_f=20, in_f=16, r=16, lead=(5,))
    assert_matches(
        run(tensors, scale, dtype=torch.float64), run(tensors, scale, dtype=torch.float64, impl="oracle"), 1e-12
    )


@pytest.mark.parametrize(
    "backend,dtype",
    [("reference", torch.float16), ("torch", torch.float16), ("triton", torch.float16), ("torch", torch.bfloat16)],
)
@pytest.mark.parametrize("factor_dtype", ["same", "fp32"])
def test_half_precision_within_twice_plain(backend, dtype, factor_dtype, force_backend):
    """16-bit x / W (factors in that dtype or fp32): error against the fp64 oracle at most twice the
    plain same-dtype composition's (plus a few ulps), every output and gradient."""
    force_backend(backend)
    tensors, scale = make_inputs(out_f=40, in_f=48, r=8, lead=(24,))
    fdt = torch.float32 if factor_dtype == "fp32" else dtype
    got = run(tensors, scale, dtype=dtype, factor_dtype=fdt)
    plain = run(tensors, scale, dtype=dtype, factor_dtype=fdt, impl="plain")
    want = run(tensors, scale, dtype=dtype, factor_dtype=fdt, impl="oracle")
    ulp = torch.finfo(dtype).eps
    for k in want:
        assert got[k].dtype == (fdt if k in ("A", "B", "magnitude") else dtype), k
        bound = 2 * max_rel_err(plain[k], want[k]) + 4 * ulp
        assert max_rel_err(got[k], want[k]) <= bound, (k, max_rel_err(got[k], want[k]), bound)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("factor_dtype", ["same", "fp32"])
def test_gpu_matches_oracle(backend, dtype, factor_dtype, force_backend, cuda_device):
    """Real Triton (bf16 included) and the torch path on CUDA, at a shape spanning several tiles."""
    force_backend(backend)
    tensors, scale = make_inputs(out_f=200, in_f=320, r=24, lead=(3, 500))
    fdt = torch.float32 if factor_dtype == "fp32" else dtype
    kw = dict(dtype=dtype, factor_dtype=fdt, device=cuda_device)
    got = run(tensors, scale, **kw)
    want = run(tensors, scale, impl="oracle", **kw)
    if dtype == torch.float32:
        assert_matches(got, want, FP32_RTOL)
        return
    plain = run(tensors, scale, impl="plain", **kw)
    for k in want:
        ours, yardstick = max_rel_err(got[k], want[k]), max_rel_err(plain[k], want[k])
        assert ours <= 2 * yardstick + 4 * torch.finfo(dtype).eps, f"{k}: {ours:.2e} vs plain {yardstick:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_near_cancelling_rows(backend, force_backend):
    """Rows where s·B·A cancels W_o to 1e-3 and 1e-6 of its size: the closed form alone loses every
    digit there; the guard recomputes those rows, so each row's norm has fp32 relative accuracy."""
    force_backend(backend)
    tensors, scale = make_inputs(out_f=12, in_f=16, r=16, lead=(4,))
    W, A, B = tensors["weight"], tensors["A"], tensors["B"]
    # A square and invertible: choose B's rows 0..3 so that s·B_o·A = -(1 - eps)·W_o
    Ainv = torch.linalg.inv(A)
    for o, eps in enumerate((1e-2, 1e-3, 1e-6, 0.0)):
        B[o] = -(1 - eps) * (W[o] @ Ainv) / scale
    W32, A32, B32 = (t.float() for t in (W, A, B))
    n = dora_ops.weight_norm(W32, A32, B32, scale=scale)
    exact = torch.linalg.vector_norm(W32.double() + scale * B32.double() @ A32.double(), dim=1)
    assert n.dtype == torch.float32
    rel = (n.double() - exact).abs() / exact.clamp_min(1e-300)
    assert (rel[:2] < 1e-4).all(), rel  # the closed form alone: ~1e-1 off on row 1
    # at 1e-6 the fp32 product B·A itself carries the error: within twice PEFT's dense fp32 norm's
    plain = torch.linalg.vector_norm(W32 + scale * B32 @ A32, dim=1)
    plain_rel = (plain.double() - exact).abs() / exact
    assert rel[2] <= 2 * plain_rel[2] + 1e-4, (rel[2], plain_rel[2])
    assert n[3] < 1e-5 * exact[4:].min()  # exact cancellation: zero up to fp32 rounding of B, A


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows(backend, force_backend):
    """A zero row of W with a nonzero B row (norm = s·‖B_o·A‖) matches the oracle; a row zero in W
    and B (adapted row exactly zero, n = 0) outputs the bias, finite gradients (PEFT: NaN)."""
    force_backend(backend)
    tensors, scale = make_inputs(out_f=10, in_f=12, r=3, lead=(6,))
    tensors["weight"][2] = 0.0
    got = run(tensors, scale, dtype=torch.float32)
    assert_matches(got, run(tensors, scale, dtype=torch.float32, impl="oracle"), FP32_RTOL)
    tensors["weight"][5] = 0.0
    tensors["B"][5] = 0.0
    got = run(tensors, scale, dtype=torch.float32)
    for k, v in got.items():
        assert torch.isfinite(v).all(), k
    torch.testing.assert_close(got["y"][..., 5], tensors["bias"][5].float().expand(6), rtol=0, atol=0)
    assert got["magnitude"][5] == 0
    tensors["B"][5, 0] = 1e-3  # nonzero again: row 5 back in the oracle's domain
    assert_matches(
        run(tensors, scale, dtype=torch.float32), run(tensors, scale, dtype=torch.float32, impl="oracle"), FP32_RTOL
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_requested_gradients(backend, force_backend):
    """Frozen A (asymmetric) / frozen magnitude: the rest still matches; no bias gradient without bias."""
    force_backend(backend)
    tensors, scale = make_inputs()
    tensors["bias"] = None
    for grads in (("x", "B"), ("magnitude",), ("A",)):
        got = run(tensors, scale, dtype=torch.float32, grads=grads)
        want = run(tensors, scale, dtype=torch.float32, impl="oracle", grads=grads)
        assert_matches(got, want, FP32_RTOL)


def test_weight_sq_cache_is_used(force_backend):
    """A cached ‖W_o‖² enters the norm (a wrong cache changes the output); the right one changes nothing."""
    force_backend("torch")
    tensors, scale = make_inputs()
    t = {k: v.float() for k, v in tensors.items()}
    args = (t["x"], t["weight"], t["A"], t["B"], t["magnitude"])
    y = ck.dora_linear(*args, scale=scale, bias=t["bias"])
    sq = dora_ops.weight_sq_norm(t["weight"])
    torch.testing.assert_close(ck.dora_linear(*args, scale=scale, bias=t["bias"], weight_sq=sq), y)
    assert not torch.allclose(ck.dora_linear(*args, scale=scale, bias=t["bias"], weight_sq=sq * 2), y)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, force_backend):
    """The registered op (schema, fake kernel, autograd registration), with and without bias / cache."""
    force_backend(backend)
    tensors, scale = make_inputs(out_f=10, in_f=12, r=3, lead=(2, 5))
    t = {k: v.float().requires_grad_(k in NAMES) for k, v in tensors.items()}
    args = (t["x"], t["weight"], t["A"], t["B"], t["magnitude"], scale, t["bias"], None)
    torch.library.opcheck(dora_ops._dora_op, args)
    sq = dora_ops.weight_sq_norm(t["weight"])
    t2 = {k: v.detach().requires_grad_(k in ("B", "magnitude")) for k, v in t.items()}
    torch.library.opcheck(
        dora_ops._dora_op, (t2["x"], t2["weight"], t2["A"], t2["B"], t2["magnitude"], scale, None, sq)
    )


def test_compile_fullgraph_aot_eager(force_backend):
    force_backend("torch")
    tensors, scale = make_inputs(lead=(6,))
    t = {k: v.float().requires_grad_(k in NAMES) for k, v in tensors.items()}

    def f(x, A, B, m):
        return ck.dora_linear(x, t["weight"], A, B, m, scale=scale, bias=t["bias"])

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    y = compiled(t["x"], t["A"], t["B"], t["magnitude"])
    torch.testing.assert_close(y, f(t["x"], t["A"], t["B"], t["magnitude"]))
    grads = torch.autograd.grad(y.sum(), (t["A"], t["B"], t["magnitude"]))
    want = torch.autograd.grad(f(t["x"], t["A"], t["B"], t["magnitude"]).sum(), (t["A"], t["B"], t["magnitude"]))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


def test_autocast_bf16_training_step_fp32_factors():
    """CPU bf16 autocast, bf16 base, fp32 A / B / magnitude: fp32 gradients within bf16 accuracy of
    the fp64 oracle, and one SGD step lowers the loss."""
    tensors, scale = make_inputs(out_f=32, in_f=48, r=8, lead=(16,))
    W = tensors["weight"].to(torch.bfloat16)
    bias = tensors["bias"].to(torch.bfloat16)
    A, B, m = (tensors[k].float().requires_grad_() for k in ("A", "B", "magnitude"))
    x = tensors["x"].float()
    target = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))

    def loss_fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ck.dora_linear(x, W, A, B, m, scale=scale, bias=bias)
            assert y.dtype == torch.bfloat16
        return F.mse_loss(y.float(), target)

    loss = loss_fn()
    loss.backward()
    for p in (A, B, m):
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    ref = {k: v.detach().clone().requires_grad_() for k, v in dict(A=A, B=B, m=m).items()}
    y64 = oracle(
        x.to(torch.bfloat16).double(),
        W.double(),
        ref["A"].double(),
        ref["B"].double(),
        ref["m"].double(),
        bias.double(),
        scale,
    )
    F.mse_loss(y64, target.double()).backward()
    for k, p in dict(A=A, B=B, m=m).items():
        assert max_rel_err(p.grad, ref[k].grad) < 3e-2, k
    with torch.no_grad():
        for p in (A, B, m):
            p -= 0.5 * p.grad
    assert loss_fn() < loss


# ---------------------------------------------------------------------------------------------
# PEFT's DoRA layer


def _peft_dora_model(out_f=24, in_f=32, r=4, alpha=8, bias=True, seed=0, dtype=torch.float32):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    base = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=bias, dtype=dtype))
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], use_dora=True, init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    return model, model.base_model.model[0]


def test_peft_agreement_forward_and_gradients():
    """dora_linear on a PEFT DoRA layer's own tensors (B nonzero, magnitude moved off the norm)
    reproduces PEFT's forward to fp32 rounding, and equal gradients for x, A, B and magnitude."""
    model, layer = _peft_dora_model()
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.linspace(0.5, 1.5, 24))
    x = torch.randn(5, 32, requires_grad=True)
    y_peft = model(x)
    dy = torch.randn_like(y_peft)
    params = [
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_magnitude_vector["default"].weight,
    ]
    want = torch.autograd.grad(y_peft, [x, *params], dy)
    A, B, m = (p.detach().clone().requires_grad_() for p in params)
    x2 = x.detach().clone().requires_grad_()
    base = layer.base_layer
    y = ck.dora_linear(x2, base.weight.detach(), A, B, m, scale=layer.scaling["default"], bias=base.bias.detach())
    assert max_rel_err(y, y_peft) <= FP32_RTOL
    got = torch.autograd.grad(y, [x2, A, B, m], dy)
    for name, a, b in zip(("x", "A", "B", "magnitude"), got, want):
        assert max_rel_err(a, b) <= FP32_RTOL, name


# ---------------------------------------------------------------------------------------------
# the layer, apply(dora=True), merge / unload


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _train_a_little(model, steps=2):
    from corda_kernels.testing import token_batches

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5)
    for batch in token_batches(128, n_batches=steps, seed=7):
        ids = batch["input_ids"]
        loss = model(input_ids=ids, attention_mask=batch["attention_mask"], labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_layer_enable_dora_reproduces_and_trains_the_magnitude():
    tensors, scale = make_inputs(out_f=16, in_f=20, r=4, lead=(6,))
    t = {k: v.float() for k, v in tensors.items()}
    layer = ck.LowRankLinear(t["weight"], t["A"], t["B"], bias=t["bias"], scale=scale)
    y_lora = layer(t["x"])
    layer.enable_dora()
    assert layer.dora and layer.magnitude.requires_grad and layer.magnitude.dtype == torch.float32
    torch.testing.assert_close(layer.magnitude, torch.linalg.vector_norm(t["weight"] + scale * t["B"] @ t["A"], dim=1))
    torch.testing.assert_close(layer(t["x"]), y_lora, rtol=1e-6, atol=1e-6)  # m / n = 1 at init
    with torch.no_grad():
        layer.magnitude.mul_(torch.linspace(0.5, 2.0, 16))
    want = oracle(
        t["x"].double(), *(tensors[k] for k in ("weight", "A", "B")), layer.magnitude.double(), tensors["bias"], scale
    )
    assert max_rel_err(layer(t["x"]).detach(), want) <= FP32_RTOL
    layer(t["x"]).sum().backward()
    assert layer.magnitude.grad is not None and layer.A.grad is not None and layer.weight.grad is None
    # the cached ‖W‖² follows in-place changes of the weight
    with torch.no_grad():
        layer.weight.mul_(2.0)
    want = oracle(
        t["x"].double(),
        2 * tensors["weight"],
        tensors["A"],
        tensors["B"],
        layer.magnitude.double(),
        tensors["bias"],
        scale,
    )
    assert max_rel_err(layer(t["x"]).detach(), want) <= FP32_RTOL
    # merge folds m / n into the weight; unmerge restores it
    before, w0 = layer(t["x"]).detach(), layer.weight.detach().clone()
    layer.merge()
    assert max_rel_err(layer(t["x"]).detach(), before) <= FP32_RTOL
    torch.testing.assert_close(layer.to_linear()(t["x"]), layer(t["x"]))
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-5, atol=1e-6)
    assert max_rel_err(layer(t["x"]).detach(), before) <= FP32_RTOL


def test_layer_dropout_follows_peft():
    """In training mode with dropout the layer is PEFT's DoRA on the dropped-out input (same mask)."""
    tensors, scale = make_inputs(out_f=12, in_f=10, r=3, lead=(5,))
    t = {k: v.float() for k, v in tensors.items()}
    m = t["magnitude"]
    layer = ck.LowRankLinear(t["weight"], t["A"], t["B"], bias=t["bias"], scale=scale, magnitude=m, dropout=0.3).train()
    torch.manual_seed(5)
    y = layer(t["x"])
    torch.manual_seed(5)
    xd = F.dropout(t["x"], 0.3, training=True)
    f = m / torch.linalg.vector_norm(t["weight"] + scale * t["B"] @ t["A"], dim=1)
    want = (
        F.linear(t["x"], t["weight"], t["bias"])
        + (f - 1) * (xd @ t["weight"].T)
        + f * (scale * (xd @ t["A"].T) @ t["B"].T)
    )
    assert max_rel_err(y.detach(), want) <= FP32_RTOL
    layer.eval()
    assert (
        max_rel_err(layer(t["x"]).detach(), oracle(t["x"], t["weight"], t["A"], t["B"], m, t["bias"], scale))
        <= FP32_RTOL
    )


@pytest.mark.parametrize("method", ["lora", "pissa", "milora", "asymmetric", "corda"])
def test_apply_dora_reproduces_the_model_then_trains_and_merges(method):
    from corda_kernels.testing import tiny_llama, token_batches

    batch = token_batches(128, n_batches=1)[0]
    original = tiny_llama()
    want = _logits(original, batch)
    options = {}
    if method == "corda":
        options["covariances"] = ck.calibrate(tiny_llama(), token_batches(128, n_batches=2), progress=False)
    model = ck.apply(tiny_llama(), method, rank=4, dora=True, progress=False, **options)
    layers = [m for m in model.modules() if isinstance(m, ck.LowRankLinear)]
    assert layers and all(m.dora and m.magnitude.requires_grad for m in layers)
    torch.testing.assert_close(_logits(model, batch), want, rtol=1e-4, atol=1e-4)
    _train_a_little(model)
    assert any(not torch.allclose(m.magnitude, m.dora_norm()) for m in layers)
    trained = _logits(model, batch)
    assert not torch.allclose(trained, want, atol=1e-3)
    torch.testing.assert_close(_logits(ck.merge(model), batch), trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method, option", [("siva", "siva"), ("partial_lora", "partial_lora")])
def test_dora_refused_for_siva_and_partial_lora(method, option):
    with pytest.raises(ValueError, match=f"dora=True is not defined for method '{option}'"):
        ck.AdaptConfig(method=method, dora=True)


def test_dora_config_round_trips():
    import json

    config = ck.AdaptConfig(method="pissa", rank=4, dora=True)
    assert json.loads(json.dumps(config.to_dict()))["dora"] is True
    assert ck.AdaptConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TypeError, match="dora must be True or False, got str 'yes'"):
        ck.AdaptConfig(dora="yes")


# ---------------------------------------------------------------------------------------------
# patch_peft on PEFT's DoRA layers, save_peft_adapter in PEFT's DoRA format

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_dora_llama(dropout=0.0, dtype=torch.float32):
    peft = pytest.importorskip("peft")
    from corda_kernels.testing import tiny_llama

    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=ALL, lora_dropout=dropout, init_lora_weights=False, use_dora=True
    )
    model = peft.get_peft_model(tiny_llama().to(dtype), cfg)
    with torch.no_grad():  # magnitude off the norm, as after training
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.linspace(0.7, 1.3, p.numel(), dtype=p.dtype))
    return model


def _run_lm(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    assert any("lora_magnitude_vector" in n for n in grads)
    return logits.detach(), grads


@pytest.fixture
def dora_calls(monkeypatch):
    """Counts the patched layers' calls of the fused DoRA op."""
    from corda_kernels.integrations import peft_patch

    calls = []
    op = peft_patch.dora.fused

    def counting(*args):
        calls.append(1)
        return op(*args)

    monkeypatch.setattr(peft_patch.dora, "fused", counting)
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_patch_peft_runs_dora_fused_with_peft_outputs_and_gradients(dropout, dora_calls):
    """Every DoRA layer runs fused; logits within fp32 rounding of PEFT's, every LoRA and magnitude
    gradient equal (training mode; with dropout the same mask, from PEFT's own module)."""
    from corda_kernels.testing import token_batches

    batch = token_batches(128, n_batches=1)[0]
    model = _peft_dora_llama(dropout).train()
    torch.manual_seed(0)
    want = _run_lm(model, batch)
    names = ck.patch_peft(model)
    assert len(names) == 14
    torch.manual_seed(0)
    got = _run_lm(model, batch)
    assert len(dora_calls) == 14
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], atol=1e-6, rtol=1e-4, msg=name)
    # merged adapters fall back to PEFT's forward (which holds m / n in the weight)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        model.merge_adapter()
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-5, rtol=1e-5)


def test_patch_peft_dora_bf16_autocast():
    """bf16 base, fp32 factors (PEFT's autocast_adapter_dtype): fused under CPU autocast within bf16
    accuracy of PEFT's, fp32 gradients."""
    from corda_kernels.testing import token_batches

    batch = token_batches(128, n_batches=1)[0]
    model = _peft_dora_llama(dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(**batch).logits.float()
        ck.patch_peft(model)
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), want, atol=0.1, rtol=0.05)
    logits.float().square().mean().backward()
    mags = [p for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert mags and all(p.grad is not None and p.grad.dtype == torch.float32 for p in mags)


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_save_peft_adapter_dora_loads_in_peft_with_same_outputs(method, tmp_path):
    """save_peft_adapter writes PEFT's DoRA format (use_dora, lora_magnitude_vector) that
    PeftModel.from_pretrained loads on the residual base with the same logits, after training."""
    peft = pytest.importorskip("peft")
    import json

    from corda_kernels.testing import tiny_llama, token_batches

    batch = token_batches(128, n_batches=1)[0]
    model = ck.apply(tiny_llama(), method, rank=4, dora=True, progress=False)
    _train_a_little(model)
    want = _logits(model, batch)
    ck.save_peft_adapter(model, str(tmp_path / "adapter"), residual_model=str(tmp_path / "residual"))
    ck.save_residual_model(model, str(tmp_path / "residual"))
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert config["use_dora"] is True
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum("lora_magnitude_vector" in k for k in keys) == 14
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(tmp_path / "residual"))
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(loaded, batch), want, rtol=1e-4, atol=1e-4)


def test_save_peft_adapter_dora_initial_conversion_applies_to_the_original(tmp_path):
    """PiSSA + DoRA converted with initial=: PEFT loads it on the original weights, same logits."""
    peft = pytest.importorskip("peft")
    from corda_kernels.testing import tiny_llama, token_batches

    batch = token_batches(128, n_batches=1)[0]
    model = ck.apply(tiny_llama(), "pissa", rank=4, dora=True, progress=False)
    ck.save_peft_adapter(model, str(tmp_path / "initial"))
    _train_a_little(model)
    want = _logits(model, batch)
    ck.save_peft_adapter(model, str(tmp_path / "converted"), initial=str(tmp_path / "initial"))
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "converted")).eval()
    torch.testing.assert_close(_logits(loaded, batch), want, rtol=1e-4, atol=1e-4)


def test_no_out_by_in_temporary_in_a_training_step():
    """A DoRA training step (forward + backward, x, A, B, magnitude trainable) creates no tensor of
    out × in elements or more (every op's outputs recorded); PEFT's step creates at least two."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = torch.utils._pytree.tree_leaves((args, kwargs))
            seen = {a.untyped_storage().data_ptr() for a in inputs if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):  # views of inputs allocate nothing
                if isinstance(t, torch.Tensor) and t.numel() >= LIMIT and t.untyped_storage().data_ptr() not in seen:
                    self.big.append((str(func), tuple(t.shape)))
            return out

    out_f, in_f, r, n = 64, 48, 4, 8
    LIMIT = out_f * in_f
    tensors, scale = make_inputs(out_f=out_f, in_f=in_f, r=r, lead=(n,))
    t = {k: v.float() for k, v in tensors.items()}
    layer = ck.LowRankLinear(t["weight"], t["A"], t["B"], bias=t["bias"], scale=scale).enable_dora()
    x = t["x"].requires_grad_()
    layer(x)  # the first call caches ‖W_o‖² (a reduction over W: an (out,) result)
    with Largest() as mode:
        layer(x).square().sum().backward()
    assert layer.magnitude.grad is not None and layer.A.grad is not None
    assert mode.big == [], mode.big
    model, peft_layer = _peft_dora_model(out_f=out_f, in_f=in_f, r=r)
    with Largest() as mode:
        model(x).square().sum().backward()
    assert len(mode.big) >= 2, mode.big  # the detector sees PEFT's dense W + s·B·A


def test_apply_blockwise_dora_reproduces_the_model():
    from corda_kernels.testing import tiny_llama, token_batches

    batch = token_batches(128, n_batches=1)[0]
    want = _logits(tiny_llama(), batch)
    config = ck.AdaptConfig(method="pissa", rank=4, dora=True, target_modules=["q_proj", "down_proj"])
    model = ck.apply_blockwise(tiny_llama(), token_batches(128, n_batches=2), config, progress=False)
    layers = [m for m in model.modules() if isinstance(m, ck.LowRankLinear)]
    assert len(layers) == 4 and all(m.dora for m in layers)
    torch.testing.assert_close(_logits(model, batch), want, rtol=1e-4, atol=1e-4)


def test_dora_layer_compiles_fullgraph():
    tensors, scale = make_inputs(out_f=16, in_f=20, r=4, lead=(3,))
    t = {k: v.float() for k, v in tensors.items()}
    layer = ck.LowRankLinear(t["weight"], t["A"], t["B"], bias=t["bias"], scale=scale, magnitude=t["magnitude"])
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(t["x"])
    torch.testing.assert_close(y, layer(t["x"]))
    y.square().sum().backward()
    grads = [p.grad.clone() for p in (layer.A, layer.B, layer.magnitude)]
    layer.zero_grad()
    layer(t["x"]).square().sum().backward()
    for a, b in zip(grads, (layer.A.grad, layer.B.grad, layer.magnitude.grad)):
        torch.testing.assert_close(a, b)
