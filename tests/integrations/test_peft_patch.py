"""patch_peft: a PeftModel's LoRA Linear layers run on the fused op with PEFT's own parameters."""

import copy

import pytest
import torch

from corda_kernels.integrations import peft_patch
from corda_kernels.integrations.peft_patch import is_patched, patch_peft, unpatch_peft
from corda_kernels.ops.lowrank_linear import dropout_mask
from corda_kernels.testing import tiny_gpt2, tiny_llama, token_batches

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft_llama(dropout=0.0, **config):
    # init_lora_weights=False: A and B both random, so outputs and gradients are non-trivial.
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=dropout, init_lora_weights=False, **config)
    return get_peft_model(tiny_llama(), cfg)


@pytest.fixture(scope="module")
def batch():
    return token_batches(128, n_batches=1)[0]


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the patched layers' calls of the fused op (to tell the fused path from the fallback)."""
    calls = []
    op = peft_patch.fused

    def counting(*args):
        calls.append(args[-1].dropout)  # the call's Options: its dropout probability
        return op(*args)

    monkeypatch.setattr(peft_patch, "fused", counting)
    return calls


def _run(model, batch):
    """Logits and the gradients of a loss on every LoRA A/B weight."""
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits
    (logits.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return logits.detach(), grads


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=1e-6, rtol=1e-4, msg=name)


def test_same_outputs_and_gradients(batch, fused_calls):
    model = _peft_llama().eval()
    expected = _run(model, batch)
    keys = set(model.state_dict())
    names = patch_peft(model)
    assert len(names) == 14 and all(is_patched(model.get_submodule(n)) for n in names)
    assert set(model.state_dict()) == keys  # no new parameters or buffers
    _assert_same(_run(model, batch), expected)
    assert fused_calls == [0.0] * 14


def test_eval_mode_ignores_dropout(batch, fused_calls):
    model = _peft_llama(dropout=0.2).eval()
    expected = _run(model, batch)
    patch_peft(model)
    _assert_same(_run(model, batch), expected)
    model.train()
    model(**batch)
    assert fused_calls == [0.0] * 14 + [0.2] * 14


def test_training_dropout_replays_the_op_mask():
    """Train mode, p = 0.3: the patched layer equals PEFT's math with the op's own mask (same seed)."""
    p = 0.3
    layer = _peft_llama(dropout=p).base_model.model.model.layers[0].mlp.up_proj.train()
    patch_peft(layer)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    y = layer(x)
    y.square().sum().backward()
    got = (y.detach(), layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone())

    layer.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**31 - 1, ()))  # the op draws its seed from the default generator
    keep = dropout_mask(seed, 10, 64, p).reshape(2, 5, 64)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    ref = layer.base_layer(x) + B(A(x * keep / (1 - p))) * layer.scaling["default"]
    ref.square().sum().backward()
    torch.testing.assert_close(got[0], ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], A.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[2], B.weight.grad, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[0], layer.base_layer(x) + B(A(x)) * layer.scaling["default"])


