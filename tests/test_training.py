"""A few AdamW steps per method on a tiny random Llama: loss falls, only the adapters move, exact
parameter counts, and the trained adapter exports to PEFT with the same logits."""

import pytest
import torch
from transformers import LlamaForCausalLM

from corda_kernels.adapt import apply
from corda_kernels.calibration import calibrate
from corda_kernels.export import save_merged_model, save_peft_adapter, save_residual_model
from corda_kernels.methods.parameters import trainable_parameter_report
from corda_kernels.nn import LowRankLinear
from corda_kernels.testing import tiny_llama, token_batches

RANK = 4
STEPS = 6
# method -> (apply options, trainable tensors per layer, expected trainable numbers of an (out, in) layer with rank r)
CASES = {
    "lora": ({"dropout": 0.1}, {"A", "B"}, lambda out, inp, r: r * (out + inp)),
    "asymmetric": ({}, {"B"}, lambda out, inp, r: out * r),
    "siva": ({}, {"diag"}, lambda out, inp, r: r),
    "partial_lora": ({"densities": 0.5}, {"A", "B"}, None),
    "pissa": ({}, {"A", "B"}, lambda out, inp, r: r * (out + inp)),
    "corda": ({"mode": "kpa"}, {"A", "B"}, lambda out, inp, r: r * (out + inp)),
}


@pytest.fixture(scope="module")
def batch():
    data = token_batches(128, n_batches=1, batch=2, seq=16)[0]
    return {**data, "labels": data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)}


def _expected_trainable(method, layer):
    count = CASES[method][2]
    if count is not None:
        return count(layer.out_features, layer.in_features, layer.rank)
    rows = layer.out_features if layer.row_index is None else layer.row_index.numel()
    cols = layer.in_features if layer.col_index is None else layer.col_index.numel()
    return layer.rank * (rows + cols)


