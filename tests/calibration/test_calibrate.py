"""calibrate(): shared inputs detected at run time, padding excluded, PEFT-compatible mode, errors."""

import pytest
import torch

import corda_kernels as ck
from corda_kernels.calibration import Calibration
from corda_kernels.testing import tiny_bert, tiny_gpt2, tiny_llama, token_batches


def _captured_inputs(model, batches, names):
    """Inputs each named layer received, with the batch's attention mask."""
    seen = {n: [] for n in names}
    handles = []
    for n in names:

        def hook(mod, args, n=n):
            seen[n].append(args[0].detach().clone())

        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return seen


def test_shared_inputs_share_one_covariance():
    model = tiny_llama(layers=2)
    cal = ck.calibrate(model, token_batches(128), progress=False)
    assert len(cal.groups) == 14 and len(cal.covariances) == 8
    for i in range(2):
        p = f"model.layers.{i}."
        q, k, v = (cal.groups[p + f"self_attn.{x}_proj"] for x in "qkv")
        assert q == k == v
        assert cal.groups[p + "mlp.gate_proj"] == cal.groups[p + "mlp.up_proj"]
        assert (
            len(
                {
                    q,
                    cal.groups[p + "self_attn.o_proj"],
                    cal.groups[p + "mlp.gate_proj"],
                    cal.groups[p + "mlp.down_proj"],
                }
            )
            == 4
        )
    assert "lm_head" not in cal.groups


def test_padding_excluded_and_per_token_mean():
    model = tiny_llama()
    batches = token_batches(128, n_batches=2, batch=3, seq=10)
    cal = ck.calibrate(model, batches, progress=False)
    name = "model.layers.1.mlp.down_proj"
    xs = _captured_inputs(model, batches, [name])[name]
    rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(xs, batches)]).double()
    expected = rows.T @ rows / rows.shape[0]
    torch.testing.assert_close(cal.covariance(name).double(), expected, rtol=1e-5, atol=1e-7)
    assert cal.token_counts[cal.groups[name]] == sum(int(b["attention_mask"].sum()) for b in batches)
    assert torch.equal(cal.covariance(name), cal.covariance(name).T)


