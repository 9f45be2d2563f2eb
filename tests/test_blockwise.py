"""apply_blockwise: the same adapters as whole-model calibration, one block in memory at a time."""

import copy
import gc
import re
import weakref

import pytest
import torch
from torch import nn

import corda_kernels as ck
from corda_kernels import adapt, blockwise
from corda_kernels.decomposition import refinement as quantized_stage
from corda_kernels.methods import MiLoRA
from corda_kernels.testing import tiny_llama, token_batches


def _adapters(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, ck.LowRankLinear)}


def _whole_model(model, batches, **kw):
    ref = copy.deepcopy(model)
    cal = ck.calibrate(ref, batches, progress=False)
    return ck.apply(ref, "corda", covariances=cal, progress=False, **kw)


@pytest.mark.parametrize("mode", ["kpa", "ipa"])
@pytest.mark.parametrize("inputs_device", [None, "cpu"])
def test_same_adapters_as_whole_model(mode, inputs_device):
    model = tiny_llama(layers=3)
    batches = token_batches(128, n_batches=3, batch=2, seq=12)
    ref = _whole_model(model, batches, mode=mode, rank=4)
    blockwise = ck.apply_blockwise(
        copy.deepcopy(model), batches, "corda", mode=mode, rank=4, block_inputs_device=inputs_device, progress=False
    )
    ours, theirs = _adapters(blockwise), _adapters(ref)
    assert ours.keys() == theirs.keys() and len(ours) == 21
    for name, layer in ours.items():
        other = theirs[name]
        torch.testing.assert_close(layer.weight, other.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.B @ layer.A, other.B @ other.A, rtol=0, atol=1e-6)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(blockwise(ids).logits, model(ids).logits, rtol=0, atol=1e-4)
    assert all(not p.requires_grad for n, p in blockwise.named_parameters() if not n.endswith((".A", ".B")))


class FailOnThirdBlock(MiLoRA):
    def init_batch(self, batch):
        if batch.names[0].startswith("model.layers.2."):
            raise RuntimeError("decomposition failed")
        return super().init_batch(batch)


def _snapshot(model):
    """What a failed run must give back: every tensor (bit for bit), module object, flag."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": dict(model.named_modules()),
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _assert_as_before(model, before):
    assert dict(model.named_modules()) == before["modules"]  # the very same module objects
    assert {n: m.training for n, m in model.named_modules()} == before["training"]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before["requires_grad"]
    after = model.state_dict()
    assert after.keys() == before["state"].keys()
    changed = [k for k, v in before["state"].items() if v.dtype != after[k].dtype or not torch.equal(v, after[k])]
    assert not changed, changed
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
    for k, v in before["state"].items():  # also -0.0 against +0.0
        if v.dtype in bits:
            assert torch.equal(v.view(bits[v.dtype]), after[k].view(bits[v.dtype])), k


def _fail_decomposing_block(monkeypatch, index: int) -> None:
    """``adapt.decompose`` (block-wise runs decompose through it) raises on block ``index``'s layers."""
    real = adapt.decompose

    def fail(targets, *args, **kwargs):
        if next(iter(targets)).startswith(f"model.layers.{index}."):
            raise RuntimeError("decomposition failed")
        return real(targets, *args, **kwargs)

    monkeypatch.setattr(adapt, "decompose", fail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["corda", "pissa", "milora", "siva", "lora", "asymmetric", "partial_lora"])
@pytest.mark.parametrize("undo", ["cpu", "reconstruct"])
def test_failure_leaves_model_unchanged(undo, method, dtype, monkeypatch):
    """A failure in block 2 puts blocks 0 and 1 back bit for bit, whatever the method, dtype and undo
    mode (``undo="reconstruct"`` rebuilt W' + s·B·A, within one rounding, before)."""
    model = tiny_llama(layers=3, dtype=dtype)
    model.model.layers[0].train()  # modes and requires_grad flags come back as they were, too
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    before = _snapshot(model)
    options = {"densities": 0.5} if method == "partial_lora" else {}
    _fail_decomposing_block(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="decomposition failed"):
        ck.apply_blockwise(model, token_batches(128, n_batches=2), method, rank=4, undo=undo, progress=False, **options)
    _assert_as_before(model, before)


