"""Several named adapters on one base (issue 24, part 4): ``apply(..., adapter_name=)`` adds CorDA /
PiSSA / Partial-LoRA / LoRA adapters to the same layers of a tiny random Llama, ``set_adapter`` picks
one, ``adapter_rows`` runs one adapter per row in one segmented call per layer, and each adapter
exports to PEFT on the original base with the same logits."""

import copy

import pytest
import torch

import corda_kernels as ck
from corda_kernels.testing import tiny_llama, token_batches

VOCAB = 128


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _move(model, name, seed):
    """Train adapter ``name`` a little (random steps on its trainable factors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, ck.LowRankLinear):
                owner = layer.adapter(name)
                for factor in owner.trainable:
                    t = getattr(owner, factor)
                    t.add_(0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype))


@pytest.fixture(scope="module")
def batches():
    return token_batches(VOCAB, n_batches=2, batch=2, seq=10, seed=3)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (5, 9), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def served(batches, tmp_path_factory):
    """(original, adapted with corda + pissa + partial_lora + lora, initial dir of the first)."""
    torch.manual_seed(0)
    original = tiny_llama(hidden=32, intermediate=48, vocab=VOCAB).eval()
    model = copy.deepcopy(original)
    cal = ck.calibrate(model, batches, progress=False)
    ck.apply(model, "corda", rank=4, covariances=cal, progress=False, adapter_name="c")
    initial = str(tmp_path_factory.mktemp("initial"))
    ck.save_peft_adapter(model, initial)
    _move(model, "c", 1)
    ck.apply(model, "pissa", rank=3, alpha=6, progress=False, adapter_name="p", initial=initial)
    ck.apply(model, "partial_lora", rank=2, densities=0.5, progress=False, adapter_name="q")
    ck.apply(model, "lora", rank=5, seed=3, progress=False, adapter_name="x")
    for name, seed in (("p", 2), ("q", 3), ("x", 4)):
        _move(model, name, seed)
    return original, model, initial


def _alone(model, name, ids):
    ck.set_adapter(model, name)
    return _logits(model, ids)


def test_names_active_and_original_base(served, ids):
    original, model, _ = served
    assert ck.adapter_names(model) == ("c", "p", "q", "x")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.active_adapter == "c" and layer.on_original_base and not layer.base_changed
    torch.testing.assert_close(layer.weight, original.model.layers[0].self_attn.q_proj.weight, rtol=1e-6, atol=1e-6)
    with ck.adapter_rows(model, [None] * ids.shape[0]):
        torch.testing.assert_close(_logits(model, ids), _logits(original, ids), rtol=1e-5, atol=1e-5)


def test_active_adapter_trains_alone(served, ids):
    _, model, _ = served
    ck.set_adapter(model, "p")
    layer = model.model.layers[0].mlp.up_proj
    assert layer.adapter("p").A.requires_grad and not layer.A.requires_grad
    assert not layer.adapter("q").B.requires_grad
    model.zero_grad()
    model(input_ids=ids).logits.square().mean().backward()
    assert layer.adapter("p").A.grad is not None and layer.A.grad is None
    ck.set_adapter(model, "c")
    model.zero_grad()


@pytest.mark.parametrize(
    "rows",
    [["q", None, "c", "x", "p"], ["p", "p", "p", "p", "p"], ["x", "c", "x", "__base__", "c"], [None] * 5],
    ids=["each", "all-one", "repeated", "base"],
)
def test_rows_equal_each_adapter_alone(served, ids, rows):
    original, model, _ = served
    alone = {n: _alone(model, n, ids) for n in ck.adapter_names(model)}
    ck.set_adapter(model, "c")
    alone[None] = alone["__base__"] = _logits(original, ids)
    want = torch.stack([alone[r][i] for i, r in enumerate(rows)])
    with ck.adapter_rows(model, rows):
        got = _logits(model, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the same as an index tensor, per sequence and per token
    names = ck.adapter_names(model)
    index = torch.tensor([-1 if r in (None, "__base__") else names.index(r) for r in rows])
    with ck.adapter_rows(model, index):
        torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)
    with ck.adapter_rows(model, index[:, None].expand(ids.shape).contiguous()):
        torch.testing.assert_close(_logits(model, ids), want, rtol=1e-5, atol=1e-5)


def test_a_wrong_index_is_caught(served, ids):
    """The tolerance above separates adapters: swapping two rows' adapters changes the logits."""
    _, model, _ = served
    with ck.adapter_rows(model, ["c", "p", "q", "x", "c"]):
        a = _logits(model, ids)
    with ck.adapter_rows(model, ["p", "c", "q", "x", "c"]):
        b = _logits(model, ids)
    assert (a[:2] - b[:2]).abs().max() > 1e-4
    torch.testing.assert_close(a[2:], b[2:], rtol=1e-6, atol=1e-6)


