"""torch.distributed: two gloo CPU processes agree with each other and with one process.

One launch of two worker processes (this file run as a script, ``RANK``/``WORLD_SIZE``/
``MASTER_ADDR``/``MASTER_PORT`` on 127.0.0.1 and a free port) runs every scenario in turn and
saves each rank's results after each one; the tests compare them with single-process runs here.
Startup (imports) dominates, hence one launch for the whole file.
"""

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import fields
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import corda_kernels as ck
from corda_kernels import distributed
from corda_kernels.calibration import sharding as calibration_sharding
from corda_kernels.decomposition import sharding as decomposition_sharding
from corda_kernels.integrations import hf
from corda_kernels.methods.base import InitMethod, LayerInit
from corda_kernels.testing import tiny_llama, token_batches

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = 2
TIMEOUT_S = 300
RANK_ARGS = dict(rank=4, alpha=8)


class AllFields(InitMethod):
    """A deterministic method that fills every LayerInit field (indices, diag, stats...)."""

    name = "all-fields"

    def init_batch(self, batch):
        weights, _, rank, scale, names, _ = batch
        out = []
        for w, name in zip(weights, names):
            rows, cols = torch.arange(0, w.shape[0], 2), torch.arange(1, w.shape[1], 3)
            sub = w[rows][:, cols]
            out.append(
                LayerInit(
                    A=sub[:rank].clone(),
                    B=sub[:, :rank].clone(),
                    scale=scale,
                    subtract=False,
                    diag=w.diagonal()[:rank].clone(),
                    row_index=rows,
                    col_index=cols,
                    trainable=("diag",),
                    stats={"name": name, "norm": float(w.norm())},
                )
            )
        return out


# -- shared between the workers and the single-process references ------------------------------
def _calibration(cal):
    return {
        "cov": cal.covariances,
        "groups": cal.groups,
        "counts": cal.token_counts,
        "batches": cal.batches,
        "tokens": cal.meta["tokens"],
    }


def _decompositions(process_group):
    from corda_kernels.decomposition import decompose
    from corda_kernels.methods import make_method

    model = tiny_llama()
    targets = hf.find_targets(model)
    cal = ck.calibrate(model, token_batches(128, n_batches=2, seed=1), progress=False, process_group=process_group)
    ranks, alphas = {n: 4 for n in targets}, {n: 8.0 for n in targets}
    options = {"pissa": {"svd": "exact"}, "corda-kpa": {"mode": "kpa"}, "corda-ipa": {"mode": "ipa", "svd": "exact"}}
    out = {}
    methods = {
        "all-fields": AllFields(),
        "pissa": "pissa",
        "milora": "milora",
        "corda-kpa": "corda",
        "corda-ipa": "corda",
    }
    for label, method in methods.items():
        method = make_method(method, **options.get(label, {}))
        inits = decompose(
            targets, method, ranks=ranks, alphas=alphas, covariances=cal, progress=False, process_group=process_group
        )
        out[label] = {name: {f.name: getattr(init, f.name) for f in fields(init)} for name, init in inits.items()}
    return out


def _train_batches():
    return token_batches(128, n_batches=3, batch=2 * WORLD, seq=10, seed=7, pad_last=False)


def _adapted_model(process_group, dtype=torch.float32):
    from corda_kernels.adapt import apply

    model = apply(
        tiny_llama(dtype=dtype), "pissa", svd="exact", progress=False, process_group=process_group, **RANK_ARGS
    )
    return model.train()


