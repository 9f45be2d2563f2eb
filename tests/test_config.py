"""AdaptConfig: one configuration for apply, apply_blockwise, estimate_memory and the CLI, validated
once, serializable (report.json, the decomposition cache's manifest); keyword calls keep working."""

import glob
import json
import math

import pytest
import torch

import corda_kernels as ck
from corda_kernels import AdaptConfig
from corda_kernels.methods import PiSSA
from corda_kernels.testing import tiny_llama, token_batches


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_keyword_options_and_a_config_build_the_same_adapters():
    batches = token_batches(128, n_batches=2)
    cal = ck.calibrate(tiny_llama(), batches, progress=False)
    by_keywords = ck.apply(tiny_llama(), "corda", rank=4, alpha=8, mode="kpa", covariances=cal, progress=False)
    config = AdaptConfig(method="corda", method_options={"mode": "kpa"}, rank=4, alpha=8)
    by_config = ck.apply(tiny_llama(), config, covariances=cal, progress=False)
    a, b = _state(by_keywords), _state(by_config)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a config's fields overridden by keywords, the method's options merged
    override = ck.apply(tiny_llama(), config, rank=2, covariances=cal, progress=False)
    assert override.model.layers[0].self_attn.q_proj.rank == 2
    assert config.replace(damp=0.1).method_options == {"mode": "kpa", "damp": 0.1}
    assert ck.apply(tiny_llama(), method="pissa", rank=2, progress=False).model.layers[0].mlp.up_proj.rank == 2


def test_blockwise_and_estimate_take_the_same_config():
    config = AdaptConfig(method="pissa", rank=4, target_modules=["q_proj", "v_proj"])
    batches = token_batches(128, n_batches=2)
    model = ck.apply_blockwise(tiny_llama(), batches, config, progress=False)
    adapted = sorted(n for n, m in model.named_modules() if isinstance(m, ck.LowRankLinear))
    assert adapted == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    estimate = ck.estimate_memory(tiny_llama(), config, batch_size=2, seq_len=16, n_batches=2)
    assert "pissa rank 4" in estimate.summary() and "4 target layers" in estimate.summary()


@pytest.mark.parametrize(
    "fields, error, text",
    [
        ({"rank": 0}, ValueError, "AdaptConfig: rank must be a positive integer, got 0"),
        ({"rank": 2.5}, ValueError, "rank must be a positive integer, got 2.5"),
        ({"rank": True}, ValueError, "rank must be a positive integer, got True"),
        ({"alpha": 0}, ValueError, "alpha must be a positive finite number"),
        ({"alpha": math.nan}, ValueError, "alpha must be a positive finite number"),
        ({"alpha": "8"}, TypeError, "alpha must be a positive number, got str '8'"),
        ({"dropout": 1.0}, ValueError, "AdaptConfig: dropout must be in [0, 1), got 1.0"),
        ({"method": "qlora"}, ValueError, "unknown method 'qlora'"),
        ({"method": 3}, TypeError, "method must be a name or an InitMethod, got int"),
        ({"method": PiSSA(), "method_options": {"svd": "exact"}}, ValueError, "given with an already built method"),
        ({"quantize": "nf3"}, ValueError, "quantize must be one of"),
        ({"quantize": "nf4", "quantize_iters": 101}, ValueError, "quantize_iters"),
        ({"quantize_iters": 1}, ValueError, "quantize_iters"),
        ({"seed": "0"}, TypeError, "seed must be an int"),
        ({"rank_pattern": [("q_proj", 2)]}, TypeError, "rank_pattern must be a mapping"),
        ({"max_batch_bytes": 0}, ValueError, "max_batch_bytes must be a positive int"),
    ],
)
def test_bad_fields_are_refused_when_the_config_is_made(fields, error, text):
    with pytest.raises(error, match=__import__("re").escape(text)):
        AdaptConfig(**fields)


def test_errors_name_the_call_that_built_the_config():
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(ValueError, match=r"^apply_blockwise: dropout must be in \[0, 1\)"):
        ck.apply_blockwise(model, token_batches(128, n_batches=1), "pissa", dropout=2.0, progress=False)
    with pytest.raises(ValueError, match=r"^estimate_memory: rank must be a positive integer"):
        ck.estimate_memory(model, "pissa", rank=0, batch_size=1, seq_len=4, n_batches=1)
    with pytest.raises(TypeError, match="method 'corda'"):
        ck.apply(model, "corda", rank=2, not_an_option=1, progress=False)
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_round_trips_through_json():
    config = AdaptConfig(
        method="partial_lora",
        method_options={"densities": 0.5},
        rank=8,
        alpha=16.0,
        rank_pattern={"q_proj": 4},
        target_modules=["q_proj", "up_proj"],
        dropout=0.05,
        quantize="int8",
        quantize_iters=2,
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert AdaptConfig.from_dict(data) == config
    with pytest.raises(ValueError, match=r"unknown keys \['rnak'\]"):
        AdaptConfig.from_dict({"rnak": 8})
    built = AdaptConfig(method=PiSSA())  # a built method is recorded by its description
    assert built.to_dict()["method"] == "pissa"
    few_shot = AdaptConfig(method="partial_lora", method_options={"few_shot": token_batches(128, n_batches=1)})
    text = json.dumps(few_shot.to_dict())  # data is summarized, not dumped
    assert "tensor[2, 12] int64" in text and len(text) < 2000


def test_the_cache_manifest_records_the_config(tmp_path):
    config = AdaptConfig(method="pissa", rank=3, target_modules=["q_proj"])
    ck.apply(tiny_llama(), config, cache_dir=str(tmp_path), progress=False)
    manifests = glob.glob(str(tmp_path / "*" / "*.json"))
    assert len(manifests) == 2  # one q_proj per block
    for path in manifests:
        with open(path) as fh:
            assert json.load(fh)["settings"] == config.to_dict()
