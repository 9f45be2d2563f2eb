"""apply_blockwise: the same adapters as whole-model calibration, one block in memory at a time."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import corda_kernels as ck
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
    def init_batch(self, weights, covariances, rank, scale, names, seed):
        if names[0].startswith("model.layers.2."):
            raise RuntimeError("decomposition failed")
        return super().init_batch(weights, covariances, rank, scale, names, seed)


@pytest.mark.parametrize("undo", ["cpu", "reconstruct"])
def test_failure_leaves_model_unchanged(undo):
    model = tiny_llama(layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="decomposition failed"):
        ck.apply_blockwise(
            model, token_batches(128, n_batches=2), FailOnThirdBlock(), rank=4, undo=undo, progress=False
        )
    assert not _adapters(model)
    assert all(isinstance(model.get_submodule(f"model.layers.{i}.mlp.up_proj"), nn.Linear) for i in range(3))
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        if undo == "cpu":
            assert torch.equal(before[k], after[k]), k
        else:  # rebuilt as W' + s·B·A in fp32: within one rounding
            torch.testing.assert_close(after[k], before[k], rtol=2e-7, atol=2e-7)


class RecordReplacedAlive(MiLoRA):
    """Records, when block 2 is decomposed, which of block 0's original layers are still alive."""

    def __init__(self, originals):
        super().__init__()
        self.originals, self.alive = originals, None

    def init_batch(self, weights, covariances, rank, scale, names, seed):
        if names[0].startswith("model.layers.2.") and self.alive is None:
            gc.collect()
            self.alive = [ref() is not None for ref in self.originals]
        return super().init_batch(weights, covariances, rank, scale, names, seed)


@pytest.mark.parametrize("undo", ["cpu", "reconstruct"])
def test_replaced_layers_are_released_unless_kept_for_undo(undo):
    model = tiny_llama(layers=3)
    originals = [
        weakref.ref(m) for n, m in model.named_modules() if n.startswith("model.layers.0.") and isinstance(m, nn.Linear)
    ]
    method = RecordReplacedAlive(originals)
    ck.apply_blockwise(model, token_batches(128, n_batches=2), method, rank=4, undo=undo, progress=False)
    assert len(method.alive) == 7
    assert all(method.alive) if undo == "cpu" else not any(method.alive)


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