def _train(model, shard, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for batch in _train_batches():
        ids = batch["input_ids"][shard]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# -- worker scenarios (run on every rank) ------------------------------------------------------
def scenario_calibration(rank, out_dir):
    model = tiny_llama()
    batches = token_batches(128, n_batches=5, seed=3)
    with _small_buckets():  # many row blocks per covariance
        blocks = _calibration(ck.calibrate(model, batches, progress=False))
    return {
        "blocks": blocks,
        "stride": _calibration(ck.calibrate(model, batches, progress=False)),  # the default group, auto
        "local": _calibration(
            ck.calibrate(model, batches[rank::WORLD], shard="local", process_group=dist.group.WORLD, progress=False)
        ),
        "max_batches": _calibration(ck.calibrate(model, iter(batches), max_batches=3, progress=False)),
        "one_batch": _calibration(ck.calibrate(model, batches[:1], progress=False)),  # rank 1 sees no data
        "opt_out": _calibration(ck.calibrate(model, batches[:2], process_group=False, progress=False)),
    }


def scenario_resume(rank, out_dir):
    model = tiny_llama()
    batches = token_batches(128, n_batches=8, seed=5)
    ckpt = os.path.join(out_dir, "ckpt")

    def failing():  # rank 1 fails on reaching global batch 5 (after its batches 1 and 3)
        for i, batch in enumerate(batches):
            if rank == 1 and i == 5:
                raise RuntimeError("disk on fire")
            yield batch

    errors = {}
    try:
        ck.calibrate(model, failing(), checkpoint_dir=ckpt, checkpoint_every=1, progress=False)
    except Exception as exc:
        errors["failed"] = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(ckpt, f"rank-{rank}", "manifest.json")) as fh:
        manifest = fh.read()
    result = ck.calibrate(model, batches, checkpoint_dir=ckpt, checkpoint_every=1, progress=False)
    foreign = token_batches(128, n_batches=8, seed=9) if rank == 1 else batches
    try:
        ck.calibrate(model, foreign, checkpoint_dir=ckpt, progress=False)
    except Exception as exc:
        errors["foreign"] = f"{type(exc).__name__}: {exc}"
    return {"errors": errors, "manifest_after_failure": manifest, "resumed": _calibration(result)}


def scenario_decompose(rank, out_dir):
    with _small_buckets():  # several broadcasts per rank, dtypes mixed
        return _decompositions(None)