# The stages one block goes through, each interrupted (KeyboardInterrupt, as Ctrl-C) while block 1
# runs, after block 0 was adapted: (stage, module, function, the call that is interrupted, after it ran).
_STAGES = {
    "capture inputs": ("blockwise", "capture_block_inputs", 1, False),
    "run block 1": ("blockwise", "_run_block", 2, False),
    "decompose block 1": ("adapt", "decompose", 2, False),
    "quantize layer 3 of block 1": ("quantized", "quantize_weight", 10, False),
    "build layer 3 of block 1": ("adapt", "build_module", 10, False),
    "block 1 swapped": ("blockwise", "_swap_block", 2, True),
    "freeze after the last block": ("adapt", "freeze_all_but_adapters", 1, False),
}
_CASES = [
    (undo, quantize, stage)
    for undo in ("cpu", "reconstruct")
    for quantize in (None, "nf4", "int8")
    for stage in _STAGES
    if quantize is not None or not stage.startswith("quantize")
]


def _interrupt_at(monkeypatch, owner, name, at: int, after: bool) -> list:
    """``owner.name`` raises KeyboardInterrupt at its ``at``-th call (once it ran, with ``after``);
    returns the list its calls are appended to."""
    real, calls = getattr(owner, name), []

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == at and not after:
            raise KeyboardInterrupt
        result = real(*args, **kwargs)
        if len(calls) == at:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(owner, name, interrupt)
    return calls


@pytest.mark.parametrize(
    "undo, quantize, stage", _CASES, ids=["-".join(map(str, case)).replace(" ", "_") for case in _CASES]
)
def test_interrupted_at_every_stage_gives_the_original_back(undo, quantize, stage, monkeypatch):
    """Ctrl-C at any stage of a block-wise run leaves the original model, bit for bit, in every undo
    mode and with every residual format; undo="reconstruct" cannot rebuild the original from a
    quantized residual (NF4 moved weights by 12% of max |W|) and is refused before anything runs."""
    if quantize is not None:
        pytest.importorskip("bitsandbytes")
    model = tiny_llama(layers=2, intermediate=128)  # NF4 needs in_features divisible by 64
    before = _snapshot(model)
    where, name, interrupted, after = _STAGES[stage]
    owner = {"blockwise": blockwise, "adapt": adapt, "quantized": quantized_stage}[where]
    calls = _interrupt_at(monkeypatch, owner, name, interrupted, after)
    run = lambda: ck.apply_blockwise(  # noqa: E731
        model, token_batches(128, n_batches=2), "corda", rank=4, undo=undo, quantize=quantize, progress=False
    )
    try:  # a KeyboardInterrupt escaping the test would stop the whole pytest session
        run()
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
    except ValueError as exc:
        outcome = str(exc)
    if undo == "reconstruct" and quantize is not None:
        assert re.search(f"undo='reconstruct' cannot rebuild .*quantize='{quantize}'.* undo='cpu'", outcome), outcome
        assert not calls  # refused before anything ran
    else:
        assert outcome == "interrupted" and len(calls) == interrupted
    _assert_as_before(model, before)


class RecordReplacedAlive(MiLoRA):
    """Records, when block 2 is decomposed, which of block 0's original weights are still alive."""

    def __init__(self, originals):
        super().__init__()
        self.originals, self.alive = originals, None

    def init_batch(self, batch):
        if batch.names[0].startswith("model.layers.2.") and self.alive is None:
            gc.collect()
            self.alive = [ref() is not None and ref().weight.numel() > 0 for ref in self.originals]
        return super().init_batch(batch)