def test_batch_size_does_not_change_the_result():
    """Padded batches of 3 give the covariances of unpadded batches of 1 (padding really excluded)."""
    model = tiny_llama()
    padded = token_batches(128, n_batches=2, batch=3, seq=10, seed=4)
    singles = []
    for b in padded:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            n = int(mask.sum())
            singles.append({"input_ids": ids[None, :n], "attention_mask": mask[None, :n]})
    a = ck.calibrate(model, padded, progress=False)
    b = ck.calibrate(model, singles, progress=False)
    assert a.groups == b.groups and a.token_counts == b.token_counts
    for g in a.covariances:
        torch.testing.assert_close(a.covariances[g], b.covariances[g], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make,shared", [(tiny_gpt2, 0), (tiny_bert, 2)], ids=["gpt2-conv1d", "bert"])
def test_other_architectures(make, shared):
    model = make()
    cal = ck.calibrate(model, token_batches(100, seq=8), progress=False)
    # GPT-2's fused c_attn shares nothing; BERT's query/key/value share one input per layer.
    assert len(cal.groups) - len(cal.covariances) == shared * 2
    for name, module in model.named_modules():
        if name in cal.groups:
            in_features = module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.in_features
            assert cal.covariance(name).shape == (in_features, in_features)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model32 = tiny_llama()
    model16 = tiny_llama(dtype=dtype)
    batches = token_batches(128, n_batches=1)
    c32 = ck.calibrate(model32, batches, progress=False)
    c16 = ck.calibrate(model16, batches, progress=False)
    for g, c in c16.covariances.items():
        assert c.dtype == torch.float32
        rel = (c - c32.covariances[g]).norm() / c32.covariances[g].norm()
        assert rel < 0.05, g


def test_peft_normalization_matches_peft():
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import calib_cov_distribution

    model = tiny_llama()
    batches = token_batches(128, n_batches=3, batch=1, seq=9, pad_last=False)
    ours = ck.calibrate(model, batches, normalization="peft", progress=False)
    config = LoraConfig(init_lora_weights="corda", target_modules=list(ours.groups), corda_config=CordaConfig())

    def run_model():
        for b in batches:
            model(**b)

    with torch.no_grad():
        calib_cov_distribution(model, config, run_model, None, None)
    for name in ours.groups:
        peft_cov = model.get_submodule(name).covariance_matrix
        torch.testing.assert_close(ours.covariance(name), peft_cov, rtol=1e-5, atol=1e-7)


def test_save_load_round_trip(tmp_path):
    model = tiny_llama(layers=1)
    cal = ck.calibrate(model, token_batches(128, n_batches=1), progress=False)
    cal.save(str(tmp_path))
    back = Calibration.load(str(tmp_path))
    assert back.groups == cal.groups and back.token_counts == cal.token_counts
    for g in cal.covariances:
        assert torch.equal(back.covariances[g], cal.covariances[g])
    assert set(back.per_module()) == set(cal.groups)


def test_nan_weights_name_the_parameter_nan_inputs_the_layer_and_batch():
    model = tiny_llama()
    batches = token_batches(128, n_batches=3, pad_last=False)
    bad_token = next(int(t) for t in batches[1]["input_ids"].flatten() if t not in batches[0]["input_ids"])
    with torch.no_grad():
        model.model.embed_tokens.weight[bad_token] = float("nan")
    # the NaN row would first surface in layer 0's input at batch 1: the weight itself is named
    with pytest.raises(FloatingPointError, match=r"parameter model\.embed_tokens\.weight holds NaN"):
        ck.calibrate(model, batches, progress=False)
    model = tiny_llama()
    calls = []

    def overflow(module, args):  # an activation overflowing to inf in batch 1 only
        calls.append(1)
        return (args[0] * float("inf"),) if len(calls) == 3 else None

    model.model.layers[0].input_layernorm.register_forward_pre_hook(overflow)  # calls: probe, batch 0, batch 1
    with pytest.raises(FloatingPointError, match=r"model\.layers\.0\.self_attn\.q_proj \(batch 1\)"):
        ck.calibrate(model, batches, progress=False)


def test_bad_data_is_refused():
    model = tiny_llama(layers=1)
    with pytest.raises(ValueError, match="empty"):
        ck.calibrate(model, [], progress=False)
    padding = token_batches(128, n_batches=1)
    padding[0]["attention_mask"].zero_()
    with pytest.raises(ValueError, match="saw no tokens"):
        ck.calibrate(model, padding, progress=False)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ck.calibrate(model, [{"input_ids": torch.zeros(1, 300, dtype=torch.long)}], progress=False)
    with pytest.raises(TypeError, match="input_ids"):
        ck.calibrate(model, [torch.zeros(1, 4, dtype=torch.long)], progress=False)
    with pytest.raises(ValueError, match=r"matched no .*close names: \['q_proj'"):
        ck.calibrate(model, token_batches(128, n_batches=1), target_modules=["q_prj"], progress=False)
    with pytest.raises(ValueError, match="normalization"):
        ck.calibrate(model, token_batches(128, n_batches=1), normalization="max", progress=False)


def test_targets_by_regex_and_max_batches():
    model = tiny_llama()
    cal = ck.calibrate(
        model, token_batches(128, n_batches=4), target_modules=r".*\.mlp\.(up|down)_proj", max_batches=2, progress=False
    )
    assert sorted(n.split(".", 2)[2] for n in cal.groups) == [
        "0.mlp.down_proj",
        "0.mlp.up_proj",
        "1.mlp.down_proj",
        "1.mlp.up_proj",
    ]
    assert cal.batches == 2


def test_forward_stops_after_the_last_target():
    """Every batch stops after the last target (norm, lm_head skipped); only the 2-token probe that
    counts the targets' calls per forward runs the whole model."""
    model = tiny_llama()
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    batches = token_batches(128, n_batches=3)
    cal = ck.calibrate(model, batches, progress=False)
    assert len(calls) == 1
    model.lm_head._forward_hooks.clear()
    with_lm_head = ck.calibrate(model, batches, target_modules=["q_proj", "lm_head"], progress=False)
    assert "lm_head" in with_lm_head.groups
    for g in cal.covariances:
        if g in with_lm_head.covariances:
            assert torch.equal(cal.covariances[g], with_lm_head.covariances[g])


def _t5_batches(decoder_mask: bool, dec_len: int = 8):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(2):
        ids = torch.randint(1, 100, (2, 8), generator=g)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[0, 5:] = 0
        ids[0, 5:] = 0
        batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(1, 100, (2, dec_len))}
        if decoder_mask:
            dmask = torch.ones(2, dec_len, dtype=torch.long)
            dmask[1, 3:] = 0
            batch["decoder_attention_mask"] = dmask
        out.append(batch)
    return out