def test_rows_backprop_to_each_adapter(served, ids):
    _, model, _ = served
    layer = model.model.layers[1].self_attn.v_proj
    owners = [layer.adapter(n) for n in ck.adapter_names(model)]
    params = [getattr(o, f) for o in owners for f in o.trainable]
    for p in params:
        p.requires_grad_(True)
    rows = ["c", "q", None, "x", "p"]
    try:
        with ck.adapter_rows(model, rows):
            mixed = torch.autograd.grad(model(input_ids=ids).logits.square().sum(), params)
        summed = [torch.zeros_like(p) for p in params]
        for i, name in enumerate(rows):
            if name is None:
                continue
            with ck.adapter_rows(model, [name]):
                grads = torch.autograd.grad(model(input_ids=ids[i : i + 1]).logits.square().sum(), params)
            summed = [s + g for s, g in zip(summed, grads)]
        for g, s in zip(mixed, summed):
            torch.testing.assert_close(g, s, rtol=1e-4, atol=1e-5)
    finally:
        ck.set_adapter(model, "c")


def test_each_adapter_exports_to_peft_on_the_original(served, ids, tmp_path):
    from peft import PeftModel

    original, model, _ = served
    base = copy.deepcopy(original)
    first = None
    for name in ck.adapter_names(model):
        path = str(tmp_path / name)
        ck.save_peft_adapter(model, path, adapter_name=name)
        if first is None:
            peft = PeftModel.from_pretrained(base, path, adapter_name=name).eval()
            first = peft
        else:
            first.load_adapter(path, adapter_name=name)
        first.set_adapter(name)
        torch.testing.assert_close(_logits(first, ids), _alone(model, name, ids), rtol=1e-5, atol=1e-5)
    ck.set_adapter(model, "c")


def test_merge_the_active_or_named_adapter(served, ids):
    _, model, _ = served
    for name in ("q", None):
        merged = copy.deepcopy(model)
        if name is None:
            ck.set_adapter(merged, "p")
        want = _alone(copy.deepcopy(merged), name or "p", ids)
        ck.merge(merged, adapter_name=name)
        assert not any(isinstance(m, ck.LowRankLinear) for m in merged.modules())
        torch.testing.assert_close(_logits(merged, ids), want, rtol=1e-5, atol=1e-5)