@pytest.mark.parametrize("undo", ["cpu", "reconstruct"])
def test_replaced_layers_are_released_unless_kept_for_undo(undo):
    """undo="cpu" keeps the replaced layers whole; undo="reconstruct" keeps the module objects (so a
    failed run gives the same ones back) without their weights, and a small correction instead."""
    model = tiny_llama(layers=3)
    originals = [
        weakref.ref(m) for n, m in model.named_modules() if n.startswith("model.layers.0.") and isinstance(m, nn.Linear)
    ]
    method = RecordReplacedAlive(originals)
    ck.apply_blockwise(model, token_batches(128, n_batches=2), method, rank=4, undo=undo, progress=False)
    assert len(method.alive) == 7
    assert all(method.alive) if undo == "cpu" else not any(method.alive)
    gc.collect()
    assert not any(ref() is not None for ref in originals)  # all released once the run succeeded


def test_reconstruct_keeps_a_small_fraction_of_the_weights():
    """The correction undo="reconstruct" keeps per layer is a fraction of the weight it replaces."""
    from corda_kernels.blockwise import _Rebuild

    for dtype, bound in ((torch.float32, 0.15), (torch.bfloat16, 0.3)):
        model = tiny_llama(layers=1, dtype=dtype, hidden=128, intermediate=256)
        cal = ck.calibrate(model, token_batches(128), progress=False)
        originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        ck.apply(model, "corda", rank=8, covariances=cal, progress=False)
        for name, layer in _adapters(model).items():
            rebuild = _Rebuild(layer, originals[name])
            weight, exact = rebuild.weight(layer)
            assert exact and torch.equal(
                weight.view(torch.int16 if dtype != torch.float32 else torch.int32),
                originals[name].view(torch.int16 if dtype != torch.float32 else torch.int32),
            )
            assert rebuild.nbytes() < bound * originals[name].numel() * originals[name].element_size(), name


def test_targets_outside_the_stack_are_refused():
    model = tiny_llama(layers=2)
    with pytest.raises(ValueError, match="inside model.layers only"):
        ck.apply_blockwise(
            model,
            token_batches(128, n_batches=1),
            "corda",
            rank=2,
            target_modules=["lm_head", "q_proj"],
            progress=False,
        )
    with pytest.raises(ValueError, match="empty"):
        ck.apply_blockwise(model, [], "corda", rank=2, progress=False)
    with pytest.raises(ValueError, match="undo must be"):
        ck.apply_blockwise(model, token_batches(128, n_batches=1), "corda", rank=2, undo="disk", progress=False)


def test_a_rebuild_that_comes_out_differently_is_reported(monkeypatch):
    """Should the adapter's product come out differently on undo than when the layer was adapted
    (another device, a nondeterministic kernel), the fingerprint check says so instead of silence."""
    model = tiny_llama(layers=2)
    real, calls = blockwise._rebuilt, []

    def drifting(layer):
        calls.append(layer)
        weight = real(layer)
        if len(calls) > 7:  # on undo: one entry one unit in the last place off
            weight.view(torch.int32).view(-1)[0] += 1
        return weight

    monkeypatch.setattr(blockwise, "_rebuilt", drifting)
    _fail_decomposing_block(monkeypatch, 1)
    with pytest.warns(ck.CordaWarning, match=r"undo could not rebuild .*model\.layers\.0\..* bit for bit"):
        with pytest.raises(RuntimeError, match="decomposition failed"):
            ck.apply_blockwise(
                model, token_batches(128, n_batches=2), "pissa", rank=4, undo="reconstruct", progress=False
            )
    assert not _adapters(model)


# ---------------------------------------------------------------------------------------------
# a further named adapter, block by block (apply_blockwise(adapter_name=, initial=))


def _adapted(first, tmp_path, dtype=torch.float32, spiked=False):
    """(base model, calibration batches, its covariances, the model with ``first`` as its first
    adapter, moved off its init, and the directory of that adapter's initial factors). ``spiked``:
    each weight gets a dominant rank-4 part, as trained weights have, so that the residual is small
    next to ``s·B0·A0`` and ``(W' + s·B0·A0) − s·B0·A0`` rounds off some of its bits."""
    torch.manual_seed(0)
    base = tiny_llama(layers=3, dtype=dtype).eval()
    if spiked:
        with torch.no_grad():
            for layer in base.model.layers.modules():
                if isinstance(layer, nn.Linear):
                    out_f, in_f = layer.weight.shape
                    layer.weight.add_((torch.randn(out_f, 4) @ torch.randn(4, in_f)).to(dtype))
    batches = token_batches(128, n_batches=3, batch=2, seq=12)
    cal = ck.calibrate(base, batches, progress=False)
    model = ck.apply(copy.deepcopy(base), first, rank=4, covariances=cal, progress=False)
    initial = str(tmp_path / "initial")
    ck.save_peft_adapter(model, initial)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained: block-wise must still calibrate on the original, as calibrate(base) did
        for layer in _adapters(model).values():
            layer.B.add_(0.05 * torch.randn(layer.B.shape, generator=g, dtype=layer.B.dtype))
    return base, batches, cal, model, initial


