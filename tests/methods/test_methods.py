"""LoRA, asymmetric LoRA, SiVA and Partial-LoRA on a tiny random Llama: init, counts, freezing, options."""

import copy
import math

import pytest
import torch

from corda_kernels.adapt import apply
from corda_kernels.methods import METHODS, PartialLoRA
from corda_kernels.methods.parameters import trainable_parameter_report
from corda_kernels.nn import LowRankLinear
from corda_kernels.testing import tiny_llama, token_batches

RANK = 4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "lora": {},
    "asymmetric": {},
    "siva": {},
    "siva-perc": {"perc": 0.1},
    "partial_lora": {"densities": 0.5},
}


def _method(case):
    return case.split("-")[0]


def _adapted(case, seed=0, **kwargs):
    model = tiny_llama()
    apply(model, _method(case), rank=RANK, alpha=2 * RANK, seed=seed, progress=False, **CASES[case], **kwargs)
    return model


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


@pytest.fixture(scope="module")
def adapted():
    """``adapted(case, seed=0, **apply_options)``: adapted models shared by the read-only tests."""
    cache = {}

    def get(case, seed=0, **kwargs):
        key = (case, seed, repr(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = _adapted(case, seed, **kwargs)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def batch():
    return token_batches(128, n_batches=1)[0]


@pytest.fixture(scope="module")
def original():
    return tiny_llama()


def test_registry():
    assert {"lora", "asymmetric", "siva", "partial_lora"} <= set(METHODS)


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_at_init_equal_original(case, original, batch, adapted):
    model = adapted(case)
    assert len(_layers(model)) == 14
    with torch.no_grad():
        delta = (model(**batch).logits - original(**batch).logits).abs().max()
    assert delta <= 1e-4


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_counts_and_freezing(case, adapted):
    model = adapted(case)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    report = trainable_parameter_report(model)
    assert report.other_trainable == 0
    for name, layer in _layers(model).items():
        out_f, in_f = layer.out_features, layer.in_features
        names = {n.rsplit(".", 1)[1] for n in trainable if n.startswith(name + ".")}
        if case in ("lora", "partial_lora"):
            assert names == {"A", "B"}
        elif case == "asymmetric":
            assert names == {"B"} and "A" in dict(layer.named_buffers())
        else:
            assert names == {"diag"} and {"A", "B"} <= set(dict(layer.named_buffers()))
        expected = {
            "lora": RANK * (out_f + in_f),
            "asymmetric": out_f * RANK,
            "siva": RANK,
            "siva-perc": round(0.1 * min(out_f, in_f)),
            "partial_lora": layer.B.shape[0] * RANK + RANK * layer.A.shape[1],
        }[case]
        assert report.layers[name].trainable == expected, name
        assert report.layers[name].dense_lora == layer.rank * (out_f + in_f)
        assert not layer.weight.requires_grad
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{report.trainable:>10}" in report.table()


def test_lora_matches_peft(original, batch):
    peft = pytest.importorskip("peft")
    reference = peft.get_peft_model(
        copy.deepcopy(original), peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=ALL, lora_dropout=0.0)
    ).eval()
    ours = _adapted("lora")
    with torch.no_grad():
        assert (reference(**batch).logits - ours(**batch).logits).abs().max() <= 1e-5
        for name, layer in _layers(ours).items():
            peft_layer = reference.base_model.model.get_submodule(name)
            assert layer.scale == peft_layer.scaling["default"]
            assert layer.A.abs().max() <= 1 / math.sqrt(layer.in_features)  # kaiming_uniform_(a=√5) bound
            assert layer.A.std() > 0.4 / math.sqrt(layer.in_features)
            torch.nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.1)
            layer.A.copy_(peft_layer.lora_A["default"].weight)
            layer.B.copy_(peft_layer.lora_B["default"].weight)
        expected, got = reference(**batch).logits, ours(**batch).logits
    assert (expected - original(**batch).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_asymmetric_orthonormal_rows(adapted):
    for layer in _layers(adapted("asymmetric")).values():
        eye = torch.eye(RANK)
        torch.testing.assert_close(layer.A @ layer.A.T, eye, atol=1e-6, rtol=0)
        assert not layer.B.any()


@pytest.mark.parametrize("case", ["siva", "siva-perc"])
def test_siva_residual_and_smallest_values(case, original, adapted):
    model = adapted(case)
    for name, layer in _layers(model).items():
        W = original.get_submodule(name).weight.detach()
        k = RANK if case == "siva" else round(0.1 * min(W.shape))
        assert layer.rank == k and layer.init_stats["k"] == k
        delta = layer.scale * layer.B @ torch.diag(layer.diag) @ layer.A
        torch.testing.assert_close(layer.weight + delta, W, atol=1e-5, rtol=0)
        smallest = torch.linalg.svdvals(W.double())[-k:]
        torch.testing.assert_close(
            (layer.scale * layer.diag).double().sort().values, smallest.sort().values, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(layer.A @ layer.A.T, torch.eye(k), atol=1e-5, rtol=0)


def _same(a, b):
    return a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("case", ["lora", "asymmetric", "partial_lora"])
def test_deterministic_per_seed_and_layer(case, adapted):
    first, other = _layers(adapted(case)), _layers(adapted(case, seed=1))
    again = _layers(_adapted(case))
    subset = _layers(adapted(case, target_modules=["v_proj"]))
    assert set(subset) == {n for n in first if n.endswith("v_proj")}
    for name, layer in first.items():
        assert _same(layer.A, again[name].A) and not _same(layer.A, other[name].A)
        assert _same(layer.A, subset.get(name, layer).A)  # independent of which other layers are adapted
        if case == "partial_lora":
            assert _same(layer.row_index, again[name].row_index) and _same(layer.col_index, again[name].col_index)
    q, o = first["model.layers.0.self_attn.q_proj"], first["model.layers.0.self_attn.o_proj"]
    assert not _same(q.A, o.A)  # same shape, different layer names: different draws


# -- Partial-LoRA --------------------------------------------------------------------------------


def _agreement(reference_batches, reference_model):
    """A metric: fraction of next-token argmax predictions equal to ``reference_model``'s."""
    with torch.no_grad():
        preds = [reference_model(**b).logits.argmax(-1) for b in reference_batches]

    def metric(model, batches):
        hits = sum(int((model(**b).logits.argmax(-1) == p).sum()) for b, p in zip(batches, preds))
        return hits / sum(p.numel() for p in preds)

    return metric


def test_partial_lora_ratio_follows_layer_spectrum():
    """Among two same-shape layers, a random full-rank one needs a larger ratio than a rank-2 one."""
    model = tiny_llama(layers=1)
    batches = token_batches(128, n_batches=1, pad_last=False)
    low, full = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.get_submodule(low).weight.copy_(torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g) / 4)
        model.get_submodule(full).weight.copy_(torch.randn(64, 64, generator=g) / 2)
    method = PartialLoRA(batches, metric=_agreement(batches, copy.deepcopy(model)))
    apply(model, method, rank=RANK, target_modules=[low, full], progress=False)
    assert method.base_metric == 1.0
    assert method.subspace_ranks[low] <= 2
    assert method.ratios[full] > 4 * method.ratios[low]
    assert method.ratios == {n: m.init_stats["density"] for n, m in _layers(model).items()}


def test_partial_lora_default_metric_and_report():
    """Default likelihood metric on a model made confident (labels = its own predictions)."""
    model = tiny_llama(layers=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    batches = token_batches(128, n_batches=1, pad_last=False)
    with torch.no_grad():
        pred = model(**batches[0]).logits.argmax(-1)
    batches[0]["labels"] = torch.cat([batches[0]["input_ids"][:, :1], pred[:, :-1]], 1)
    method = PartialLoRA(batches, margin=0.9)
    apply(model, method, rank=RANK, target_modules=["q_proj", "down_proj"], progress=False)
    assert 0.3 < method.base_metric <= 1.0
    assert set(method.ratios) == {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"}
    for name, layer in _layers(model).items():
        n = min(layer.out_features, layer.in_features)
        assert method.ratios[name] == method.subspace_ranks[name] / n
        kept_rows = layer.out_features if layer.row_index is None else layer.row_index.numel()
        kept_cols = layer.in_features if layer.col_index is None else layer.col_index.numel()
        assert trainable_parameter_report(model).layers[name].trainable == (kept_rows + kept_cols) * RANK
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.endswith((".A", ".B")))


def test_partial_lora_explicit_densities():
    model = tiny_llama(layers=1)
    names = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "v_proj")]
    method = PartialLoRA(densities={names[0]: 0.25, names[1]: 1.0})
    apply(model, method, rank=RANK, target_modules=["q_proj", "v_proj"], progress=False)
    assert method.ratios == {names[0]: 0.25, names[1]: 1.0}
    q, v = (model.get_submodule(n) for n in names)
    assert v.row_index is None and v.col_index is None  # density 1 keeps everything: dense LoRA
    assert 0 < q.row_index.numel() < 40 and 0 < q.col_index.numel() < 40
    assert torch.equal(q.row_index, q.row_index.sort().values) and q.B.shape == (q.row_index.numel(), RANK)


