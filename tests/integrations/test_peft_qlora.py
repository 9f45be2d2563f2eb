"""patch_peft on QLoRA models: PEFT's bitsandbytes LoRA layers (NF4 with double quantization, int8)
run on the fused op, the base read in place from bitsandbytes' storage."""

import copy
import logging

import pytest
import torch

from corda_kernels.integrations import peft_patch
from corda_kernels.integrations.peft_patch import is_patched, patch_peft, unpatch_peft
from corda_kernels.testing import tiny_llama, token_batches

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(intermediate=128).save_pretrained(path)  # NF4 needs widths divisible by 64
    return path


@pytest.fixture(scope="module")
def batch():
    return token_batches(64, n_batches=1)[0]


def _qlora(base_dir, quant, targets=ALL, dtype=torch.float32, **lora):
    if quant == "nf4":
        config = BitsAndBytesConfig(**NF4, bnb_4bit_compute_dtype=dtype)
    elif quant == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(**quant)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=config, device_map="cpu", dtype=dtype)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **lora)
    return get_peft_model(model, cfg)


@pytest.fixture
def fused_calls(monkeypatch):
    """The quantized formats of the patched layers' fused-op calls ("dense" for a dense base)."""
    calls = []
    op = peft_patch.fused

    def counting(x, weight, *rest):
        calls.append(getattr(weight, "fmt", "dense"))
        return op(x, weight, *rest)

    monkeypatch.setattr(peft_patch, "fused", counting)
    return calls


def _run(model, batch):
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    return logits.detach(), grads


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_outputs_and_adapter_gradients_match_peft(base_dir, batch, fused_calls, quant):
    # Training mode: bitsandbytes' CPU int8 path is then x·dequant(W)ᵀ, as ours (eval mode quantizes x too).
    model = _qlora(base_dir, quant).train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[quant]
    expected = _run(model, batch)
    keys = set(model.state_dict())
    report = patch_peft(model)
    assert len(report) == 14 and report.left == [] and all(is_patched(model.get_submodule(n)) for n in report)
    assert set(model.state_dict()) == keys
    got = _run(model, batch)
    assert fused_calls == [quant] * 14
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-3, msg=name)
    assert len(unpatch_peft(model)) == 14


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_global_patch_fuses_qlora_layers_peft_builds(base_dir, batch, fused_calls, quant):
    """Under the global patch, the bitsandbytes LoRA layers get_peft_model builds run fused, with
    PEFT's outputs and adapter gradients."""
    import corda_kernels as ck

    torch.manual_seed(0)
    expected = _run(_qlora(base_dir, quant).train(), batch)
    with ck.peft_patched():
        torch.manual_seed(0)  # the same random LoRA factors
        model = _qlora(base_dir, quant).train()
        layers = [
            m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt") and hasattr(m, "lora_A")
        ]
        assert len(layers) == 14 and all(is_patched(m) for m in layers)
        got = _run(model, batch)
    assert fused_calls == [quant] * 14 and not any(is_patched(m) for m in layers)  # unpatched on leaving
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_layer_against_dequantize_then_matmul(base_dir, quant):
    """One patched layer against bitsandbytes' own dequantization followed by a matmul (eval mode)."""
    model = _qlora(base_dir, quant).eval()
    patch_peft(model)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    base = layer.base_layer
    if quant == "nf4":
        W = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    else:
        W = bnb.functional.int8_vectorwise_dequant(base.weight.data, base.weight.SCB).float()
    x = torch.randn(3, 5, W.shape[1])
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = x @ W.T + layer.scaling["default"] * (x @ A.T) @ B.T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-4)
    assert not getattr(base.weight.quant_state, "packing_format_for_cpu", False) if quant == "nf4" else True


def test_bf16_compute_dtype_fp32_adapters(base_dir, batch, fused_calls):
    """A bf16 QLoRA model (compute dtype bf16, PEFT's fp32 adapters): fused, close to PEFT's forward."""
    model = _qlora(base_dir, "nf4", dtype=torch.bfloat16).train()
    expected = model(**batch).logits.float()
    patch_peft(model)
    logits, grads = _run(model, batch)
    assert logits.dtype == torch.bfloat16 and fused_calls == ["nf4"] * 14
    torch.testing.assert_close(logits.float(), expected, atol=0.05, rtol=0.05)
    assert all(g.dtype == torch.float32 for g in grads.values())


