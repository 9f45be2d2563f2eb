"""patch_peft with many adapters: mixed batches (PEFT's adapter_names=) on the segmented op, several
active adapters summed in one call, adapters covering some layers, the patch report."""

import copy

import pytest
import torch

from corda_kernels.integrations import peft_patch
from corda_kernels.integrations.peft_patch import PatchReport, Unpatched, is_patched, patch_layer, patch_peft
from corda_kernels.testing import tiny_llama

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = {"a": 2, "b": 8, "c": 4}


def _many(dtype=torch.float32, embedding=False):
    """A tiny Llama with LoRA adapters "a", "b", "c" of ranks 2/8/4 and different scalings ("c" on
    q_proj and v_proj only)."""
    targets = ALL + (["embed_tokens"] if embedding else [])
    model = get_peft_model(
        tiny_llama(dtype=dtype),
        LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False),
        adapter_name="a",
    )
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=4, target_modules=ALL, init_lora_weights=False))
    model.add_adapter("c", LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return model.eval()


@pytest.fixture
def calls(monkeypatch):
    """Which fused entry each patched layer called: "single" (lowrank_linear) or "segmented"."""
    seen = []
    single, seg = peft_patch.fused, peft_patch.segmented.fused

    def counting_single(*args):
        seen.append("single")
        return single(*args)

    def counting_segmented(*args):
        seen.append("segmented")
        return seg(*args)

    monkeypatch.setattr(peft_patch, "fused", counting_single)
    monkeypatch.setattr(peft_patch.segmented, "fused", counting_segmented)
    return seen


IDS = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "names",
    [
        ["b", "a", "__base__", "c", "a", "b"],  # any order, repeated, no adapter
        ["c", "c", "c", "c", "c", "c"],  # all rows one adapter (on 2 of 7 layers)
        ["__base__"] * 5 + ["a"],
        ["a", "b", "a", "b", "a", "b"],
    ],
)
def test_mixed_batch_matches_peft_per_row(names, calls):
    model = _many()
    with torch.no_grad():
        expected = model(IDS, adapter_names=names).logits
        alone = [model(IDS[i : i + 1], adapter_names=[n]).logits for i, n in enumerate(names)]
    patch_peft(model)
    with torch.no_grad():
        got = model(IDS, adapter_names=names).logits
    assert calls and set(calls) == {"segmented"}
    for row, name in enumerate(names):
        torch.testing.assert_close(got[row], expected[row], atol=1e-5, rtol=1e-5, msg=f"row {row} ({name})")
        torch.testing.assert_close(got[row : row + 1], alone[row], atol=1e-5, rtol=1e-5)
    calls.clear()
    with torch.no_grad():  # the packed factors are reused, and follow an update of a factor
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["a"].weight.mul_(3)
        unpatched = copy.deepcopy(model)
        peft_patch.unpatch_peft(unpatched)
        torch.testing.assert_close(
            model(IDS, adapter_names=names).logits, unpatched(IDS, adapter_names=names).logits, atol=1e-5, rtol=1e-5
        )


def test_mixed_batch_gradients_match_peft(calls):
    names = ["b", "a", "__base__", "b", "a", "a"]
    reference = _many()
    model = copy.deepcopy(reference)
    patch_peft(model)
    for m in (reference, model):
        for n, p in m.named_parameters():
            p.requires_grad_("lora_" in n)
        m(IDS, adapter_names=names).logits.square().mean().backward()
    assert set(calls) == {"segmented"}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and any(".a.weight" in n for n in got) and any(".b.weight" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-4, msg=name)


def test_mixed_batch_bad_names_raise_peft_errors():
    model = _many()
    patch_peft(model)
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        model(IDS, adapter_names=["a", "b"])


@pytest.mark.parametrize("active", [["a", "b"], ["a", "b", "c"], ["c", "a"]])
def test_several_active_adapters_summed_in_one_call(active, calls):
    reference = _many()
    reference.base_model.set_adapter(active)
    model = copy.deepcopy(reference)
    report = patch_peft(model)
    assert len(report) == 14 and report.left == []
    outs = []
    for m in (reference, model):
        m.zero_grad(set_to_none=True)
        logits = m(IDS).logits
        logits.square().mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    assert calls == ["single"] * 14  # one fused call per layer for all active adapters
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    assert outs[1][1].keys() == outs[0][1].keys()
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_report_lists_what_stays_on_peft(calls):
    model = _many(embedding=True)
    report = patch_peft(model)
    assert isinstance(report, PatchReport) and isinstance(report, list) and len(report) == 14
    assert report.patched == list(report)
    (left,) = report.left
    assert left.layer.endswith("embed_tokens") and left.why == "layer type" and not left.refused
    assert report.by_reason() == {"layer type": [left.layer]}
    assert "14 of 15 LoRA layers run fused" in report.summary() and "embed_tokens" in report.summary()
    with torch.no_grad():
        model(IDS)
    assert calls == ["single"] * 14


def test_patch_layer_entry_point():
    model = _many()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    name, layer = next(iter(layers.items()))
    assert patch_layer(layer, name) is None and is_patched(layer)
    assert patch_layer(layer, name) is None  # idempotent
    embed = get_peft_model(
        tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens"])
    ).base_model.model.model.embed_tokens
    record = patch_layer(embed, "embed")
    assert isinstance(record, Unpatched) and record.why == "layer type" and not is_patched(embed)
    biased = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True))
    q = biased.base_model.model.model.layers[0].self_attn.q_proj
    record = patch_layer(q, "q")
    assert record.refused and record.why == "adapter" and "lora_bias" in record.message and not is_patched(q)
    dora = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    q = dora.base_model.model.model.layers[0].self_attn.q_proj
    assert patch_layer(q, "q") is None and is_patched(q)  # DoRA runs on the fused DoRA op


def test_only_non_linear_lora_layers_is_refused():
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="has no PEFT LoRA Linear layers to patch: its 1 LoRA layers are Embedding"):
        patch_peft(model)


def test_dora_adapter_alone_runs_fused_with_others_peft_forward(calls, monkeypatch):
    """A DoRA adapter runs on the DoRA op alone; active together with a plain adapter the layer runs
    PEFT's forward (the summed call has no DoRA norm): outputs equal unpatched PEFT's in both cases. A
    mixed batch naming a DoRA adapter is refused as PEFT refuses it."""
    dora_calls = []
    real = peft_patch.dora.fused
    monkeypatch.setattr(peft_patch.dora, "fused", lambda *a: dora_calls.append(1) or real(*a))
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=ALL, init_lora_weights=False), adapter_name="a"
    )
    model.add_adapter("d", LoraConfig(r=4, lora_alpha=8, target_modules=ALL, init_lora_weights=False, use_dora=True))
    model.eval()
    reference = copy.deepcopy(model)
    patch_peft(model)
    ids = IDS[:3]
    with torch.no_grad():
        for active, fused_calls in ((["d"], 14), (["a", "d"], 0)):
            model.base_model.set_adapter(active)
            reference.base_model.set_adapter(active)
            calls.clear(), dora_calls.clear()
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
            assert (len(dora_calls), calls) == (fused_calls, []), active
        for m in (model, reference):
            with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
                m(ids, adapter_names=["d", "a", "__base__"])
