"""Bad input to apply()/decompose gets a clear error, and a failed apply leaves the model as it was."""

import copy

import pytest
import torch
from torch import nn

import corda_kernels as ck
from corda_kernels.decomposition import engine as decompose_module
from corda_kernels.testing import tiny_llama, token_batches


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_llama(layers=1)
    return model, ck.calibrate(model, token_batches(128, n_batches=2), progress=False)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, ck.LowRankLinear) for m in model.modules())


def test_rank_errors(calibrated):
    model, cal = calibrated
    with pytest.raises(
        ValueError, match=r"rank 100 exceeds layer model\.layers\.0\.self_attn\.q_proj's smaller dimension \(64x64\)"
    ):
        ck.apply(copy.deepcopy(model), "corda", rank=100, covariances=cal, progress=False)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        ck.apply(copy.deepcopy(model), "pissa", rank=0, progress=False)


def test_unknown_method_and_mode(calibrated):
    model, cal = calibrated
    with pytest.raises(ValueError, match="unknown method 'cordaa'"):
        ck.apply(copy.deepcopy(model), "cordaa", covariances=cal, progress=False)
    with pytest.raises(ValueError, match="'ipa' .* or 'kpa'"):
        ck.apply(copy.deepcopy(model), "corda", mode="fast", covariances=cal, progress=False)
    with pytest.raises(ValueError, match="needs input covariances"):
        ck.apply(copy.deepcopy(model), "corda", progress=False)


def test_covariance_of_another_model(calibrated):
    _, cal = calibrated
    other = tiny_llama(hidden=32, layers=1)
    with pytest.raises(ValueError, match="collected on another model"):
        ck.apply(other, "corda", rank=2, covariances=cal, progress=False)


def test_non_finite_or_singular_covariance(calibrated):
    model, cal = calibrated
    name = "model.layers.0.mlp.down_proj"
    bad = dict(cal.per_module())
    bad[name] = bad[name].clone()
    bad[name][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"down_proj\): C .* holds NaN or Inf"):
        ck.apply(copy.deepcopy(model), "corda", rank=2, covariances=bad, target_modules=[name], progress=False)
    bad[name] = torch.zeros_like(bad[name])
    with pytest.raises(ValueError, match="no calibration data reached it"):
        ck.apply(copy.deepcopy(model), "corda", rank=2, covariances=bad, target_modules=[name], progress=False)


def test_already_adapted_models_are_refused(calibrated):
    model, cal = calibrated
    adapted = ck.apply(copy.deepcopy(model), "pissa", rank=2, progress=False)
    with pytest.raises(ValueError, match="already carries corda_kernels adapters"):
        ck.apply(adapted, "pissa", rank=2, progress=False)
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already carries PEFT LoRA layers"):
        ck.apply(peft_model, "pissa", rank=2, progress=False)


def test_tied_weights_are_refused():
    model = tiny_llama(layers=1)
    model.lm_head.weight = model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="lm_head's weight is tied to model.embed_tokens.weight"):
        ck.apply(model, "pissa", rank=2, target_modules=["lm_head"], progress=False)


def test_non_float_weights_are_refused():
    model = tiny_llama(layers=1)
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"layer model\.layers\.0\.mlp\.up_proj .* dtype torch\.int8.*Dequantize"):
        ck.apply(model, "pissa", rank=2, progress=False)


def test_targets_that_match_nothing(calibrated):
    model, _ = calibrated
    with pytest.raises(ValueError, match=r"matched no .* close names: \['gate_proj'"):
        ck.apply(copy.deepcopy(model), "pissa", rank=2, target_modules=["gate_prj"], progress=False)


def test_failed_apply_leaves_the_model_as_it_was(calibrated, monkeypatch):
    model, cal = calibrated
    model = copy.deepcopy(model)
    before = _state(model)
    from corda_kernels import adapt

    real = adapt.build_module
    calls = {"n": 0}

    def flaky(module, init, *options):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated failure while swapping")
        return real(module, init, *options)

    monkeypatch.setattr(adapt, "build_module", flaky)
    with pytest.raises(RuntimeError, match="simulated failure"):
        ck.apply(model, "corda", rank=2, covariances=cal, progress=False)
    _unchanged(model, before)


def test_out_of_memory_retries_smaller_chunks_then_names_the_layer(calibrated, monkeypatch):
    model, cal = calibrated
    seen = []
    real = decompose_module._run_chunk

    def tight_memory(targets, method, names, *args):
        seen.append(len(names))
        if len(names) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(targets, method, names, *args)

    monkeypatch.setattr(decompose_module, "_run_chunk", tight_memory)
    adapted = ck.apply(copy.deepcopy(model), "corda", rank=2, covariances=cal, progress=False)
    assert max(seen) > 1 and seen[-1] == 1
    assert sum(isinstance(m, ck.LowRankLinear) for m in adapted.modules()) == 7

    def no_memory(targets, method, names, *args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(decompose_module, "_run_chunk", no_memory)
    fresh = copy.deepcopy(model)
    before = _state(fresh)
    with pytest.raises(RuntimeError, match=r"out of memory decomposing layer model\.layers\.0\..* even on its own"):
        ck.apply(fresh, "corda", rank=2, covariances=cal, progress=False)
    _unchanged(fresh, before)