def scenario_ddp(rank, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    model = _adapted_model(None)  # sharded decomposition inside apply()
    ddp = DistributedDataParallel(model)
    losses = _train(ddp, slice(2 * rank, 2 * rank + 2))
    return {"losses": losses, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _bf16_patched_peft(seed=0):
    """A patched PEFT LoRA model on a bf16 tiny Llama (PEFT keeps the adapters fp32)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_llama(dtype=torch.bfloat16),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False),
    )
    ck.patch_peft(model)
    return model.train()


def scenario_ddp_bf16(rank, out_dir):
    """DDP over a bf16 model: LowRankLinear's fp32 factors, and a patched PEFT model's fp32 adapters."""
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for label, build in (("lowrank", lambda: _adapted_model(False, torch.bfloat16)), ("peft", _bf16_patched_peft)):
        model = build()
        losses = _train(DistributedDataParallel(model), slice(2 * rank, 2 * rank + 2))
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        out[label] = {"losses": losses, "trainable": trained}
    return out


def scenario_fsdp(rank, out_dir):
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return {"skipped": "torch without FSDP2 (fully_shard)"}
    model = _adapted_model(None)
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    losses = _train(model, slice(2 * rank, 2 * rank + 2))
    trainable = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"losses": losses, "trainable": trainable}


def scenario_fsdp1(rank, out_dir):
    import functools

    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
    wrap = functools.partial(FSDP, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    try:  # frozen residual + trainable factors in one module: FSDP1 flat parameters refuse them
        wrap(_adapted_model(None), use_orig_params=False)
        refused = None
    except ValueError as exc:
        refused = str(exc)
    model = wrap(_adapted_model(None), use_orig_params=True)
    losses = _train(model, slice(2 * rank, 2 * rank + 2))
    with FSDP.summon_full_params(model):
        trainable = {
            n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
            for n, p in model.named_parameters()
            if p.requires_grad
        }
    return {"refused": refused, "losses": losses, "trainable": trainable}


@contextlib.contextmanager
def _small_buckets(nbytes=1024):
    saved, distributed.BUCKET_BYTES = distributed.BUCKET_BYTES, nbytes
    try:
        yield
    finally:
        distributed.BUCKET_BYTES = saved


SCENARIOS = [
    scenario_calibration,
    scenario_resume,
    scenario_decompose,
    scenario_ddp,
    scenario_ddp_bf16,
    scenario_fsdp,
    scenario_fsdp1,
]


def _worker(out_dir):
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    results, path = {}, os.path.join(out_dir, f"rank{rank}.pt")
    try:
        for scenario in SCENARIOS:  # a failure stops here: its traceback is in the log
            results[scenario.__name__.removeprefix("scenario_")] = scenario(rank, out_dir)
            torch.save(results, path)
    finally:
        dist.destroy_process_group()


# -- launcher ----------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(out_dir):
    """Run the workers; returns their combined logs (the results are in ``out_dir``)."""
    for _ in range(3):  # a port taken between _free_port() and the bind: retry on another
        for r in range(WORLD):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(out_dir, f"rank{r}.pt"))
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(_free_port()),
            "WORLD_SIZE": str(WORLD),
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        if "lo" in {name for _, name in socket.if_nameindex()}:
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        logs = [open(os.path.join(out_dir, f"log{r}.txt"), "w+") for r in range(WORLD)]
        procs = [
            subprocess.Popen(
                [sys.executable, __file__, str(out_dir)],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                stdout=logs[r],
                stderr=subprocess.STDOUT,
                cwd=HERE,
            )
            for r in range(WORLD)
        ]
        deadline = time.time() + TIMEOUT_S
        try:
            for proc in procs:
                proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        text = ""
        for r, log in enumerate(logs):
            log.seek(0)
            text += f"--- rank {r} (exit {procs[r].returncode}) ---\n{log.read()[-4000:]}\n"
            log.close()
        if "EADDRINUSE" not in text and "address already in use" not in text.lower():
            return text
    return text


class Run:
    def __init__(self, out_dir, logs):
        self.out_dir, self.logs = out_dir, logs
        self.results = [
            torch.load(out_dir / f"rank{r}.pt", weights_only=False) if (out_dir / f"rank{r}.pt").exists() else {}
            for r in range(WORLD)
        ]

    def __getitem__(self, scenario):
        missing = [r for r, res in enumerate(self.results) if scenario not in res]
        if missing:
            pytest.fail(f"scenario {scenario!r} did not finish on ranks {missing}:\n{self.logs}")
        return [res[scenario] for res in self.results]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The references here are tiny; on a busy machine, OpenMP threads spinning in batched LAPACK
    calls cost far more than they bring (a (14, 96, 64) SVD: 10 s with 2 threads, 20 ms with 1)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    return Run(out, _launch(out))


# -- checks ------------------------------------------------------------------------------------
def test_single_process_helpers():
    from torch.utils.data import DataLoader, DistributedSampler

    assert distributed.resolve_group() is None and distributed.resolve_group(False) is None
    with pytest.raises(RuntimeError, match="not initialized"):
        distributed.resolve_group(object())
    data = list(range(8))
    loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    with pytest.raises(ValueError, match="shard='local'"):
        calibration_sharding.shard_batches(loader, None, "stride", None)
    with pytest.raises(ValueError, match="shard must be one of"):
        calibration_sharding.shard_batches(data, None, "rows", None)
    costs = {f"l{i}": c for i, c in enumerate([9, 7, 7, 5, 4, 4, 4, 1])}
    owners = decomposition_sharding.assign_layers(costs, 3)
    loads = [sum(c for n, c in costs.items() if owners[n] == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(costs.values()) and sum(loads) == sum(costs.values())
    assert decomposition_sharding.assign_layers(costs, 3) == owners


def _assert_calibrations(got, expected, exact=False):
    assert got["groups"] == expected["groups"] and set(got["cov"]) == set(expected["cov"])
    assert got["counts"] == expected["counts"] and got["batches"] == expected["batches"]
    assert got["tokens"] == expected["tokens"]
    for group, cov in expected["cov"].items():
        if exact:
            assert torch.equal(got["cov"][group], cov), group
        else:  # summation order differs: fp32 rounding only
            torch.testing.assert_close(got["cov"][group], cov, rtol=1e-5, atol=1e-7, msg=group)


def _assert_identical(a, b):
    """Bit-identical nested results (the two ranks)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_identical(a[key], b[key])
    else:
        assert a == b


def test_calibration_matches_one_process(run):
    ranks = run["calibration"]
    model = tiny_llama()
    batches = token_batches(128, n_batches=5, seed=3)
    full = _calibration(ck.calibrate(model, batches, progress=False))
    first3 = _calibration(ck.calibrate(model, batches[:3], progress=False))
    for label, expected, exact in (
        ("stride", full, False),
        ("blocks", full, False),
        ("local", full, False),
        ("max_batches", first3, False),
        # One rank had all the data, the other adds zeros: bit-for-bit.
        ("one_batch", _calibration(ck.calibrate(model, batches[:1], progress=False)), True),
        ("opt_out", _calibration(ck.calibrate(model, batches[:2], progress=False)), True),
    ):
        _assert_identical(ranks[0][label], ranks[1][label])
        _assert_calibrations(ranks[0][label], expected, exact)


def test_failure_on_one_rank_fails_all_and_resumes_per_rank(run):
    ranks = run["resume"]
    assert ranks[1]["errors"]["failed"] == "RuntimeError: disk on fire"
    assert ranks[0]["errors"]["failed"].startswith("RuntimeError: calibrate failed on rank 1")
    assert '"batches_done": 4' in ranks[0]["manifest_after_failure"]  # all of 0, 2, 4, 6
    assert '"batches_done": 2' in ranks[1]["manifest_after_failure"]  # 1 and 3
    assert '"world_size": 2' in ranks[1]["manifest_after_failure"]
    full = _calibration(ck.calibrate(tiny_llama(), token_batches(128, n_batches=8, seed=5), progress=False))
    _assert_identical(ranks[0]["resumed"], ranks[1]["resumed"])
    _assert_calibrations(ranks[0]["resumed"], full)
    # Other data on rank 1 only: rank 1 refuses its checkpoint, rank 0 is told.
    assert ranks[1]["errors"]["foreign"].startswith("CheckpointMismatch:")
    assert ranks[0]["errors"]["foreign"].startswith("RuntimeError: calibrate failed on rank 1")
    assert "CheckpointMismatch: checkpoint" in ranks[0]["errors"]["foreign"]


def test_sharded_decomposition_matches_one_process(run):
    ranks = run["decompose"]
    _assert_identical(ranks[0], ranks[1])
    single = _decompositions(False)
    assert list(ranks[0]) == list(single)
    for label, inits in single.items():
        assert set(ranks[0][label]) == set(inits)
        for name, expected in inits.items():
            got = ranks[0][label][name]
            if label == "all-fields":  # no arithmetic: bit for bit
                _assert_identical(got, expected)
                continue
            # Batched vs. sharded LAPACK calls: compare the adapter product, sign-free.
            assert got["scale"] == expected["scale"] and got["trainable"] == expected["trainable"]
            torch.testing.assert_close(got["B"] @ got["A"], expected["B"] @ expected["A"], rtol=1e-4, atol=1e-5)
            assert got["stats"]["energy"] == pytest.approx(expected["stats"]["energy"], rel=1e-5)


def _single_process_training():
    model = _adapted_model(False)
    losses = _train(model, slice(None))
    return model, losses


def test_ddp_training_matches_one_process_on_the_whole_batch(run):
    ranks = run["ddp"]
    _assert_identical(ranks[0]["state"], ranks[1]["state"])  # frozen residuals and trained factors
    model, losses = _single_process_training()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0]["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # DDP averages gradients: the mean of the two shard losses is the whole-batch loss.
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert mean == pytest.approx(losses, rel=1e-5)


@pytest.mark.parametrize("label", ["lowrank", "peft"])
def test_ddp_on_a_bf16_base_trains_fp32_adapters_like_one_process(run, label):
    """DDP (gloo, 2 processes) over a bf16 model with fp32 adapters (LowRankLinear, patched PEFT):
    ranks agree exactly, the adapters stay fp32, and training matches one process on the whole batch
    to bf16 tolerance (the two halves run bf16 GEMMs of another shape)."""
    ranks = [r[label] for r in run["ddp_bf16"]]
    _assert_identical(ranks[0]["trainable"], ranks[1]["trainable"])
    model = _adapted_model(False, torch.bfloat16) if label == "lowrank" else _bf16_patched_peft()
    losses = _train(model, slice(None))
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert list(ranks[0]["trainable"]) == list(trained)
    for name, value in trained.items():
        assert value.dtype == torch.float32 == ranks[0]["trainable"][name].dtype
        # Adam's sign-like steps amplify bf16 rounding on near-zero gradients: compare normwise.
        err = (ranks[0]["trainable"][name] - value).norm() / value.norm()
        assert err < 2e-2, f"{name}: relative difference {err:.2e}"
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert mean == pytest.approx(losses, rel=1e-2)


@pytest.mark.parametrize("scenario", ["fsdp", "fsdp1"])
def test_fsdp_training_matches_one_process(run, scenario):
    ranks = run[scenario]
    if "skipped" in ranks[0]:
        pytest.skip(ranks[0]["skipped"])
    if scenario == "fsdp1":
        assert "requires_grad" in (ranks[0]["refused"] or "")  # hence use_orig_params=True
    _assert_identical(ranks[0]["trainable"], ranks[1]["trainable"])
    model, losses = _single_process_training()
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert list(ranks[0]["trainable"]) == list(trained)
    for name, value in trained.items():
        torch.testing.assert_close(ranks[0]["trainable"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    mean = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert mean == pytest.approx(losses, rel=1e-5)


if __name__ == "__main__":
    _worker(sys.argv[1])
