"""The documented paths, as a matrix: every method x every way a user keeps, copies or reloads an
adapted model x {fp32, bf16 (fp32 factors), NF4 residual}, on a tiny Llama.

Issue 20 found CorDA models that could not be saved because the recipe tests used PiSSA and the save
tests did not cover ``save_pretrained`` with every method. Each path here asserts a property, not
only that it runs:

- ``save_pretrained``: the checkpoint loads back (strictly) into a model of the same structure whose
  tensors were overwritten, and reproduces the logits exactly;
- ``safetensors``: ``save_file(model.state_dict())`` / ``load_file`` round-trips every tensor exactly;
- ``trainer``: HF ``Trainer`` checkpoints at step 2 and a run resumed from it ends with the
  uninterrupted run's parameters, bit for bit;
- ``peft``: ``save_residual_model`` + ``save_peft_adapter`` load in PEFT (``PeftModel`` over
  transformers' model of the residual) and reproduce the logits;
- ``merge``: ``merge`` gives a plain model with the adapted model's logits (NF4: the dequantized
  residual merged);
- ``copy``: ``copy.deepcopy``, ``pickle`` and ``torch.save`` / ``torch.load`` reproduce the logits exactly;
- ``eval``: right after ``apply`` on an ``eval()`` model (adapter dropout 0.1), two no-grad forwards
  are identical and match the original model (NF4: the quantized one reproduces itself, and the
  adapted layers are in eval mode).
"""

import copy
import io
import pickle

import pytest
import torch

import corda_kernels as ck
from corda_kernels.testing import tiny_llama, token_batches

METHODS = {
    "lora": ("lora", {}),
    "pissa": ("pissa", {}),
    "milora": ("milora", {}),
    "corda_ipa": ("corda", {"mode": "ipa"}),
    "corda_kpa": ("corda", {"mode": "kpa"}),
    "asymmetric": ("asymmetric", {}),
    "siva": ("siva", {}),
    "partial_lora": ("partial_lora", {"densities": 0.5}),
}
DTYPES = ["fp32", "bf16", "nf4"]
PATHS = ["save_pretrained", "safetensors", "trainer", "peft", "merge", "copy", "eval"]
RANK = 4
DROPOUT = 0.1


def _original(dtype):
    # one block; intermediate 128 so that every layer's width suits NF4 (multiples of 64)
    return tiny_llama(layers=1, intermediate=128, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)


@pytest.fixture(scope="module")
def batch():
    return token_batches(128, n_batches=1, batch=2, seq=12)[0]


@pytest.fixture(scope="module")
def adapted():
    """``adapted(method, dtype)``: ``(original, a freshly adapted model)``, both ``eval()``. Each call
    adapts anew (apply's own tensors, as a user has them: copies would hide layout or storage
    sharing); the original and CorDA's calibration are built once per dtype."""
    originals, calibrations = {}, {}

    def get(method, dtype):
        if dtype == "nf4":
            pytest.importorskip("bitsandbytes")
        if dtype not in originals:
            originals[dtype] = _original(dtype)
        original = originals[dtype]
        name, options = METHODS[method]
        if name == "corda":
            if dtype not in calibrations:
                calibrations[dtype] = ck.calibrate(original, token_batches(128, n_batches=2), progress=False)
            options = {**options, "covariances": calibrations[dtype]}
        model = ck.apply(
            copy.deepcopy(original),
            name,
            rank=RANK,
            dropout=DROPOUT,
            quantize="nf4" if dtype == "nf4" else None,
            progress=False,
            **options,
        )
        return original, model

    return get


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _trained(model):
    """``model`` with its trainable tensors moved away from their init by 10% of their spread, in
    place (LoRA's B = 0 would hide mistakes: it moves by 0.01)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                spread = p.float().std().item() if p.numel() > 1 else 0.0
                p.add_((0.1 * (spread or 0.1) * torch.randn(p.shape, generator=g)).to(p.dtype))
    return model


def _scrambled(model):
    """A copy of the same structure whose every tensor holds other values (a load must overwrite all)."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in model.state_dict().values():  # what a checkpoint holds (not e.g. rotary inv_freq)
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
            elif t.dtype == torch.uint8:
                t.copy_(torch.randint(0, 256, t.shape, generator=g).to(t.dtype))
    return model


def _tolerance(dtype, reference):
    return (1e-5 if dtype != "bf16" else 2e-2) * reference.abs().max()