@pytest.mark.parametrize("method", list(CASES))
def test_train_then_export(method, batch, tmp_path):
    options, trainable_names, _ = CASES[method]
    model = tiny_llama()
    if method == "corda":
        options = {**options, "covariances": calibrate(model, token_batches(128, n_batches=2), progress=False)}
    apply(model, method, rank=RANK, alpha=2 * RANK, progress=False, **options)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{t}" for n in layers for t in trainable_names}
    report = trainable_parameter_report(model)
    for name, layer in layers.items():
        assert report.layers[name].trainable == _expected_trainable(method, layer), name

    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 1e-3, losses
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == trainable

    save_residual_model(model, tmp_path / "base")
    save_peft_adapter(model, tmp_path / "adapter")
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    with torch.no_grad():
        ours = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_partial_lora_on_real_text():
    """SmolLM2-135M (GGUF, offline): Partial-LoRA ratios from a few-shot batch of real text on a few
    layers, then AdamW steps on that text lower the loss."""
    from corda_kernels.integrations.loading import load_model, load_texts
    from corda_kernels.integrations.loading import token_batches as text_batches
    from corda_kernels.methods import PartialLoRA

    try:
        model, tokenizer = load_model(None, None)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    data = text_batches(tokenizer, load_texts("builtin")[:2], 32, 2)[0]
    batch = {**data, "labels": data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)}
    method = PartialLoRA([batch])
    targets = ["model.layers.10.self_attn.v_proj", "model.layers.10.mlp.down_proj"]
    apply(model, method, rank=8, alpha=16, target_modules=targets, progress=False)
    assert set(method.ratios) == set(targets) and all(0 < r <= 1 for r in method.ratios.values())
    report = trainable_parameter_report(model)
    # each layer trains its kept rows and columns (a mask of ratio 1 keeps all), and the count says so
    for name in targets:
        layer = model.get_submodule(name)
        rows = layer.out_features if layer.row_index is None else layer.row_index.numel()
        cols = layer.in_features if layer.col_index is None else layer.col_index.numel()
        assert report.layers[name].trainable == 8 * (rows + cols), name
        assert (rows + cols < layer.out_features + layer.in_features) == (method.ratios[name] < 1), name

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_gguf_loaded_model_saves_and_trains_without_helpers(tmp_path, smollm2):
    """A model loaded from GGUF by transformers itself (as users do, not through our loader) is
    marked quantized although its weights are dequantized floats: after apply, save_residual_model,
    save_merged_model and HF Trainer work on it, and the saved residual reloads with its weights."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    directory, gguf = smollm2
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    assert model.is_quantized  # what made save_pretrained and Trainer refuse it
    name = "model.layers.0.self_attn.q_proj"
    apply(model, "pissa", rank=2, target_modules=[name], progress=False)
    save_residual_model(model, tmp_path / "residual")
    save_merged_model(model, tmp_path / "merged")
    residual = AutoModelForCausalLM.from_pretrained(tmp_path / "residual", dtype=torch.float32)
    assert torch.equal(residual.get_submodule(name).weight, model.get_submodule(name).weight)
    ids = torch.randint(0, 1000, (1, 8))
    data = [{"input_ids": ids[0], "labels": ids[0]}]
    args = TrainingArguments(str(tmp_path / "train"), max_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    before = model.get_submodule(name).B.detach().clone()
    Trainer(model=model, args=args, train_dataset=data).train()
    assert not torch.equal(model.get_submodule(name).B, before)


# -- 16-bit bases: fp32 trainable factors (the dtype policy) ----------------------------------------
DTYPE_CASES = {**{m: CASES[m][0] for m in CASES}, "milora": {}}


@pytest.mark.parametrize("method", list(DTYPE_CASES))
def test_fp16_base_trains_with_stock_adam(method, batch):
    """fp16 model + torch.optim.Adam (default eps): the trainable factors are fp32, so Adam's eps does
    not round to 0 and the loss falls without NaN (factors stored in fp16 turn to NaN here)."""
    options = dict(DTYPE_CASES[method])
    model = tiny_llama(dtype=torch.float16)
    if method == "corda":
        options["covariances"] = calibrate(model, token_batches(128, n_batches=2), progress=False)
    apply(model, method, rank=RANK, alpha=2 * RANK, progress=False, **options)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(m.weight.dtype == torch.float16 for m in model.modules() if isinstance(m, LowRankLinear))
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert all(torch.isfinite(p).all() for p in trainable)
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_bf16_base_keeps_updates_below_bf16_resolution(batch, autocast_adapter_dtype):
    """On a bf16 base, an SGD step smaller than bf16's resolution (2⁻⁸ relative) changes the fp32
    factor; with ``autocast_adapter_dtype=False`` (factors in bf16) the same step is lost."""
    model = apply(
        tiny_llama(dtype=torch.bfloat16),
        "pissa",
        rank=RANK,
        progress=False,
        autocast_adapter_dtype=autocast_adapter_dtype,
    ).train()
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.A.dtype == (torch.float32 if autocast_adapter_dtype else torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    model(**batch).loss.backward()
    grad = layer.A.grad
    assert grad.dtype == layer.A.dtype and grad.abs().max() > 0
    # lr such that every update is below 2^-10 of its entry: bf16 (8 mantissa bits) cannot hold it
    lr = float((2.0**-10 * layer.A.detach().float().abs() / grad.float().abs().clamp_min(1e-30)).min())
    before = layer.A.detach().clone()
    torch.optim.SGD([layer.A], lr=lr).step()
    changed = int((layer.A.detach() != before).sum())
    if autocast_adapter_dtype:
        assert changed > 0.5 * before.numel()
    else:
        assert changed == 0


def test_decomposition_cache_serves_both_factor_dtypes(tmp_path):
    """One cache for a bf16 model: the fp32-factor and the bf16-factor adapters read back the same
    decomposition (bf16 factors are the fp32 ones rounded) and the same residual weights."""

    def adapt(flag):
        model = tiny_llama(dtype=torch.bfloat16)
        apply(model, "pissa", rank=RANK, progress=False, cache_dir=str(tmp_path), autocast_adapter_dtype=flag)
        return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}

    fp32, cached_fp32, bf16 = adapt(True), adapt(True), adapt(False)
    assert len(list(tmp_path.rglob("*"))) > 0
    for name, layer in fp32.items():
        assert layer.A.dtype == torch.float32 and bf16[name].A.dtype == torch.bfloat16
        for t in ("A", "B", "weight"):
            assert torch.equal(getattr(cached_fp32[name], t), getattr(layer, t)), (name, t)
        assert torch.equal(bf16[name].A, layer.A.to(torch.bfloat16)) and torch.equal(bf16[name].weight, layer.weight)