def test_partial_lora_snip():
    model = tiny_llama(layers=1)
    batches = token_batches(128, n_batches=1)
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    method = PartialLoRA(batches, score="snip", margin=0.5)
    method.prepare(
        model, {n: model.get_submodule(n) for n in ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj")}
    )
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert all(p.grad is None for p in model.parameters())
    assert all(0 < r < 0.5 for r in method.ratios.values())  # half the |W·g| mass sits in < half the entries
    apply(model, method, rank=RANK, target_modules=["up_proj"], progress=False)
    assert method.ratios.keys() == {"model.layers.0.mlp.up_proj"}


@pytest.mark.parametrize(
    "method, options, match",
    [
        ("siva", {"perc": 0.0}, "perc"),
        ("siva", {"perc": 1.5}, "perc"),
        ("siva", {"perc": "10%"}, "perc"),
        ("pissa", {"svd": "full"}, "svd must be 'randomized', 'exact' or 'top', got 'full'"),
        ("corda", {"svd": "full"}, "CorDA svd must be one of 'randomized', 'exact'"),
        ("lora", {"rank": 0}, "rank must be a positive integer"),
        ("asymmetric", {"rank": 65}, "exceeds"),
        ("partial_lora", {"densities": 0.5, "margin": 0.0}, "margin"),
        ("partial_lora", {"densities": 0.5, "margin": 1.1}, "margin"),
        ("partial_lora", {"densities": 0.5, "score": "magnitude"}, "score"),
        ("partial_lora", {"densities": 0.5, "metric": "bleu"}, "metric"),
        ("partial_lora", {}, "few_shot"),
        ("partial_lora", {"densities": 0.0}, "densities"),
        ("partial_lora", {"densities": {"model.layers.0.self_attn.q_proj": 0.5}}, "missing"),
        ("partial_lora", {"densities": {"model.layers.0.self_attn.q_proj": 2}}, "q_proj"),
    ],
)
def test_bad_options(method, options, match):
    model = tiny_llama(layers=1)
    options = {"rank": RANK, **options}
    with pytest.raises(ValueError, match=match):
        apply(model, method, progress=False, **options)
    assert not _layers(model)


def test_partial_lora_refuses_non_positive_metric():
    model = tiny_llama(layers=1)
    method = PartialLoRA(token_batches(128, n_batches=1), metric=lambda model, batches: 0.0)
    with pytest.raises(ValueError, match="positive metric"):
        apply(model, method, rank=RANK, target_modules=["q_proj"], progress=False)


@pytest.mark.parametrize("path", ["apply", "apply_blockwise", "merge", "unload"])
def test_new_layers_take_the_mode_of_the_layer_they_replace(path, batch):
    """apply left its new layers in training mode inside an eval() model: with dropout the adapted
    model's outputs were random (0.17-0.30 on logits of 0.6). Every swap (apply, apply_blockwise,
    merge, unload) gives the new module the mode of the one it replaces, module by module."""
    import corda_kernels as ck

    original = tiny_llama()
    with torch.no_grad():
        expected = original(**batch).logits
    for modes in ("eval", "train", "mixed"):
        model = copy.deepcopy(original)
        model.train(modes == "train")
        if modes == "mixed":  # a train() model with one block in eval: each layer keeps its own mode
            model.train()
            model.model.layers[1].eval()
        before = {n: m.training for n, m in model.named_modules()}
        if path == "apply_blockwise":
            ck.apply_blockwise(model, token_batches(128, n_batches=2), "pissa", rank=RANK, dropout=0.3, progress=False)
        else:
            apply(model, "pissa", rank=RANK, dropout=0.3, progress=False)
        if path in ("merge", "unload"):
            getattr(ck, path)(model)
        after = {n: m.training for n, m in model.named_modules() if n in before}
        assert after == before, [n for n in before if after[n] != before[n]]
        assert all(m.training == before[n.rsplit(".", 1)[0]] for n, m in model.named_modules() if n not in before)
        if modes == "eval" and path != "unload":
            with torch.no_grad():
                first, second = model(**batch).logits, model(**batch).logits
            assert torch.equal(first, second)
            torch.testing.assert_close(first, expected, rtol=0, atol=1e-4)
