"""Bad input gets a clear error (or a CordaWarning users see), and a failed apply leaves the model as it was.

Every bad-input case and what it gets is the table in ``tests/BAD_INPUT.md``. ``test_case`` is
parametrized from it (one run per row; ``gets`` is ``Exception: text``, the text a literal part of
the message, or ``CordaWarning: text``), and every row must have a case function below
(``@case("id")``) and vice versa.
"""

import copy
import math
import os
import re

import pytest
import torch
from torch import nn

import corda_kernels as ck
from corda_kernels.decomposition import engine as decompose_module
from corda_kernels.testing import tiny_llama, tiny_t5, token_batches

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "BAD_INPUT.md")


def _table() -> list[tuple[str, str, str]]:
    with open(TABLE, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| case ")]
    return [tuple(cell.strip() for cell in line.strip("|").split(" | ")) for line in rows]


CASES = {}


PREPARED: list = []  # the running test's snapshot hook


def prepared(model):
    """Called by a case after it edited its model on purpose, before the call that must refuse."""
    for hook in PREPARED:
        hook(model)
    return model


def case(name):
    def register(fn):
        CASES[name] = fn
        return fn

    return register


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_llama(layers=1)
    return model, ck.calibrate(model, token_batches(128, n_batches=2), progress=False)


def _state(model):
    """Every tensor of the model (meta tensors by shape and dtype) and its module types by name."""
    tensors = {k: v if v.is_meta else v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    return {"tensors": tensors, "modules": {n: type(m) for n, m in model.named_modules()}}


def _same(a, b) -> bool:
    if a.is_meta or b.is_meta:
        return a.is_meta and b.is_meta and a.shape == b.shape and a.dtype == b.dtype
    if a.is_floating_point() and b.is_floating_point() and a.shape == b.shape:  # NaN where NaN was
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


def _unchanged(model, before):
    """The refused call changed nothing: the same modules and every tensor equal."""
    after = _state(model)
    assert after["modules"] == before["modules"]
    assert before["tensors"].keys() == after["tensors"].keys()
    assert all(_same(before["tensors"][k], after["tensors"][k]) for k in before["tensors"])


def test_every_row_has_a_case_and_every_case_a_row():
    ids = [row[0] for row in _table()]
    assert len(ids) == len(set(ids)), "duplicate case ids in the table"
    assert set(ids) == set(CASES), set(ids) ^ set(CASES)
    assert all(len(row) == 3 and ": " in row[2] for row in _table())
    root = os.path.dirname(os.path.dirname(TABLE))
    with open(TABLE, encoding="utf-8") as fh:
        references = re.findall(r"`(tests/\w+\.py)::(\w+)`", fh.read())
    assert references
    for path, test in references:  # the cases tested elsewhere exist
        with open(os.path.join(root, path), encoding="utf-8") as fh:
            assert f"def {test}(" in fh.read(), f"{path}::{test}"


@pytest.mark.parametrize("name, what, gets", _table(), ids=[row[0] for row in _table()])
def test_case(name, what, gets, calibrated, tmp_path):
    kind, text = gets.split(": ", 1)
    model, cal = calibrated
    model = copy.deepcopy(model)  # the case's own model, checked after the refusal
    if kind == "CordaWarning":
        with pytest.warns(ck.CordaWarning, match=re.escape(text)):
            CASES[name](model, cal, tmp_path)
        return
    expected = {"ValueError": ValueError, "TypeError": TypeError, "FloatingPointError": FloatingPointError}[kind]
    checked = {"model": model, "before": _state(model)}

    def snapshot(m):  # a case that edits its model first (a NaN weight, adapters) snapshots after its edit
        checked.update(model=m, before=_state(m))

    PREPARED[:] = [snapshot]
    try:
        with pytest.raises(expected, match=re.escape(text)):
            CASES[name](model, cal, tmp_path)
    finally:
        PREPARED.clear()
    _unchanged(checked["model"], checked["before"])


def _apply(model, method="pissa", **kw):
    return ck.apply(model, method, progress=False, **{"rank": 2, **kw})


def _layer():
    g = torch.Generator().manual_seed(0)
    w, A, B = (torch.randn(*s, generator=g) for s in ((6, 5), (2, 5), (6, 2)))
    return torch.randn(3, 5, generator=g), w, A, B


def _bad_batches(edit):
    batches = token_batches(128, n_batches=2)
    edit(batches)
    return batches


@case("rank_too_large")
def _(model, cal, tmp):
    _apply(model, "corda", rank=100, covariances=cal)


@case("rank_zero")
def _(model, cal, tmp):
    _apply(model, rank=0)


@case("rank_pattern_zero")
def _(model, cal, tmp):
    _apply(model, rank_pattern={"q_proj": 0})


@case("alpha_zero")
def _(model, cal, tmp):
    _apply(model, alpha=0)


@case("alpha_negative")
def _(model, cal, tmp):
    _apply(model, alpha=-8)


@case("alpha_nan")
def _(model, cal, tmp):
    _apply(model, alpha=math.nan)


@case("alpha_inf")
def _(model, cal, tmp):
    _apply(model, alpha=math.inf)


@case("alpha_string")
def _(model, cal, tmp):
    _apply(model, alpha="8")


@case("alpha_pattern_zero")
def _(model, cal, tmp):
    _apply(model, alpha=4, alpha_pattern={"v_proj": 0})


@case("alpha_blockwise")
def _(model, cal, tmp):
    ck.apply_blockwise(model, token_batches(128, n_batches=1), "pissa", rank=2, alpha=0, progress=False)


@case("alpha_decompose")
def _(model, cal, tmp):
    name = "model.layers.0.mlp.up_proj"
    from corda_kernels.methods import make_method

    ck.decompose({name: model.get_submodule(name)}, make_method("pissa"), ranks={name: 2}, alphas={name: math.nan})


@case("dropout_one")
def _(model, cal, tmp):
    _apply(model, dropout=1.0)


@case("dropout_nan_blockwise")
def _(model, cal, tmp):
    ck.apply_blockwise(model, token_batches(128, n_batches=1), "pissa", rank=2, dropout=math.nan, progress=False)


@case("op_scale_nan")
def _(model, cal, tmp):
    ck.lowrank_linear(*_layer(), scale=math.nan)


@case("op_scale_inf")
def _(model, cal, tmp):
    ck.lowrank_linear(*_layer(), scale=math.inf)


@case("op_scale_string")
def _(model, cal, tmp):
    ck.lowrank_linear(*_layer(), scale="1")


@case("op_dropout_nan")
def _(model, cal, tmp):
    ck.lowrank_linear(*_layer(), dropout=math.nan)


def _segmented(**changes):
    """``ck.lowrank_linear_segmented`` on 3 tokens, 3 stacked rank-2 adapters, with ``changes``."""
    g = torch.Generator().manual_seed(0)
    kw = dict(
        x=torch.randn(3, 5, generator=g),
        weight=torch.randn(6, 5, generator=g),
        A=torch.randn(3, 2, 5, generator=g),
        B=torch.randn(3, 6, 2, generator=g),
        adapter_index=torch.tensor([0, 2, -1]),
    )
    kw.update(changes)
    return ck.lowrank_linear_segmented(**kw)


def _lists(**changes):
    g = torch.Generator().manual_seed(0)
    lists = dict(
        A=[torch.randn(r, 5, generator=g) for r in (1, 2, 3)], B=[torch.randn(6, r, generator=g) for r in (1, 2, 3)]
    )
    for name, (i, tensor) in changes.items():
        lists[name][i] = tensor
    return lists


@case("seg_index_out_of_range")
def _(model, cal, tmp):
    _segmented(adapter_index=torch.tensor([0, 3, 1]))


@case("seg_index_wrong_shape")
def _(model, cal, tmp):
    _segmented(adapter_index=torch.tensor([0, 1]))


@case("seg_index_float")
def _(model, cal, tmp):
    _segmented(adapter_index=torch.tensor([0.0, 1.0, 2.0]))


@case("seg_mixed_dtypes")
def _(model, cal, tmp):
    _segmented(**_lists(A=(1, torch.randn(2, 5).half())))


@case("seg_mixed_devices")
def _(model, cal, tmp):
    _segmented(**_lists(B=(2, torch.randn(6, 3, device="meta"))))


@case("seg_factor_dtype")
def _(model, cal, tmp):
    _segmented(B=torch.randn(3, 6, 2).half())


@case("seg_scales_length")
def _(model, cal, tmp):
    _segmented(scales=[1.0, 2.0])


@case("seg_rank_mismatch")
def _(model, cal, tmp):
    _segmented(B=torch.randn(3, 6, 3))


@case("module_scale_nan")
def _(model, cal, tmp):
    ck.LowRankLinear(*_layer()[1:], scale=math.nan)


@case("module_dropout_negative")
def _(model, cal, tmp):
    ck.LowRankLinear(*_layer()[1:], dropout=-0.1)


@case("module_scale_set_inf")
def _(model, cal, tmp):
    ck.LowRankLinear(*_layer()[1:]).scale = math.inf


@case("module_dropout_set_one")
def _(model, cal, tmp):
    ck.LowRankLinear(*_layer()[1:]).dropout = 1.0


@case("dora_magnitude_shape")
def _(model, cal, tmp):
    ck.LowRankLinear(*_layer()[1:], magnitude=torch.ones(5))


@case("dora_magnitude_dtype")
def _(model, cal, tmp):
    ck.LowRankLinear(*_layer()[1:], magnitude=torch.ones(6, dtype=torch.float16))


@case("dora_magnitude_device")
def _(model, cal, tmp):
    ck.LowRankLinear(*_layer()[1:], magnitude=torch.ones(6, device="meta"))


@case("dora_magnitude_nan")
def _(model, cal, tmp):
    ck.dora_linear(*_layer(), torch.tensor([1.0, 1.0, math.nan, 1.0, 1.0, 1.0]))


@case("dora_module_diag")
def _(model, cal, tmp):
    ck.LowRankLinear(*_layer()[1:], diag=torch.ones(2), magnitude=torch.ones(6))


@case("dora_siva")
def _(model, cal, tmp):
    _apply(model, "siva", dora=True)


@case("dora_partial_lora")
def _(model, cal, tmp):
    _apply(model, "partial_lora", dora=True)


@case("dora_quantize")
def _(model, cal, tmp):
    _apply(model, dora=True, quantize="int8")


@case("dora_string")
def _(model, cal, tmp):
    _apply(model, dora="yes")


@case("unknown_method")
def _(model, cal, tmp):
    _apply(model, "cordaa", covariances=cal)


@case("unknown_mode")
def _(model, cal, tmp):
    _apply(model, "corda", mode="fast", covariances=cal)


@case("corda_without_covariances")
def _(model, cal, tmp):
    _apply(model, "corda")


@case("covariance_of_another_model")
def _(model, cal, tmp):
    _apply(tiny_llama(hidden=32, layers=1), "corda", covariances=cal)


def _one_covariance(cal, fill):
    name = "model.layers.0.mlp.down_proj"
    bad = dict(cal.per_module())
    bad[name] = fill(bad[name].clone())
    return name, bad


@case("nan_covariance")
def _(model, cal, tmp):
    name, bad = _one_covariance(cal, lambda c: c.index_fill_(0, torch.tensor([0]), math.nan))
    _apply(model, "corda", covariances=bad, target_modules=[name])


@case("zero_covariance")
def _(model, cal, tmp):
    name, bad = _one_covariance(cal, torch.zeros_like)
    _apply(model, "corda", covariances=bad, target_modules=[name])


@case("apply_adapted")
def _(model, cal, tmp):
    _apply(prepared(_apply(model)))


@case("apply_peft_model")
def _(model, cal, tmp):
    from peft import LoraConfig, get_peft_model

    _apply(prepared(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))))