def _run(path, method, dtype, adapted, batch, tmp_path):
    globals()["_check_" + path](lambda: adapted(method, dtype), dtype, batch, tmp_path)


CASES = [(m, d, p) for p in PATHS for m in METHODS for d in DTYPES]


@pytest.mark.parametrize("method, dtype, path", CASES, ids=[f"{p}-{m}-{d}" for m, d, p in CASES])
def test_path(method, dtype, path, adapted, batch, tmp_path):
    _run(path, method, dtype, adapted, batch, tmp_path)


def _check_save_pretrained(make, dtype, batch, tmp_path):
    from safetensors.torch import load_file

    model = _trained(make()[1])
    model.save_pretrained(tmp_path / "saved")
    state = model.state_dict()
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == state.keys()
    fresh = _scrambled(model)
    fresh.load_state_dict(saved, strict=True)
    for key, value in fresh.state_dict().items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))


def _check_safetensors(make, dtype, batch, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _trained(make()[1])
    state = model.state_dict()
    save_file(state, tmp_path / "state.safetensors")
    loaded = load_file(tmp_path / "state.safetensors")
    assert loaded.keys() == state.keys()
    for key, value in loaded.items():
        assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=8, seq=12):
        self.ids = torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(11))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _make_trainer(model, out):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_steps=3,
        save_steps=2,
        save_strategy="steps",
        logging_steps=1,
        report_to=[],
        seed=5,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=_Rows())


def _check_trainer(make, dtype, batch, tmp_path):
    model = make()[1]
    full = _make_trainer(make()[1].train(), tmp_path / "full")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    resumed = _make_trainer(make()[1].train(), tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    trained = dict(full.model.named_parameters())
    changed = [n for n, p in trained.items() if p.requires_grad and not torch.equal(p, model.get_parameter(n))]
    assert changed  # the adapters trained
    for name, p in resumed.model.named_parameters():
        assert torch.equal(p, trained[name]), name
    for name, b in resumed.model.named_buffers():
        assert torch.equal(b, full.model.get_buffer(name)), name


def _check_peft(make, dtype, batch, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = _trained(make()[1])
    residual, adapter = str(tmp_path / "residual"), str(tmp_path / "adapter")
    ck.save_residual_model(model, residual)
    ck.save_peft_adapter(model, adapter, residual_model=residual)
    base = AutoModelForCausalLM.from_pretrained(residual, dtype=model.dtype)
    for module in base.modules():  # bitsandbytes' CPU 4-bit layers repack for bf16 kernels in eval otherwise
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    loaded = peft.PeftModel.from_pretrained(base, adapter).eval()
    want, got = _logits(model, batch), _logits(loaded, batch)
    assert (got.float() - want.float()).abs().max() <= _tolerance(dtype, want.float())


def _check_merge(make, dtype, batch, tmp_path):
    model = _trained(make()[1])
    want = _logits(model, batch)
    merged = ck.merge(copy.deepcopy(model))
    assert not any(isinstance(m, ck.LowRankLinear) for m in merged.modules())
    assert all(not m.training for m in merged.modules())
    got = _logits(merged, batch)
    assert (got.float() - want.float()).abs().max() <= _tolerance(dtype, want.float())
    if dtype == "nf4":  # the layer itself cannot merge into codes; it says so
        layer = next(m for m in model.modules() if isinstance(m, ck.LowRankLinear))
        with pytest.raises(ValueError, match="the base is quantized"):
            layer.merge()


def _check_copy(make, dtype, batch, tmp_path):
    model = _trained(make()[1])
    want = _logits(model, batch)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)]
    for other in copies:
        assert torch.equal(_logits(other, batch), want)
        assert all(a.training == b.training for a, b in zip(other.modules(), model.modules()))


def _check_eval(make, dtype, batch, tmp_path):
    original, model = make()
    layers = [m for m in model.modules() if isinstance(m, ck.LowRankLinear)]
    assert len(layers) == 7 and all(m.dropout == DROPOUT and not m.training for m in layers)
    first, second = _logits(model, batch), _logits(model, batch)
    assert torch.equal(first, second)
    if dtype != "nf4":  # quantizing the residual changes the outputs by design
        want = _logits(original, batch)
        bound = 1e-4 * want.abs().max() if dtype == "fp32" else 4e-2 * want.float().abs().max()
        assert (first.float() - want.float()).abs().max() <= bound