def test_unload_gives_the_original(served, ids):
    original, model, _ = served
    unloaded = ck.unload(copy.deepcopy(model))
    torch.testing.assert_close(_logits(unloaded, ids), _logits(original, ids), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# bad input: an error naming the layer and the option, nothing changed


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


@pytest.fixture
def pissa():
    torch.manual_seed(0)
    model = tiny_llama(hidden=32, intermediate=48, vocab=VOCAB, layers=1).eval()
    return ck.apply(model, "pissa", rank=2, progress=False)


def test_residual_base_needs_initial(pissa):
    before = _state(pissa)
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\..*initial="):
        ck.apply(pissa, "lora", rank=2, progress=False, adapter_name="b")
    _unchanged(pissa, before)


def test_initial_of_another_model_is_refused(pissa, tmp_path):
    other = ck.apply(tiny_llama(hidden=32, intermediate=48, vocab=VOCAB, layers=1), "pissa", rank=2, progress=False)
    ck.save_peft_adapter(other, str(tmp_path / "i"), adapter_name=None)
    other_layers = {n for n, m in other.named_modules() if isinstance(m, ck.LowRankLinear)}
    assert other_layers  # same names: the factors exist; a missing file is refused
    before = _state(pissa)
    with pytest.raises(ValueError, match="holds no adapter_model.safetensors"):
        ck.apply(pissa, "lora", rank=2, progress=False, adapter_name="b", initial=str(tmp_path / "none"))
    _unchanged(pissa, before)


def test_bad_names_and_targets(pissa, tmp_path):
    ck.save_peft_adapter(pissa, str(tmp_path / "i"))
    initial = str(tmp_path / "i")
    before = _state(pissa)
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj.*already holds an adapter named"):
        ck.apply(pissa, "lora", rank=2, progress=False, adapter_name="default", initial=initial)
    with pytest.raises(ValueError, match="adapter_name must be a non-empty str"):
        ck.apply(pissa, "lora", rank=2, progress=False, adapter_name="a.b", initial=initial)
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.mlp\.\w+_proj is left out of .*target_modules"):
        ck.apply(pissa, "lora", rank=2, progress=False, adapter_name="b", initial=initial, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="dora=True cannot be used for a further adapter"):
        ck.apply(pissa, "lora", rank=2, progress=False, adapter_name="b", initial=initial, dora=True)
    with pytest.raises(ValueError, match=r"rank"):
        ck.apply(pissa, "lora", rank=999, progress=False, adapter_name="b", initial=initial)
    _unchanged(pissa, before)
    assert ck.adapter_names(pissa) == ("default",)
    ck.apply(pissa, "lora", rank=2, progress=False, adapter_name="b", initial=initial)
    assert ck.adapter_names(pissa) == ("default", "b")


def test_mixed_dtypes_refused():
    model = ck.apply(
        tiny_llama(hidden=32, intermediate=48, vocab=VOCAB, layers=1, dtype=torch.bfloat16),
        "lora",
        rank=2,
        progress=False,
    )
    before = _state(model)
    with pytest.raises(TypeError, match=r"layer model\.layers\.0\..*mixed dtypes.*autocast_adapter_dtype=False"):
        ck.apply(model, "lora", rank=2, progress=False, adapter_name="b", autocast_adapter_dtype=False)
    _unchanged(model, before)


def test_bad_rows(pissa, tmp_path):
    ck.save_peft_adapter(pissa, str(tmp_path / "i"))
    ck.apply(pissa, "lora", rank=2, progress=False, adapter_name="b", initial=str(tmp_path / "i"))
    ids = torch.randint(0, VOCAB, (3, 5))
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        with ck.adapter_rows(pissa, ["b", "zz", None]):
            pass
    with pytest.raises(ValueError, match="holds 2, out of range"):
        with ck.adapter_rows(pissa, torch.tensor([0, 2, -1])):
            pass
    with pytest.raises(TypeError, match="int64 or int32, got torch.float32"):
        with ck.adapter_rows(pissa, torch.tensor([0.0, 1.0, 0.0])):
            pass
    with pytest.raises(
        ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj: .*adapter_index has shape \(2,\)"
    ):
        with ck.adapter_rows(pissa, ["b", None]):
            pissa(input_ids=ids)
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        ck.set_adapter(pissa, "zz")
    assert all("_corda_kernels_rows" not in m.__dict__ for m in pissa.modules())  # the context cleaned up


def test_layer_add_adapter_errors():
    W = torch.randn(6, 5)
    layer = ck.LowRankLinear(W, torch.randn(2, 5), torch.randn(6, 2))
    with pytest.raises(ValueError, match=r"add_adapter\('b'\): .*B"):
        layer.add_adapter("b", torch.randn(2, 5), torch.randn(7, 2))
    half = ck.LowRankLinear(W.bfloat16(), torch.randn(2, 5), torch.randn(6, 2))  # fp32 factors
    with pytest.raises(TypeError, match="mixed dtypes.*autocast_adapter_dtype"):
        half.add_adapter("b", torch.randn(2, 5), torch.randn(6, 2), autocast_adapter_dtype=False)
    with pytest.raises(ValueError, match=r"add_adapter\('b'\): .*device"):
        layer.add_adapter("b", torch.randn(2, 5, device="meta"), torch.randn(6, 2, device="meta"))
    with pytest.raises(ValueError, match="already holds an adapter named 'default'"):
        layer.add_adapter("default", torch.randn(2, 5), torch.randn(6, 2))
    assert layer.adapter_names == ("default",) and half.adapter_names == ("default",)
    dora = ck.LowRankLinear(W, torch.randn(2, 5), torch.randn(6, 2)).enable_dora()
    with pytest.raises(ValueError, match="DoRA"):
        dora.add_adapter("b", torch.randn(2, 5), torch.randn(6, 2))
    with pytest.raises(ValueError, match="DoRA"):
        dora(torch.randn(3, 5), adapter_index=torch.tensor([0, 0, -1]))


def test_corda_as_a_further_adapter_and_merged_checkpoint(batches, ids, tmp_path):
    """CorDA (KPA) added to a PiSSA model with the covariances calibrated before ``apply``: at init
    both adapters give the original's logits; ``save_merged_model(adapter_name=)`` writes one."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    original = tiny_llama(hidden=32, intermediate=48, vocab=VOCAB).eval()
    model = copy.deepcopy(original)
    cal = ck.calibrate(model, batches, progress=False)
    ck.apply(model, "pissa", rank=3, progress=False)
    ck.save_peft_adapter(model, str(tmp_path / "initial"))
    ck.apply(
        model,
        "corda",
        rank=4,
        mode="kpa",
        covariances=cal,
        progress=False,
        adapter_name="kpa",
        initial=str(tmp_path / "initial"),
    )
    want = _logits(original, ids)
    for name in ("default", "kpa"):
        torch.testing.assert_close(_alone(model, name, ids), want, rtol=1e-5, atol=1e-5)
    _move(model, "kpa", 9)
    moved = _alone(model, "kpa", ids)
    ck.set_adapter(model, "default")
    ck.save_merged_model(model, str(tmp_path / "merged"), adapter_name="kpa")
    torch.testing.assert_close(
        _logits(LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval(), ids), moved, rtol=1e-5, atol=1e-5
    )
    assert model.model.layers[0].self_attn.q_proj.active_adapter == "default"  # the model is left as it was