def _qlora(model, tmp, quantization, layer=None):
    """``model`` saved and reloaded through bitsandbytes (``quantization``: BitsAndBytesConfig keywords),
    with LoRA on q_proj and v_proj; ``layer`` edits one of its LoRA layers before the snapshot."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model.save_pretrained(tmp / "base")
    config = BitsAndBytesConfig(**quantization)
    base = AutoModelForCausalLM.from_pretrained(tmp / "base", quantization_config=config, device_map="cpu")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    if layer is not None:
        layer(peft_model.base_model.model.model.layers[0].self_attn)
    return prepared(peft_model)


def _patch_refused(peft_model):
    """patch_peft, which must raise; and nothing may be patched then."""
    try:
        ck.patch_peft(peft_model)
    finally:
        assert not any(ck.integrations.peft_patch.is_patched(m) for m in peft_model.modules())


_NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}


@case("peft_bnb_unreadable_absmax")
def _(model, cal, tmp):
    def lose_a_block(attn):
        state = attn.q_proj.base_layer.weight.quant_state
        state.absmax = state.absmax[:-1]

    _patch_refused(_qlora(model, tmp, _NF4, lose_a_block))


@case("peft_bnb_int8_row_scales")
def _(model, cal, tmp):
    def half_scales(attn):
        weight = attn.v_proj.base_layer.weight
        weight.SCB = weight.SCB.half()

    _patch_refused(_qlora(model, tmp, {"load_in_8bit": True}, half_scales))


@case("peft_bnb_fp4")
def _(model, cal, tmp):
    _patch_refused(_qlora(model, tmp, {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}))


@case("peft_mixed_batch_length")
def _(model, cal, tmp):
    from peft import LoraConfig, get_peft_model

    peft_model = prepared(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])))
    ck.patch_peft(peft_model)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    layer(torch.randn(3, 4, 64), adapter_names=["default", "__base__"])


@case("calibrate_adapted")
def _(model, cal, tmp):
    ck.calibrate(prepared(_apply(model)), token_batches(128, n_batches=1), progress=False)


@case("tied_weights")
def _(model, cal, tmp):
    model.lm_head.weight = model.model.embed_tokens.weight
    _apply(prepared(model), target_modules=["lm_head"])


@case("int8_weights")
def _(model, cal, tmp):
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    _apply(prepared(model))


@case("targets_match_nothing")
def _(model, cal, tmp):
    _apply(model, target_modules=["gate_prj"])


@case("apply_meta_model")
def _(model, cal, tmp):
    _apply(prepared(model.to("meta")))


@case("calibrate_meta_model")
def _(model, cal, tmp):
    ck.calibrate(prepared(model.to("meta")), token_batches(128, n_batches=1), progress=False)


@case("apply_nan_weight")
def _(model, cal, tmp):
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 4] = math.nan
    _apply(prepared(model))


@case("calibrate_nan_weight")
def _(model, cal, tmp):
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = math.nan
    ck.calibrate(prepared(model), token_batches(128, n_batches=2), progress=False)


@case("checkpoint_every_zero")
def _(model, cal, tmp):
    ck.calibrate(model, token_batches(128), checkpoint_dir=str(tmp), checkpoint_every=0, progress=False)


def _short_mask(batches):
    batches[1]["attention_mask"] = batches[1]["attention_mask"][:, :-1]


@case("mask_wrong_shape")
def _(model, cal, tmp):
    ck.calibrate(model, _bad_batches(_short_mask), progress=False)


@case("blockwise_mask_wrong_shape")
def _(model, cal, tmp):
    ck.apply_blockwise(model, _bad_batches(_short_mask), "corda", rank=2, progress=False)


@case("empty_sequences")
def _(model, cal, tmp):
    def empty(batches):
        batches[1] = {k: v[:, :0] for k, v in batches[1].items()}

    ck.calibrate(model, _bad_batches(empty), progress=False)


@case("token_id_too_large")
def _(model, cal, tmp):
    ck.calibrate(model, _bad_batches(lambda b: b[1]["input_ids"].__setitem__((0, 2), 128)), progress=False)


@case("token_id_negative")
def _(model, cal, tmp):
    ck.calibrate(model, _bad_batches(lambda b: b[0]["input_ids"].__setitem__((1, 0), -1)), progress=False)


@case("float_input_ids")
def _(model, cal, tmp):
    batches = token_batches(128, n_batches=1)
    batches[0]["input_ids"] = batches[0]["input_ids"].float()
    ck.calibrate(model, batches, progress=False)


@case("uint8_input_ids")
def _(model, cal, tmp):
    batches = token_batches(128, n_batches=1)
    batches[0]["input_ids"] = batches[0]["input_ids"].to(torch.uint8)
    ck.calibrate(model, batches, progress=False)


@case("nan_attention_mask")
def _(model, cal, tmp):
    batches = token_batches(128, n_batches=2)
    batches[1]["attention_mask"] = batches[1]["attention_mask"].float()
    batches[1]["attention_mask"][0, 3] = math.nan
    ck.calibrate(model, batches, progress=False)


def _meta_batches():
    return [{k: v.to("meta") for k, v in b.items()} for b in token_batches(128, n_batches=1)]


@case("meta_batch")
def _(model, cal, tmp):
    ck.calibrate(model, _meta_batches(), progress=False)


@case("blockwise_meta_batch")
def _(model, cal, tmp):
    ck.apply_blockwise(model, _meta_batches(), "pissa", rank=2, progress=False)


@case("max_batches_negative")
def _(model, cal, tmp):
    ck.calibrate(model, token_batches(128), max_batches=-1, progress=False)


@case("max_batches_zero")
def _(model, cal, tmp):
    ck.calibrate(model, token_batches(128), max_batches=0, progress=False)


@case("max_batches_fraction")
def _(model, cal, tmp):
    ck.calibrate(model, token_batches(128), max_batches=1.5, progress=False)


@case("exclude_everything")
def _(model, cal, tmp):
    ck.calibrate(model, token_batches(128), exclude_modules=".*", progress=False)


@case("apply_exclude_everything")
def _(model, cal, tmp):
    _apply(model, target_modules=["q_proj"], exclude_modules=["q_proj"])


@case("batch_not_a_dict")
def _(model, cal, tmp):
    ck.calibrate(model, [torch.zeros(2, 4, dtype=torch.long)], progress=False)


@case("finalize_negative_count")
def _(model, cal, tmp):
    ck.finalize_covariance(torch.eye(3), -3)


@case("partial_lora_encoder_decoder")
def _(model, cal, tmp):
    t5 = tiny_t5()
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "decoder_input_ids": torch.ones(1, 4, dtype=torch.long)}
    ck.apply(t5, "partial_lora", rank=2, few_shot=[batch], progress=False)


@case("partial_lora_few_shot_oov")
def _(model, cal, tmp):
    batches = token_batches(128, n_batches=2)
    batches[1] = {"input_ids": torch.full((2, 5), 10_000)}
    _apply(model, "partial_lora", few_shot=batches)


@case("partial_lora_few_shot_empty")
def _(model, cal, tmp):
    _apply(model, "partial_lora", few_shot=[{"input_ids": torch.zeros(2, 0, dtype=torch.long)}])


def _quantized(model, iters, blockwise=False, **kw):
    if blockwise:
        return ck.apply_blockwise(
            model,
            token_batches(128, n_batches=1),
            "pissa",
            rank=2,
            quantize="int8",
            quantize_iters=iters,
            progress=False,
            **kw,
        )
    return _apply(model, quantize="int8", quantize_iters=iters, **kw)


@case("quantize_iters_string")
def _(model, cal, tmp):
    _quantized(model, "2")


@case("quantize_iters_none")
def _(model, cal, tmp):
    _quantized(model, None)


@case("quantize_iters_nan")
def _(model, cal, tmp):
    _quantized(model, math.nan)


@case("quantize_iters_fraction")
def _(model, cal, tmp):
    _quantized(model, 1.5)


@case("quantize_iters_half")
def _(model, cal, tmp):
    _quantized(model, 0.5, blockwise=True)


@case("quantize_iters_huge")
def _(model, cal, tmp):
    _quantized(model, 10**9)


@case("quantize_iters_negative")
def _(model, cal, tmp):
    _quantized(model, -1, blockwise=True)


@case("quantize_iters_bool")
def _(model, cal, tmp):
    _quantized(model, True)


@case("quantize_iters_without_quantize")
def _(model, cal, tmp):
    _apply(model, quantize_iters=2)


@case("blockwise_reconstruct_quantized")
def _(model, cal, tmp):
    _quantized(model, 0, blockwise=True, undo="reconstruct")


@case("unmaskable_layer_input")
def _(model, cal, tmp):
    layer = model.model.layers[0].mlp.down_proj
    layer.register_forward_pre_hook(lambda m, args: (args[0].flatten(0, 1),))  # (tokens, d), as routed experts get
    layer.register_forward_hook(lambda m, args, out: out.unflatten(0, (2, -1)))
    ck.calibrate(model, token_batches(128, n_batches=1), target_modules=["down_proj"], progress=False)


def test_failed_apply_leaves_the_model_as_it_was(calibrated, monkeypatch):
    model, cal = calibrated
    model = copy.deepcopy(model)
    before = _state(model)
    from corda_kernels import adapt

    real = adapt.build_module
    calls = {"n": 0}

    def flaky(module, init, dropout, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated failure while swapping")
        return real(module, init, dropout, *args, **kwargs)

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


def test_the_unchanged_check_catches_changes(calibrated):
    """The check every raising row runs: a changed weight, a swapped-in module or a NaN edit fail it."""
    model = copy.deepcopy(calibrated[0])
    before = _state(model)
    _unchanged(model, before)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(AssertionError):
        _unchanged(model, before)
    model = copy.deepcopy(calibrated[0])
    before = _state(model)
    _apply(model)
    with pytest.raises(AssertionError):
        _unchanged(model, before)


# several named adapters (tests/test_adapt_adapters.py covers the feature)


def _two(model):
    """``default`` (LoRA) and ``b`` (LoRA) on every layer."""
    _apply(model, "lora")
    return _apply(model, "lora", adapter_name="b")


@case("add_adapter_duplicate")
def _(model, cal, tmp):
    prepared(_apply(model, "lora", adapter_name="a"))
    _apply(model, "lora", adapter_name="a")


@case("add_adapter_bad_name")
def _(model, cal, tmp):
    prepared(_apply(model, "lora"))
    _apply(model, "lora", adapter_name="a.b")


@case("add_adapter_residual_without_initial")
def _(model, cal, tmp):
    prepared(_apply(model, "pissa"))
    _apply(model, "lora", adapter_name="b")


@case("add_adapter_other_targets")
def _(model, cal, tmp):
    prepared(_apply(model, "lora"))
    _apply(model, "lora", adapter_name="b", target_modules=["q_proj"])


@case("add_adapter_mixed_dtypes")
def _(model, cal, tmp):
    prepared(_apply(model.to(torch.bfloat16), "lora"))
    _apply(model, "lora", adapter_name="b", autocast_adapter_dtype=False)


@case("add_adapter_dora")
def _(model, cal, tmp):
    prepared(_apply(model, "lora"))
    _apply(model, "lora", adapter_name="b", dora=True)


@case("blockwise_add_adapter_without_initial")
def _(model, cal, tmp):
    prepared(_apply(model, "pissa"))
    ck.apply_blockwise(model, token_batches(128, n_batches=1), "lora", rank=2, adapter_name="b", progress=False)


@case("blockwise_add_adapter_quantize")
def _(model, cal, tmp):
    prepared(_apply(model, "lora"))
    batches = token_batches(128, n_batches=1)
    ck.apply_blockwise(model, batches, "lora", rank=2, adapter_name="b", quantize="int8", progress=False)


@case("blockwise_initial_without_adapters")
def _(model, cal, tmp):
    ck.apply_blockwise(model, token_batches(128, n_batches=1), "lora", rank=2, initial=str(tmp), progress=False)


@case("estimate_add_adapter_duplicate")
def _(model, cal, tmp):
    prepared(_apply(model, "lora"))
    ck.estimate_memory(model, "lora", rank=2, batch_size=1, seq_len=8, n_batches=1, adapter_name="default")


@case("estimate_add_adapter_without_initial")
def _(model, cal, tmp):
    prepared(_apply(model, "pissa"))
    ck.estimate_memory(model, "lora", rank=2, batch_size=1, seq_len=8, n_batches=1, adapter_name="b")


@case("rows_unknown_name")
def _(model, cal, tmp):
    with ck.adapter_rows(prepared(_two(model)), ["b", "zz"]):
        pass


@case("rows_index_out_of_range")
def _(model, cal, tmp):
    with ck.adapter_rows(prepared(_two(model)), torch.tensor([0, 2])):
        pass


@case("rows_index_dtype")
def _(model, cal, tmp):
    with ck.adapter_rows(prepared(_two(model)), torch.tensor([0.0, 1.0])):
        pass


@case("rows_wrong_batch")
def _(model, cal, tmp):
    with ck.adapter_rows(prepared(_two(model)), ["b", None]), torch.no_grad():
        model(input_ids=torch.zeros(3, 4, dtype=torch.long))


@case("set_adapter_unknown")
def _(model, cal, tmp):
    ck.set_adapter(prepared(_two(model)), "zz")


@case("merge_ambiguous")
def _(model, cal, tmp):
    _two(model)
    model.model.layers[0].mlp.up_proj.set_adapter("b")
    ck.merge(prepared(model))


@case("export_unknown_adapter")
def _(model, cal, tmp):
    ck.save_peft_adapter(prepared(_two(model)), str(tmp / "a"), adapter_name="zz")