def test_training_steps_match_unpatched(batch):
    def train(model):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            loss = model(**batch, labels=batch["input_ids"]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    reference = _peft_llama().train()
    patched = copy.deepcopy(reference)
    patch_peft(patched)
    expected, got = train(reference), train(patched)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_save_load_merge_disable_unpatch(batch, tmp_path, fused_calls):
    model = _peft_llama().eval()
    patch_peft(model)
    with torch.no_grad():
        logits = model(**batch).logits
        model.save_pretrained(tmp_path)
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
        torch.testing.assert_close(loaded(**batch).logits, logits, atol=1e-5, rtol=1e-5)
        patch_peft(loaded)
        torch.testing.assert_close(loaded(**batch).logits, logits, atol=1e-5, rtol=1e-5)
        assert len(fused_calls) == 28

        with model.disable_adapter():  # falls back to PEFT: the base model
            torch.testing.assert_close(model(**batch).logits, tiny_llama()(**batch).logits, atol=1e-5, rtol=1e-5)
        model.merge_adapter()  # merged: base layer only, no double counting
        torch.testing.assert_close(model(**batch).logits, logits, atol=1e-4, rtol=1e-4)
        model.unmerge_adapter()
        assert len(fused_calls) == 28  # disabled and merged adapters ran PEFT's own forward

        names = unpatch_peft(model)
        assert len(names) == 14 and not any(is_patched(model.get_submodule(n)) for n in names)
        assert all("forward" not in vars(model.get_submodule(n)) for n in names)
        torch.testing.assert_close(model(**batch).logits, logits, atol=1e-5, rtol=1e-5)
        assert len(fused_calls) == 28


def test_gpt2_conv1d_base(fused_calls):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    model = get_peft_model(tiny_gpt2(), cfg).eval()
    batch = token_batches(100, n_batches=1)[0]
    expected = _run(model, batch)
    patch_peft(model)
    _assert_same(_run(model, batch), expected)
    assert len(fused_calls) == 4


def test_fp32_adapters_on_bf16_base(batch, fused_calls):
    """PEFT keeps adapters in fp32 on a bf16 base; the patch casts them in the graph."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False)
    model = get_peft_model(tiny_llama(dtype=torch.bfloat16), cfg).eval()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    expected = model(**batch).logits.float()
    patch_peft(model)
    logits, grads = _run(model, batch)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected, atol=0.1, rtol=0.05)
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert len(fused_calls) == 14


@pytest.mark.filterwarnings("ignore:`lora_bias=True`")
@pytest.mark.parametrize(
    "setup, match",
    [
        ("kasa", r"variant KaSA \(KasaLinearVariant\) for adapter 'default'; .* not KaSA"),
        ("alora", r"variant aLoRA \(ALoraLinearVariant\)"),
        ("lora_bias", "lora_bias"),
        ("plain", r"LlamaForCausalLM has no PEFT LoRA layers to patch \(is it a LoRA PeftModel\?\)"),
    ],
)
def test_refused(setup, match):
    if setup == "kasa":
        model = _peft_llama(kasa_config={})
    elif setup == "alora":
        model = _peft_llama(alora_invocation_tokens=[1, 2], task_type="CAUSAL_LM")
    elif setup == "lora_bias":
        model = _peft_llama(lora_bias=True)
    else:
        model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        patch_peft(model)
    assert not any(is_patched(m) for m in model.modules())


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_patched_model_pickles_and_deepcopies(batch, tmp_path, fused_calls, how):
    """The patch survives torch.save/torch.load and deepcopy: the copy runs fused on its own weights."""
    model = _peft_llama().eval()
    patch_peft(model)
    with torch.no_grad():
        logits = model(**batch).logits
    if how == "torch.save":
        torch.save(model, tmp_path / "model.pt")
        copied = torch.load(tmp_path / "model.pt", weights_only=False)
    else:
        copied = copy.deepcopy(model)
    layers = [m for m in copied.modules() if is_patched(m)]
    assert len(layers) == 14 and all(m.forward.args[0] is m for m in layers)  # bound to the copy, not the original
    fused_calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(copied(**batch).logits, logits, atol=0, rtol=0)
        assert len(fused_calls) == 14
        layers[0].lora_B["default"].weight.zero_()  # the copy's weights are its own
        assert not torch.equal(copied(**batch).logits, model(**batch).logits)
    assert len(unpatch_peft(copied)) == 14


def test_cpu_bf16_autocast_runs_fused_and_matches_peft(batch, fused_calls):
    """fp32 model under CPU bf16 autocast: the patched model runs fused (no fallback) and gives PEFT's
    loss to bf16 tolerance and gradients as close to the fp32 ones as PEFT's own autocast run (flash
    rule: at most twice its error); the LoRA gradients stay fp32."""
    reference = _peft_llama().train()
    patched = copy.deepcopy(reference)
    patch_peft(patched)

    def loss_and_grads(model, autocast=True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        return loss.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    _, exact_grads = loss_and_grads(reference, autocast=False)
    expected, expected_grads = loss_and_grads(reference)
    assert fused_calls == []
    got, grads = loss_and_grads(patched)
    assert len(fused_calls) == 14
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=1e-2)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        exact = exact_grads[name]
        ours, peft_error = (grad - exact).norm(), (expected_grads[name] - exact).norm()
        assert ours <= 2 * peft_error + 1e-3 * exact.norm(), f"{name}: {ours:.2e} vs PEFT autocast {peft_error:.2e}"
