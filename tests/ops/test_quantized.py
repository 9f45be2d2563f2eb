"""Quantized residual (NF4 / int8 in bitsandbytes' formats): the reference dequantization against
bitsandbytes bit for bit, the op over a quantized base on every backend (Triton's in-kernel
dequantization bit for bit, its outputs and gradients against the dequantize-then-reference
specification), apply(quantize=...) and its LoftQ-style refinement."""

import pytest
import torch

import corda_kernels as ck
from corda_kernels.decomposition.refinement import Quantization, damped, quantize_residual, weighted_error
from corda_kernels.kernels.reference import dequantize as reference_quantized
from corda_kernels.kernels.reference import lowrank_linear as reference
from corda_kernels.ops.lowrank_linear import lowrank_linear
from corda_kernels.ops.quantized import QuantizedWeight, quantize_weight
from corda_kernels.testing import tiny_llama, token_batches

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbf  # noqa: E402

FORMATS = ["nf4", "int8"]


def _bnb_dequantized(W, fmt):
    if fmt == "int8":
        CB, SCB, _ = bnbf.int8_vectorwise_quant(W.clone())
        return bnbf.int8_vectorwise_dequant(CB, SCB).to(W.dtype)
    packed, state = bnbf.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 128), (3, 320), (200, 576)])
def test_reference_dequantize_is_bitsandbytes_bit_for_bit(fmt, dtype, shape):
    W = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    q = quantize_weight(W, fmt)
    assert q.dequantize().dtype == dtype
    assert torch.equal(q.dequantize(), _bnb_dequantized(W, fmt))
    assert (q.dequantize().float() - W.float()).abs().max() < 0.3 * W.float().abs().max()  # it is W, roughly
    if fmt == "nf4":  # dequantize() runs bitsandbytes' kernel on CPU: the pure-torch reference, bit for bit
        spec = reference_quantized.dequantize_nf4(
            q.packed, q.absmax_q, q.nested_absmax, q.offset, q.code, q.nested_code, q.shape, dtype
        )
        assert q._bitsandbytes_nf4() is not None and torch.equal(q.dequantize(), spec)
    else:  # dequantize() runs the reference's products in place: the reference, bit for bit
        assert torch.equal(q.dequantize(), reference_quantized.dequantize_int8(q.CB, q.SCB, dtype))


def test_refuses_bad_input():
    with pytest.raises(ValueError, match="layer up: nf4 needs in_features divisible by 64"):
        quantize_weight(torch.randn(8, 96), "nf4", "layer up")
    with pytest.raises(ValueError, match="quantize must be one of"):
        quantize_weight(torch.randn(8, 64), "nf3")
    quantize_weight(torch.randn(8, 96), "int8")  # row-wise int8 has no width constraint
    model = tiny_llama(intermediate=96)  # down_proj has in_features 96
    with pytest.raises(ValueError, match=r"down_proj: nf4 needs in_features"):
        ck.apply(model, "pissa", rank=4, quantize="nf4", progress=False)
    assert not any(isinstance(m, ck.LowRankLinear) for m in model.modules())  # untouched
    with pytest.raises(ValueError, match="quantize_iters"):
        ck.apply(model, "pissa", rank=4, quantize_iters=1, progress=False)


