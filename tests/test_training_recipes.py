"""Training as scripts run it, on a tiny Llama: CPU bf16 autocast (LowRankLinear and patched PEFT
against PEFT's own LoRA), the Hugging Face ``Trainer`` (bf16, gradient accumulation, save + resume
with identical losses), gradient checkpointing and ``torch.compile``."""

import copy

import pytest
import torch

from corda_kernels.adapt import apply
from corda_kernels.integrations import peft_patch
from corda_kernels.nn import LowRankLinear
from corda_kernels.nn import lowrank_linear as module_impl
from corda_kernels.testing import tiny_llama, token_batches

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 4


@pytest.fixture(scope="module")
def batch():
    data = token_batches(128, n_batches=1, batch=2, seq=16)[0]
    return {**data, "labels": data["input_ids"].masked_fill(data["attention_mask"] == 0, -100)}


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of the fused op from LowRankLinear and from patched PEFT layers."""
    calls = []
    for owner in (module_impl, peft_patch):
        original = owner.fused

        def counting(*args, _original=original):
            y = _original(*args)
            calls.append(y.dtype)  # the dtype the op ran in
            return y

        monkeypatch.setattr(owner, "fused", counting)
    return calls


def _lora_pair():
    """A LowRankLinear LoRA model and a PEFT LoRA model with the same (random, nonzero) factors."""
    ours = apply(tiny_llama(), "lora", rank=RANK, alpha=2 * RANK, target_modules=ALL, progress=False)
    g = torch.Generator().manual_seed(3)
    for module in ours.modules():
        if isinstance(module, LowRankLinear):
            with torch.no_grad():
                module.B.copy_(torch.randn(module.B.shape, generator=g) * 0.1)
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=ALL))
    for name, module in ours.named_modules():
        if isinstance(module, LowRankLinear):
            layer = theirs.base_model.model.get_submodule(name)
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(module.A)
                layer.lora_B["default"].weight.copy_(module.B)
    return ours.train(), theirs.train()


def _autocast_loss(model, batch):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach().float()


def test_cpu_bf16_autocast_lowrank_and_patched_peft_match_peft_lora(batch, fused_calls):
    """fp32 models under CPU bf16 autocast: LowRankLinear, patched PEFT and PEFT's unpatched LoRA
    give the same loss to bf16 tolerance, and the first two run the fused op in bf16."""
    ours, theirs = _lora_pair()
    expected = _autocast_loss(theirs, batch)
    assert fused_calls == []
    patched = copy.deepcopy(theirs)
    peft_patch.patch_peft(patched)
    for model in (ours, patched):
        fused_calls.clear()
        loss = _autocast_loss(model, batch)
        assert fused_calls == [torch.bfloat16] * 14
        torch.testing.assert_close(loss, expected, atol=2e-2, rtol=1e-2)
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kwargs", [{"use_reentrant": False}, None])
def test_gradient_checkpointing_gives_the_same_gradients(batch, fused_calls, kwargs):
    model = apply(tiny_llama(), "pissa", rank=RANK, progress=False).train()
    expected = _grads(model, batch)
    if kwargs is None:  # HF's default (reentrant): the inputs must require grad, as PEFT arranges
        model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    fused_calls.clear()
    got = _grads(model, batch)
    assert len(fused_calls) > 14  # forwards ran again, fused, in the backward (non-reentrant may stop early)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


def test_torch_compile_training_step_on_bf16_base_with_fp32_factors():
    """torch.compile (fullgraph, aot_eager: the registered op and its autocast-free path) of a
    LowRankLinear with a bf16 weight and fp32 factors: same output and fp32 gradients as eager."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=g).bfloat16()
    layer = LowRankLinear(weight, torch.randn(4, 16, generator=g), torch.randn(24, 4, generator=g), scale=0.5)
    assert layer.A.dtype == torch.float32
    x = torch.randn(3, 5, 16, generator=g).bfloat16()

    def step(module):
        module.zero_grad(set_to_none=True)
        y = module(x)
        y.float().square().sum().backward()
        return y.detach(), module.A.grad.clone(), module.B.grad.clone()

    expected = step(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = step(compiled)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 input, compiled under autocast
        y = torch.compile(layer, backend="aot_eager", fullgraph=True)(x.float())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected[0], atol=0, rtol=0)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=12):
        g = torch.Generator().manual_seed(11)
        self.ids = torch.randint(0, 128, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(tmp_path, max_steps, dropout):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Losses(TrainerCallback):
        def __init__(self):
            self.losses = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses[state.global_step] = logs["loss"]

    model = apply(tiny_llama(), "pissa", rank=RANK, progress=False, dropout=dropout)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        max_steps=max_steps,
        logging_steps=1,
        save_steps=2,
        save_strategy="steps",
        report_to=[],
        seed=5,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    losses = Losses()
    trainer = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[losses])
    return trainer, losses


def test_hf_trainer_bf16_accumulation_save_and_resume(tmp_path, fused_calls):
    """HF Trainer on CPU with bf16=True (autocast), gradient accumulation, adapter dropout and a
    checkpoint every 2 steps: the fused op runs in bf16, the loss falls, and a run resumed from the
    step-2 checkpoint logs exactly the uninterrupted run's losses for steps 3-4."""
    full, full_losses = _trainer(tmp_path / "full", 4, dropout=0.1)
    full.train()
    assert fused_calls and set(fused_calls) == {torch.bfloat16}  # autocast ran the op in bf16
    assert sorted(full_losses.losses) == [1, 2, 3, 4] and full_losses.losses[4] < full_losses.losses[1]
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed, resumed_losses = _trainer(tmp_path / "resumed", 4, dropout=0.1)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert sorted(resumed_losses.losses) == [3, 4]
    assert [resumed_losses.losses[s] for s in (3, 4)] == [full_losses.losses[s] for s in (3, 4)]
    trained = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    assert trained and all(p.dtype == torch.float32 for p in trained.values())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[name]), name