@pytest.mark.parametrize(
    "first, second",
    [("pissa", "corda"), ("lora", "corda"), ("corda", "pissa"), ("pissa", "lora"), ("pissa", "partial_lora")],
)
def test_further_adapter_same_as_whole_model(first, second, tmp_path):
    """Partial-LoRA too: ratios from its few-shot measure (a whole-model run), the same index sets."""
    base, batches, cal, model, initial = _adapted(first, tmp_path)
    options = dict(rank=3, adapter_name="b", initial=initial if first != "lora" else None, progress=False)
    if second == "partial_lora":
        options["few_shot"] = batches[:1]
    if first != "lora":  # the base as the model gives it back, W' + s·B0·A0 (one rounding off): calibrate that
        rebuilt = ck.apply(copy.deepcopy(model), "lora", rank=1, adapter_name="probe", initial=initial, progress=False)
        originals = copy.deepcopy(base)
        with torch.no_grad():
            for name, layer in _adapters(rebuilt).items():
                originals.get_submodule(name).weight.copy_(layer.weight)
        cal = ck.calibrate(originals, batches, progress=False)
    ref = ck.apply(copy.deepcopy(model), second, covariances=cal, **options)
    ours = ck.apply_blockwise(copy.deepcopy(model), batches, second, **options)
    assert ck.adapter_names(ours) == ("default", "b")
    mine, theirs = _adapters(ours), _adapters(ref)
    assert mine.keys() == theirs.keys() and len(mine) == 21
    for name, layer in mine.items():
        other = theirs[name]
        assert layer.active_adapter == "default" and not layer.base_changed
        torch.testing.assert_close(layer.weight, other.weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.weight, base.get_submodule(name).weight, rtol=0, atol=1e-6)
        new, want = layer.adapter("b"), other.adapter("b")
        torch.testing.assert_close(new.B @ new.A, want.B @ want.A, rtol=0, atol=1e-6)
        for index in ("row_index", "col_index"):  # Partial-LoRA's sets, from ratios measured on the original
            assert (getattr(new, index) is None) == (getattr(want, index) is None)
            assert getattr(new, index) is None or torch.equal(getattr(new, index), getattr(want, index))
        assert (new.A0 is None) == (second in ("lora", "partial_lora")) == (want.A0 is None)
        if new.A0 is not None:
            torch.testing.assert_close(new.B0 @ new.A0, want.B0 @ want.A0, rtol=0, atol=1e-6)
        assert (getattr(layer, "A0", None) is None) == (first == "lora")
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        ck.set_adapter(ours, "b")
        torch.testing.assert_close(ours(ids).logits, base(ids).logits, rtol=0, atol=1e-4)  # at init: the original
        ck.set_adapter(ours, "default")
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=0, atol=1e-4)