def _factors(fmt, dtype, out_f=40, in_f=128, r=6, rows=None, cols=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = quantize_weight((torch.randn(out_f, in_f, generator=g) * 0.1).to(dtype), fmt)
    A = (torch.randn(r, cols if cols else in_f, generator=g) * 0.1).to(dtype)
    B = (torch.randn(rows if rows else out_f, r, generator=g) * 0.1).to(dtype)
    row_index = torch.randperm(out_f, generator=g)[:rows] if rows else None
    col_index = torch.randperm(in_f, generator=g)[:cols] if cols else None
    return q, A, B, row_index, col_index


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dequantizes_tiles_bit_for_bit(fmt, dtype, force_backend):
    """x = I and B = 0 make y = Wᵀ exactly (one-hot products, fp32 sums of zeros), dy = I makes dx = W."""
    force_backend("triton")
    q, A, _, _, _ = _factors(fmt, dtype, out_f=72, in_f=192)
    B = torch.zeros(72, A.shape[0], dtype=dtype)
    x = torch.eye(192, dtype=dtype).requires_grad_()
    y = lowrank_linear(x, q, A, B)
    assert torch.equal(y, q.dequantize().T)
    x2 = torch.zeros(72, 192, dtype=dtype).requires_grad_()
    y2 = lowrank_linear(x2, q, A, B)
    y2.backward(torch.eye(72, dtype=dtype))
    assert torch.equal(x2.grad, q.dequantize())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("partial", [False, True])
def test_matches_dequantize_then_reference(backend, fmt, dtype, partial, force_backend):
    q, A, B, rows, cols = _factors(fmt, dtype, rows=24 if partial else None, cols=80 if partial else None)
    bias = torch.randn(q.shape[0], generator=torch.Generator().manual_seed(5)).to(dtype)
    diag = torch.rand(A.shape[0], generator=torch.Generator().manual_seed(6)).to(dtype) if partial else None
    x = torch.randn(3, 7, q.shape[1], generator=torch.Generator().manual_seed(7)).to(dtype)
    dy = torch.randn(3, 7, q.shape[0], generator=torch.Generator().manual_seed(8)).to(dtype)
    dropout = 0.2 if partial else 0.0
    kw = dict(scale=0.7, bias=bias, row_index=rows, col_index=cols, diag=diag, dropout=dropout, seed=11)

    def run(weight, name):
        force_backend(name)  # noqa: B023
        leaves = [t.clone().requires_grad_() for t in (x, A, B) + ((diag,) if diag is not None else ())]
        y = lowrank_linear(
            leaves[0], weight, leaves[1], leaves[2], **{**kw, "diag": leaves[3] if diag is not None else None}
        )
        y.backward(dy)
        return [y] + [t.grad for t in leaves]

    got = run(q, backend)
    # the specification: dequantize (bit-exact, in dtype), then the reference op, in fp64
    keep = reference.dropout_keep(11, 21, A.shape[1], dropout) if dropout else None
    leaves = [t.double().requires_grad_() for t in (x, A, B) + ((diag,) if diag is not None else ())]
    y = reference.lowrank_linear(
        leaves[0],
        q.dequantize().double(),
        leaves[1],
        leaves[2],
        scale=0.7,
        bias=bias.double(),
        row_index=rows,
        col_index=cols,
        diag=leaves[3] if diag is not None else None,
        keep=keep,
        dropout=dropout,
    )
    y.backward(dy.double())
    want = [y] + [t.grad for t in leaves]
    rtol = 2e-5 if dtype == torch.float32 else 4e-3
    for name, a, b in zip(["y", "x", "A", "B", "diag"], got, want):
        err = (a.double() - b).abs().max().item()
        assert err <= rtol * b.abs().max().item(), (name, err, b.abs().max().item())


def test_torch_path_is_the_dequantized_op_exactly(force_backend):
    force_backend("torch")
    q, A, B, _, _ = _factors("nf4", torch.float32)
    x = torch.randn(9, q.shape[1])
    assert torch.equal(lowrank_linear(x, q, A, B, scale=0.5), lowrank_linear(x, q.dequantize(), A, B, scale=0.5))


def _model_and_cal():
    model = tiny_llama(intermediate=128)
    cal = ck.calibrate(model, token_batches(128), progress=False)
    return model, cal


@pytest.mark.parametrize("fmt", FORMATS)
def test_apply_quantizes_the_residual_apply_would_keep(fmt):
    model, cal = _model_and_cal()
    ids = token_batches(128)[0]["input_ids"]
    plain = ck.apply(tiny_llama(intermediate=128), "corda", rank=8, covariances=cal, progress=False)
    quant = ck.apply(model, "corda", rank=8, covariances=cal, quantize=fmt, progress=False)
    layers = {n: m for n, m in quant.named_modules() if isinstance(m, ck.LowRankLinear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        ref = plain.get_submodule(name)
        assert isinstance(layer.weight, QuantizedWeight) and layer.weight.fmt == fmt
        assert torch.equal(layer.weight.dequantize(), _bnb_dequantized(ref.weight.detach(), fmt))
        assert torch.equal(layer.A, ref.A) and torch.equal(layer.B, ref.B)  # adapters in full precision
        assert layer.A.requires_grad and not any(p.requires_grad for p in layer.weight.parameters())
    y, y_ref = quant(ids).logits, plain(ids).logits
    assert (y - y_ref).abs().max() < (0.2 if fmt == "nf4" else 0.02) * y_ref.abs().max()
    quant(ids).logits.square().mean().backward()  # trains: gradients reach the adapters
    assert all(m.A.grad is not None and m.B.grad is not None for m in layers.values())
    with pytest.raises(ValueError, match="quantized"):
        next(iter(layers.values())).merge()
    linear = next(iter(layers.values())).to_linear()  # dequantized and merged
    assert linear.weight.dtype == torch.float32


@pytest.mark.parametrize("fmt", FORMATS)
def test_compile_fullgraph_on_a_quantized_base(fmt):
    """torch.compile (fullgraph, aot_eager) traces a model whose residuals are quantized (the
    dequantization and the registered op): outputs and adapter gradients equal eager's."""
    model, cal = _model_and_cal()
    quant = ck.apply(model, "corda", rank=8, covariances=cal, quantize=fmt, progress=False)
    ids = token_batches(128)[0]["input_ids"]
    layers = [m for m in quant.modules() if isinstance(m, ck.LowRankLinear)]
    results = []
    for run in (quant, torch.compile(quant, backend="aot_eager", fullgraph=True)):
        for m in layers:
            m.A.grad = m.B.grad = None
        logits = run(ids).logits
        logits.square().mean().backward()
        results.append((logits.detach(), [g for m in layers for g in (m.A.grad, m.B.grad)]))
    (y_eager, g_eager), (y_comp, g_comp) = results
    assert torch.equal(y_comp, y_eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


_CASTS = {
    "to_bf16": lambda m: m.to(torch.bfloat16),
    "half": lambda m: m.half(),
    "half_then_float": lambda m: m.half().float(),
    "to_cpu_bf16": lambda m: m.to("cpu", torch.bfloat16),
    "to_dtype_keyword": lambda m: m.to(dtype=torch.float16),
}


@pytest.mark.parametrize("cast", list(_CASTS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_model_dtype_casts_keep_the_codes_and_change_the_compute_dtype(fmt, cast):
    """model.to(torch.bfloat16) / .half() cast the quantized weight's fp32 statistics (NF4 absmax, code
    tables; int8 row scales) and left its dtype, so the next forward failed with "input dtype differs".
    The codes and statistics stay as they are; the weight dequantizes to the new dtype, and each
    layer's forward is dequantize-then-reference in that dtype."""
    model, cal = _model_and_cal()
    ck.apply(model, "corda", rank=8, covariances=cal, quantize=fmt, progress=False)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ck.LowRankLinear)}
    codes = {n: {k: v.clone() for k, v in m.weight.state_dict().items()} for n, m in layers.items()}
    model = _CASTS[cast](model)
    dtype = next(p.dtype for n, p in model.named_parameters() if n.endswith("embed_tokens.weight"))
    assert dtype != torch.float32 or cast == "half_then_float"
    g = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        assert layer.weight.dtype == dtype and layer.weight.dequantize().dtype == dtype, name
        state = layer.weight.state_dict()
        assert state.keys() == codes[name].keys()
        for key, value in codes[name].items():
            assert state[key].dtype == value.dtype and torch.equal(state[key], value), (name, key)
        x = torch.randn(2, 5, layer.in_features, generator=g).to(dtype)
        with torch.no_grad():
            expected = reference.lowrank_linear(
                x.double(), layer.weight.dequantize().double(), layer.A.double(), layer.B.double(), scale=layer.scale
            )
            got = layer(x)
        assert got.dtype == dtype
        tolerance = 2e-5 if dtype == torch.float32 else 2e-2
        assert (got.double() - expected).abs().max() <= tolerance * expected.abs().max(), name
    ids = token_batches(128)[0]["input_ids"]
    with torch.no_grad():
        assert model(ids).logits.dtype == dtype


def test_casting_the_codes_is_refused():
    """Module.type(dtype) casts integer tensors too: the codes would be lost, so it is refused (the
    weight is left as it was); float dtypes go through model.to(dtype)."""
    model, cal = _model_and_cal()
    ck.apply(model, "pissa", rank=4, quantize="nf4", progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    codes = {k: v.clone() for k, v in layer.weight.state_dict().items()}
    with pytest.raises(TypeError, match=r"a nf4 quantized weight \(64, 64\) keeps its codes: packed"):
        layer.type(torch.float16)
    assert all(torch.equal(layer.weight.state_dict()[k], v) for k, v in codes.items())
    assert layer.weight.dtype == torch.float32


def test_refinement_shows_progress(capsys):
    """quantize_iters ran without a word (10**9 iterations ran on silently): a progress bar counts
    layers x iterations, with the current error."""
    model, cal = _model_and_cal()
    ck.apply(model, "corda", rank=8, covariances=cal, quantize="int8", quantize_iters=2, progress=False)
    assert "refine" not in capsys.readouterr().err
    model, _ = _model_and_cal()
    ck.apply(model, "corda", rank=8, covariances=cal, quantize="int8", quantize_iters=2, progress=True)
    err = capsys.readouterr().err
    assert "refine quantized residuals" in err and "28/28" in err and "error=" in err


def test_refinement_error_never_increases_and_uses_corda_metric():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 128, generator=g) * 0.05
    X = torch.randn(512, 128, generator=g) * torch.linspace(0.1, 3, 128)
    C = damped(X.T @ X / 512, 0.01)
    U, S, Vh = torch.linalg.svd(W.double() @ C)
    A0 = (S[:8].sqrt()[:, None] * torch.linalg.solve(C, Vh[:8].T).T).float()
    B0 = (U[:, :8] * S[:8].sqrt()).float()
    prev = None
    for T in range(4):
        Q, A, B, errors = quantize_residual(W, A0, B0, 1.0, torch.float32, Quantization("nf4", T), C)
        got = weighted_error(W, Q.dequantize(), B.double() @ A.double(), C)
        assert got == pytest.approx(min(errors), rel=1e-6)  # the returned iterate is the best, in CorDA's metric
        assert prev is None or got <= prev + 1e-12
        prev = got
    assert errors[-1] < errors[0]  # refinement helps here
    # Frobenius metric without a covariance
    _, _, _, errs = quantize_residual(W, A0, B0, 1.0, torch.float32, Quantization("int8", 2))
    assert len(errs) == 3


def test_apply_with_quantize_iters_and_blockwise():
    model, cal = _model_and_cal()
    ck.apply(model, "corda", rank=8, covariances=cal, quantize="nf4", quantize_iters=2, progress=False)
    layers = [m for m in model.modules() if isinstance(m, ck.LowRankLinear)]
    for layer in layers:
        errs = layer.init_stats["quantization_errors"]
        assert len(errs) == 3 and min(errs) <= errs[0]
    blockwise = ck.apply_blockwise(
        tiny_llama(intermediate=128), token_batches(128), "pissa", rank=4, quantize="int8", progress=False
    )
    assert all(isinstance(m.weight, QuantizedWeight) for m in blockwise.modules() if isinstance(m, ck.LowRankLinear))


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_loads_quantized_in_transformers_and_peft(fmt, tmp_path):
    """save_residual_model writes a pre-quantized bitsandbytes checkpoint: transformers loads the same
    codes, and PEFT's adapter on it gives our outputs (NF4: to fp32 rounding; int8: bitsandbytes also
    quantizes the activations in eval, so only the weights are compared exactly)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model, cal = _model_and_cal()
    ck.apply(model, "corda", rank=8, covariances=cal, quantize=fmt, progress=False)
    ck.save_residual_model(model, str(tmp_path / "residual"))
    ck.save_peft_adapter(model, str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "residual"), dtype=torch.float32)
    for name, layer in model.named_modules():
        if not isinstance(layer, ck.LowRankLinear):
            continue
        loaded = base.get_submodule(name)
        if fmt == "nf4":
            assert isinstance(loaded, bnb.nn.Linear4bit)
            loaded.support_avx512bf16_for_cpu = False  # else an eval forward repacks the weight for bf16 kernels
            got = bnbf.dequantize_4bit(loaded.weight.data, loaded.weight.quant_state)
        else:
            assert isinstance(loaded, bnb.nn.Linear8bitLt)
            got = bnbf.int8_vectorwise_dequant(loaded.weight.data, loaded.weight.SCB)
        assert torch.equal(got, layer.weight.dequantize()), name
    assert type(base.lm_head) is torch.nn.Linear  # not quantized: it is not a target
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = token_batches(128)[0]["input_ids"]
    with torch.no_grad():
        want, got = model(ids).logits, adapted(ids).logits
    tol = 1e-5 if fmt == "nf4" else 0.05
    assert (got - want).abs().max() <= tol * want.abs().max()
    # dequantize=True: a plain full-precision checkpoint of the dequantized residual
    ck.save_residual_model(model, str(tmp_path / "plain"), dequantize=True)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "plain"), dtype=torch.float32)
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    assert torch.equal(plain.get_submodule("model.layers.1.mlp.down_proj").weight, layer.weight.dequantize())


def test_conversion_for_the_original_base_as_today(tmp_path):
    """The rank-2r conversion applies to the original full-precision weights: right after init it
    reproduces the original model, not the quantized one."""
    peft = pytest.importorskip("peft")
    model = tiny_llama(intermediate=128)
    ck.apply(model, "pissa", rank=8, quantize="nf4", progress=False)
    ck.save_peft_adapter(model, str(tmp_path / "initial"))
    ck.save_peft_adapter(model, str(tmp_path / "converted"), initial=str(tmp_path / "initial"))
    adapted = peft.PeftModel.from_pretrained(tiny_llama(intermediate=128), str(tmp_path / "converted")).eval()
    ids = token_batches(128)[0]["input_ids"]
    with torch.no_grad():
        want, got, quantized = tiny_llama(intermediate=128)(ids).logits, adapted(ids).logits, model(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (quantized - want).abs().max() > 100 * (got - want).abs().max()


@pytest.mark.parametrize("fmt", FORMATS)
def test_eager_training_keeps_no_full_precision_weight(fmt):
    """QLoRA's memory rule: the dequantized W is a per-pass temporary, never saved for backward."""
    q, A, B, _, _ = _factors(fmt, torch.float32, out_f=64, in_f=128)
    A, B = A.requires_grad_(), B.requires_grad_()
    x = torch.randn(300, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lowrank_linear(x, q, A, B)
    assert saved and not any(tuple(t.shape) in ((64, 128), (128, 64)) for t in saved)
    y.square().sum().backward()
    W = q.dequantize().double().requires_grad_(False)
    leaves = [t.detach().double().requires_grad_() for t in (x, A, B)]
    reference.lowrank_linear(leaves[0], W, leaves[1], leaves[2]).square().sum().backward()
    for got, want in zip((x.grad, A.grad, B.grad), (t.grad for t in leaves)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens,path", [(96, "in-kernel"), (200, "dequantize"), (200, "forced")])
def test_quantized_path_by_token_count(tokens, path, monkeypatch):
    """Where Triton runs, small token counts dequantize inside the GEMM; larger ones dequantize W once
    per pass and take the dense path (forcing the triton backend keeps the in-kernel path)."""
    from corda_kernels.ops import lowrank_linear as op

    if path == "forced":
        monkeypatch.setenv("CORDA_KERNELS_BACKEND", "triton")
    else:  # as on a GPU: Triton for calls with index sets, the torch composition for plain ones
        monkeypatch.setattr(op, "_backend_for", lambda x, plain=True: "torch" if plain else "triton")
    planned = []
    original = op._plan
    monkeypatch.setattr(op, "_plan", lambda *a: planned.append(original(*a)) or planned[-1])
    q, A, B, _, _ = _factors("nf4", torch.float32, out_f=48, in_f=128)
    x = torch.randn(tokens, 128)
    y = lowrank_linear(x, q, A, B)
    assert planned == [("triton", "in-kernel")] if path != "dequantize" else planned == [("torch", "dequantize")]
    torch.testing.assert_close(y, x @ q.dequantize().T + (x @ A.T) @ B.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_quantized_base(fmt):
    """The same registered op takes a quantized base (its storage tensors, kind and shape)."""
    from corda_kernels.ops import lowrank_linear as op

    q, A, B, _, _ = _factors(fmt, torch.float32, out_f=40, in_f=128)
    x = torch.randn(2, 3, 128, requires_grad=True)
    base, kind, shape = op._flatten_base(q)
    assert kind == (1 if fmt == "nf4" else 2) and shape == [40, 128]
    args = (x, base, kind, shape, A.requires_grad_(), B.requires_grad_(), *op.Options(scale=0.5))
    torch.library.opcheck(op._lowrank_linear_op, args)
