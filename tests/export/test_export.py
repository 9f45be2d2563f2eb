"""Exported adapters say what they apply to: ``adapter_config.json``'s ``base_model_name_or_path``
names the residual model (or, with ``initial=``, the original), so PEFT's ``AutoPeftModel`` loads
them onto the right weights and reproduces the adapted model."""

import json

import pytest
import torch

import corda_kernels as ck
from corda_kernels.testing import tiny_llama, token_batches


@pytest.fixture
def original(tmp_path):
    tiny_llama(layers=1).save_pretrained(tmp_path / "original")
    return str(tmp_path / "original")


def _load(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).eval()


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _train_a_little(model):
    """Move the adapters away from their init (otherwise the residual and the original agree)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ck.LowRankLinear):
                m.A.add_(0.1 * torch.randn(m.A.shape, generator=g))
                m.B.add_(0.1 * torch.randn(m.B.shape, generator=g))


def _base_of(adapter):
    with open(f"{adapter}/adapter_config.json") as fh:
        return json.load(fh)["base_model_name_or_path"]


def test_adapter_names_the_residual_model_and_auto_peft_reproduces(original, tmp_path):
    from peft import AutoPeftModelForCausalLM

    model = ck.apply(_load(original), "pissa", rank=4, progress=False)
    _train_a_little(model)
    batch = token_batches(128, n_batches=1)[0]
    residual, adapter = str(tmp_path / "residual"), str(tmp_path / "adapter")
    ck.save_residual_model(model, residual)
    ck.save_peft_adapter(model, adapter, residual_model=residual)
    assert _base_of(adapter) == residual
    loaded = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=1e-4, atol=1e-5)


def test_default_never_names_the_original_for_a_residual_adapter(original, tmp_path):
    model = ck.apply(_load(original), "pissa", rank=4, progress=False)
    ck.save_peft_adapter(model, str(tmp_path / "a"))
    base = _base_of(tmp_path / "a")
    assert base != original and "residual model of" in base and original in base
    with open(tmp_path / "a" / "corda_kernels.json") as fh:
        info = json.load(fh)
    assert info["original_model"] == original and info["applies_to"] == "residual base"
    # LoRA leaves the base weights as they were: the original is the right base
    lora = ck.apply(_load(original), "lora", rank=4, progress=False)
    ck.save_peft_adapter(lora, str(tmp_path / "b"))
    assert _base_of(tmp_path / "b") == original


def test_initial_conversion_names_the_original_and_auto_peft_reproduces(original, tmp_path):
    from peft import AutoPeftModelForCausalLM

    model = ck.apply(_load(original), "pissa", rank=4, progress=False)
    ck.save_peft_adapter(model, str(tmp_path / "initial"))
    _train_a_little(model)
    ck.save_peft_adapter(model, str(tmp_path / "converted"), initial=str(tmp_path / "initial"))
    assert _base_of(tmp_path / "converted") == original
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "converted")).eval()
    batch = token_batches(128, n_batches=1)[0]
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=1e-4, atol=1e-5)


def test_mixed_dropouts_are_reported(original, tmp_path):
    model = ck.apply(_load(original), "lora", rank=2, progress=False, dropout=0.1)
    model.model.layers[0].self_attn.q_proj.dropout = 0.3
    with pytest.warns(ck.CordaWarning, match=r"dropouts \[0.1, 0.3\].*lora_dropout=0.3"):
        ck.save_peft_adapter(model, str(tmp_path / "a"))
    with open(tmp_path / "a" / "adapter_config.json") as fh:
        assert json.load(fh)["lora_dropout"] == 0.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["ipa", "kpa", "blockwise"])
def test_corda_model_saves_with_save_pretrained_and_safetensors(how, dtype, tmp_path):
    """CorDA's A was stored as a transposed view (stride (1, r)): save_pretrained (transformers'
    tied-weight check views tensors flat) and safetensors refused it, so the Trainer recipe died at
    its first checkpoint. Every stored tensor is contiguous and both saves round-trip exactly."""
    from safetensors.torch import load_file, save_file

    model = tiny_llama(layers=1, dtype=dtype)
    batches = token_batches(128, n_batches=2)
    if how == "blockwise":
        ck.apply_blockwise(model, batches, "corda", rank=4, progress=False)
    else:
        ck.apply(
            model, "corda", mode=how, rank=4, covariances=ck.calibrate(model, batches, progress=False), progress=False
        )
    state = model.state_dict()
    assert all(t.is_contiguous() for t in state.values()), [k for k, t in state.items() if not t.is_contiguous()]
    assert len({t.untyped_storage().data_ptr() for t in state.values()}) == len(state)  # no layer shares a storage
    save_file(state, tmp_path / "state.safetensors")
    loaded = load_file(tmp_path / "state.safetensors")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert all(torch.equal(saved[k], state[k]) for k in saved)