@pytest.mark.parametrize("decoder_mask", [False, True])
@pytest.mark.parametrize("dec_len", [8, 6])  # 8: the encoder's length, where the wrong mask still fits
def test_encoder_decoder_stacks_use_their_own_mask(decoder_mask, dec_len):
    from corda_kernels.testing import tiny_t5

    model = tiny_t5()
    batches = _t5_batches(decoder_mask, dec_len)
    # independent oracle: each layer's raw inputs over all batches, masked by the stack they belong to
    layers = {
        "encoder.block.0.layer.0.SelfAttention.q": "encoder",
        "decoder.block.0.layer.0.SelfAttention.q": "decoder",
        "decoder.block.1.layer.1.EncDecAttention.q": "decoder",
        "decoder.block.1.layer.1.EncDecAttention.k": "encoder",  # cross-attention reads the encoder output
        "decoder.block.1.layer.2.DenseReluDense.wi": "decoder",
    }
    seen = {name: [] for name in layers}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: seen[n].append(a[0].detach()))
        for name in layers
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in handles:
        h.remove()
    cal = ck.calibrate(model, batches, target_modules=list(layers), progress=False)
    for name, stack in layers.items():
        sums, count = 0, 0
        for x, batch in zip(seen[name], batches):
            mask = batch["attention_mask"] if stack == "encoder" else batch.get("decoder_attention_mask")
            rows = x.reshape(-1, x.shape[-1]).double()
            if mask is not None:
                rows = rows[mask.reshape(-1).bool()]
            sums, count = sums + rows.T @ rows, count + rows.shape[0]
        expected = (sums / count).float()
        assert cal.token_counts[cal.group(name)] == count, name
        torch.testing.assert_close(cal.covariance(name), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_calibration_forwards_keep_no_kv_cache_and_accumulators_exist_before_the_first_batch():
    """Calibration's forwards pass use_cache=False (a KV cache would hold every layer's keys and
    values until the forward returns), and every accumulator is allocated after the 2-token probe,
    before the first real forward (allocated between its activations they fragment the heap)."""
    model = tiny_llama(layers=2)
    batches = token_batches(128, n_batches=2, batch=2, seq=12)
    seen = []
    recorder_groups = []

    def spy(module, args, kwargs):
        seen.append(kwargs.get("use_cache"))
        if len(seen) == 2:  # the first real batch: the accumulators must all exist already
            import gc

            from corda_kernels.calibration.recorder import CovarianceRecorder

            live = [o for o in gc.get_objects() if isinstance(o, CovarianceRecorder)]
            recorder_groups.append({g: acc.count for r in live for g, acc in r.accumulators.items()})

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        result = ck.calibrate(model, batches, progress=False)
    finally:
        handle.remove()
    assert seen[1:] == [False, False]  # seen[0] is the probe
    assert set(recorder_groups[0]) == set(result.covariances) and set(recorder_groups[0].values()) == {0}