def test_further_adapter_refused_as_apply_refuses(tmp_path):
    _, batches, _, model, initial = _adapted("pissa", tmp_path)
    before = _snapshot(model)
    cases = [
        (
            dict(),
            ValueError,
            r"apply_blockwise\(adapter_name='b'\): layer model\.layers\.0\.self_attn\.q_proj .*initial=",
        ),
        (dict(initial=initial, dora=True), ValueError, "dora=True cannot be used for a further adapter"),
        (dict(initial=initial, target_modules=["q_proj"]), ValueError, r"layer model\.layers\.0\.\S+ is left out of"),
        (dict(initial=initial, rank=999), ValueError, r"rank 999 exceeds layer model\.layers\.0\.self_attn\.q_proj"),
    ]
    for extra, error, message in cases:
        with pytest.raises(error, match=message):
            ck.apply_blockwise(model, batches, "lora", **{"rank": 2, **extra}, adapter_name="b", progress=False)
    with pytest.raises(ValueError, match=r"apply_blockwise: initial= is for adding a further adapter"):
        ck.apply_blockwise(tiny_llama(layers=1), batches, "lora", rank=2, initial=initial, progress=False)
    with pytest.raises(ValueError, match=r"already holds an adapter named 'default'"):
        ck.apply_blockwise(model, batches, "lora", rank=2, adapter_name="default", initial=initial, progress=False)
    _assert_as_before(model, before)


def test_first_adapter_named_block_by_block():
    model = ck.apply_blockwise(
        tiny_llama(layers=2), token_batches(128, n_batches=2), "lora", rank=2, adapter_name="a", progress=False
    )
    assert ck.adapter_names(model) == ("a",)
    assert all(layer.active_adapter == "a" for layer in _adapters(model).values())


# A further adapter's run stopped (an error or Ctrl-C) after block 0 got it: (module, function, the
# call that fails, after it ran).
_FURTHER_STAGES = {
    "decompose block 2": ("adapt", "decompose", 3, False),
    "add to layer 3 of block 1": ("adapt", "_adapter_options", 10, False),
    "block 1 added": ("blockwise", "_add_block", 2, True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("undo", ["cpu", "reconstruct"])
@pytest.mark.parametrize("stage", list(_FURTHER_STAGES))
def test_further_adapter_failure_gives_the_model_back(stage, undo, dtype, tmp_path, monkeypatch):
    """The added adapter is deleted and every converted layer's residual base W' comes back bit for
    bit, also where ``(W' + s·B0·A0) − s·B0·A0`` rounds differently (here: a residual off by a unit
    in the last place from what W − s·B0·A0 gives on this machine, next to a large s·B0·A0)."""
    _, batches, _, model, initial = _adapted("pissa", tmp_path, dtype, spiked=True)
    with torch.no_grad():  # residuals rounded elsewhere (e.g. on a GPU): some entries a unit in the last place off
        for layer in _adapters(model).values():
            layer.weight.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]).view(-1)[::7] += 1
    model.model.layers[0].train()
    before = _snapshot(model)
    where, name, failing, after = _FURTHER_STAGES[stage]
    calls = _interrupt_at(monkeypatch, {"blockwise": blockwise, "adapt": adapt}[where], name, failing, after)
    try:  # a KeyboardInterrupt escaping the test would stop the whole pytest session
        ck.apply_blockwise(
            model, batches, "corda", rank=3, adapter_name="b", initial=initial, undo=undo, progress=False
        )
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
    assert outcome == "interrupted" and len(calls) == failing
    assert ck.adapter_names(model) == ("default",)
    assert all(layer.base_changed and getattr(layer, "A0", None) is None for layer in _adapters(model).values())
    _assert_as_before(model, before)


@pytest.mark.parametrize("undo", ["cpu", "reconstruct"])
def test_failed_block_comes_back_from_the_execution_device(undo, monkeypatch):
    """A block that fails while on ``execution_device`` is moved back home before the undo (here
    the CPU stands in for the device: each block's moves are recorded)."""
    model = tiny_llama(layers=3)
    before = _snapshot(model)
    moves = {i: [] for i in range(3)}
    for i, block in enumerate(model.model.layers):
        real_to = block.to

        def to(*args, _real=real_to, _i=i, **kwargs):
            moves[_i].append(torch.device(args[0]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(block, "to", to)
    _fail_decomposing_block(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="decomposition failed"):
        ck.apply_blockwise(
            model, token_batches(128, n_batches=2), "corda", rank=4, undo=undo, execution_device="cpu", progress=False
        )
    cpu = torch.device("cpu")
    assert moves[0] == [cpu, cpu] and moves[1] == [cpu, cpu] and moves[2] == []
    _assert_as_before(model, before)