def test_compute_dtype_other_than_input(base_dir, batch, fused_calls):
    """fp32 inputs on an fp32 model whose Linear4bit computes in bf16: bitsandbytes computes the base
    in bf16 and PEFT adds the LoRA term in fp32, which one fused call in one dtype would not: the
    patched layers run PEFT's forward (same results, bit for bit), and are fused again for inputs of
    the compute dtype."""
    model = _qlora(base_dir, "nf4")
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.compute_dtype = torch.bfloat16
    model.train()
    expected = _run(model, batch)
    patch_peft(model)
    got = _run(model, batch)
    assert got[0].dtype == torch.float32 and fused_calls == []
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    for name, grad in expected[1].items():
        torch.testing.assert_close(got[1][name], grad, rtol=0, atol=0, msg=name)


def test_skip_modules_mixed_dense_and_quantized(base_dir, batch, fused_calls, caplog):
    """llm_int8_skip_modules keeps some targets in full precision: both kinds are patched, and the
    report (also logged) says so."""
    config = dict(**NF4, llm_int8_skip_modules=["down_proj", "lm_head"])
    model = _qlora(base_dir, config).train()
    expected = _run(model, batch)
    with caplog.at_level(logging.INFO, logger="corda_kernels.integrations.peft_patch"):
        report = patch_peft(model)
    assert len(report) == 14 and report.left == []
    assert "14 of 14 LoRA layers run fused" in caplog.text
    got = _run(model, batch)
    assert sorted(fused_calls) == ["dense"] * 2 + ["nf4"] * 12
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)


def test_adapter_covering_some_layers(base_dir, batch, fused_calls):
    """An active adapter on only some layers: every LoRA layer is patched; the others run PEFT's forward
    (base only) while it is active, and the fused op again after switching back."""
    model = _qlora(base_dir, "nf4").train()
    model.add_adapter("q_only", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    model.set_adapter("q_only")
    expected = _run(model, batch)
    report = patch_peft(model)
    assert len(report) == 14
    got = _run(model, batch)
    assert fused_calls == ["nf4"] * 2
    torch.testing.assert_close(got[0], expected[0], atol=1e-4, rtol=1e-4)
    model.set_adapter("default")
    fused_calls.clear()
    model(**batch)
    assert fused_calls == ["nf4"] * 14


@pytest.mark.parametrize(
    "config, match",
    [
        (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), r"Linear4bit base is 4-bit fp4; the fused op reads nf4"),
        (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), r"has no double quantization"),
    ],
)
def test_refused_by_name(base_dir, config, match):
    model = _qlora(base_dir, config)
    with pytest.raises(ValueError, match=r"layer base_model\.model\.model\.layers\.0\.self_attn\.q_proj's .*" + match):
        patch_peft(model)
    assert not any(is_patched(m) for m in model.modules())


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_dora_on_a_quantized_base_is_refused_by_name(base_dir, quant):
    model = _qlora(base_dir, quant, use_dora=True)
    with pytest.raises(ValueError, match=r"layer \S+q_proj uses DoRA for adapter 'default' on a bitsandbytes base"):
        patch_peft(model)
    assert not any(is_patched(m) for m in model.modules())


def test_nf4_width_not_divisible_by_64_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path)  # intermediate 96: down_proj reads rows of 96
    model = _qlora(tmp_path, "nf4")
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj's .* in_features=96, not divisible by 64"):
        patch_peft(model)
    assert not any(is_patched(m) for m in model.modules())


def test_weight_repacked_for_cpu_inference_is_refused(base_dir, batch):
    """bitsandbytes repacks a Linear4bit's weight for its CPU kernel on an eval forward without
    gradients (on CPUs with AVX512-BF16); a model in that state is refused by name."""
    model = _qlora(base_dir, "nf4").eval()
    with torch.no_grad():
        model(**batch)
    state = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    with pytest.raises(ValueError, match="CPU inference layout"):
        patch_peft(model)


def test_patched_qlora_deepcopies(base_dir, batch, fused_calls):
    model = _qlora(base_dir, "int8").train()
    patch_peft(model)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(copied(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    assert fused_calls == ["int8"] * 28


def test_hf_trainer_bf16_checkpointing_save_resume(base_dir, tmp_path, fused_calls, monkeypatch):
    """A patched QLoRA model trains with the HF Trainer (bf16 autocast, gradient checkpointing),
    saves checkpoints, and a resumed run ends on the same adapter weights as an uninterrupted one."""
    from peft import prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments

    autocast = []
    op = peft_patch.fused

    def recording(*args):
        autocast.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return op(*args)

    monkeypatch.setattr(peft_patch, "fused", recording)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (8, 16))]

    def trainer(out, steps):
        model = prepare_model_for_kbit_training(
            AutoModelForCausalLM.from_pretrained(
                base_dir, quantization_config=BitsAndBytesConfig(**NF4), device_map="cpu", dtype=torch.float32
            )
        )
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.0, init_lora_weights=False)
        model = get_peft_model(model, cfg)
        assert len(patch_peft(model)) == 14
        args = TrainingArguments(
            output_dir=str(out),
            max_steps=steps,
            per_device_train_batch_size=2,
            learning_rate=1e-2,
            bf16=True,
            use_cpu=True,
            gradient_checkpointing=True,
            save_steps=2,
            logging_steps=1,
            report_to=[],
            seed=0,
            data_seed=0,
            dataloader_num_workers=0,
        )
        return model, Trainer(model=model, args=args, train_dataset=data)

    full, run = trainer(tmp_path / "full", 4)
    run.train()
    losses = [log["loss"] for log in run.state.log_history if "loss" in log]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert len(autocast) >= 4 * 14 and set(autocast) == {torch.bfloat16}  # fused, under bf16 autocast
    assert full.base_model.model.is_gradient_checkpointing
    assert (tmp_path / "full" / "checkpoint-2" / "adapter_model.safetensors").exists()
    resumed, rerun = trainer(tmp_path / "resumed", 4)
    rerun.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    want = {n: p for n, p in full.named_parameters() if "lora_" in n}
    got = {n: p for n, p in resumed.named_parameters() if "lora_" in n}
    assert want.keys() == got.keys() and want
    for name, p in want.items():
        torch.testing.assert_close(got[name], p, atol=1e-5, rtol=1e-4, msg=name)
    initial = dict(trainer(tmp_path / "initial", 4)[0].named_parameters())
    assert not all(torch.equal(initial[name], p) for name, p in want.items())  # training moved the adapters


def _dequantize_then_matmul(model):
    """Keep bitsandbytes' eval forward on its dequantize-then-matmul path: no bf16 CPU kernel for NF4,
    no int8 activations for int8 (its training-mode CPU path; the rest of the model stays in eval)."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
        elif isinstance(m, bnb.nn.Linear8bitLt):
            m.train()
    return model


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_mixed_batch_and_disabled_adapters_on_a_quantized_base(base_dir, batch, monkeypatch, quant):
    """Serving: a mixed batch (adapter_names) over a bitsandbytes base runs the segmented op on the base
    dequantized for the call, per row as PEFT; rows and calls without adapters are computed from the
    storage too, so bitsandbytes never repacks the NF4 weight."""
    model = _qlora(base_dir, quant)
    model.add_adapter(
        "other", LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
    )
    model.eval()
    reference = _dequantize_then_matmul(copy.deepcopy(model))
    seg_calls = []
    seg = peft_patch.segmented.fused
    monkeypatch.setattr(peft_patch.segmented, "fused", lambda *a: seg_calls.append(1) or seg(*a))
    patch_peft(model)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    names = ["other", "__base__", "default", "other"]
    with torch.no_grad():
        want = reference(ids, adapter_names=names).logits
        got = model(ids, adapter_names=names).logits
        assert len(seg_calls) == 14  # every layer: "default" is on all 14, "other" on 4
        for row in range(4):
            torch.testing.assert_close(got[row], want[row], atol=1e-4, rtol=1e-4, msg=f"row {row}")
        with reference.disable_adapter():
            base = reference(ids).logits
        seg_calls.clear()
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, base, atol=1e-4, rtol=1e-4)
        assert seg_calls == []
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
