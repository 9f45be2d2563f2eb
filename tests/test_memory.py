"""estimate_memory: itemized peaks that match measured RSS, shared covariances counted once, the CLI."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import corda_kernels as ck
from corda_kernels import cli
from corda_kernels.testing import tiny_llama, token_batches

# Big enough that covariances, weights and decomposition dominate the runtime's noise.
SHAPE = dict(hidden=1024, intermediate=2048, layers=3, heads=16, kv_heads=4, vocab=1000)
DATA = dict(n_batches=3, batch=4, seq=128)

# Child process: warm up every code path on a tiny model (lazy initializations are not the run's
# memory), load the model, reset the peak RSS (/proc/self/clear_refs, Linux >= 4.0), run, report.
# MALLOC_MMAP_THRESHOLD_ makes glibc return freed blocks to the OS, so RSS follows live bytes, what
# the estimate counts (with the default settings it keeps freed blocks up to 32 MiB, RSS then runs
# 20-46% above live bytes in block-wise runs: bench/results/blockwise.md).
CHILD = """
import json, sys
import torch
import corda_kernels as ck
from corda_kernels.testing import tiny_llama, token_batches

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key))

blockwise = {blockwise!r}
warm = token_batches(128, n_batches=1)
ck.apply(tiny_llama(layers=1), "corda", rank=2, covariances=ck.calibrate(tiny_llama(layers=1), warm, progress=False),
         progress=False)
ck.apply_blockwise(tiny_llama(layers=1), warm, "corda", rank=2, progress=False)
model = tiny_llama(**{shape!r})
batches = token_batches({vocab}, **{data!r})
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
if blockwise:
    ck.apply_blockwise(model, batches, "corda", rank=8, progress=False)
else:
    ck.apply(model, "corda", rank=8, covariances=ck.calibrate(model, batches, progress=False), progress=False)
print(json.dumps({{"increase": status("VmHWM") - base}}))
"""


def _start(blockwise: bool) -> subprocess.Popen:
    """The child for one configuration, one thread (the two run side by side)."""
    code = CHILD.format(blockwise=blockwise, shape=SHAPE, vocab=SHAPE["vocab"], data=DATA)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _increase(child: subprocess.Popen) -> int:
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])["increase"]


def _reports(codes: dict) -> dict:
    """Runs each child script side by side (one thread each, glibc returning freed blocks as for
    :func:`_start`); the JSON of each one's last line."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    children = {
        key: subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for key, code in codes.items()
    }
    reports = {}
    for key, child in children.items():
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, (key, err[-3000:])
        reports[key] = json.loads(out.strip().splitlines()[-1])
    return reports


def _meta_model():
    with torch.device("meta"):
        return tiny_llama(**SHAPE)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_estimate_matches_measured_peak_rss():
    children = {blockwise: _start(blockwise) for blockwise in (False, True)}
    estimates = {}
    for blockwise, child in children.items():
        estimate = ck.estimate_memory(
            _meta_model(),
            batch_size=DATA["batch"],
            seq_len=DATA["seq"],
            n_batches=DATA["n_batches"],
            rank=8,
            blockwise=blockwise,
        )
        estimates[blockwise] = estimate.extra_bytes()
        measured = _increase(child)
        assert abs(estimates[blockwise] / measured - 1) <= 0.35, (blockwise, estimates[blockwise], measured)
    assert estimates[True] < 0.6 * estimates[False]


# A further adapter (apply(adapter_name=, initial=)) on the model adapted by PiSSA: the child warms up
# the same paths, adapts the model, saves its initial factors, estimates, then measures the second
# apply alone (the loaded model and first adapter are the baseline, as the estimate's extra_bytes).
FURTHER_CHILD = """
import json, tempfile
import corda_kernels as ck
from corda_kernels.testing import tiny_llama

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key))

def adapted(shape):
    model = ck.apply(tiny_llama(**shape), "pissa", rank=8, progress=False)
    initial = tempfile.mkdtemp()
    ck.save_peft_adapter(model, initial)
    return model, initial

warm, initial = adapted(dict(layers=1))
ck.apply(warm, {method!r}, rank=2, adapter_name="b", initial=initial, progress=False)
model, initial = adapted({shape!r})
options = dict(rank=8, adapter_name="b", initial=initial)
estimate = ck.estimate_memory(model, {method!r}, batch_size=1, seq_len=8, n_batches=1, **options)
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
ck.apply(model, {method!r}, progress=False, **options)
print(json.dumps({{"increase": status("VmHWM") - base, "estimate": estimate.extra_bytes(),
                  "items": {{k[0]: v for k, v in estimate.phases[estimate.peak_phase()].items()}}}}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_further_adapter_estimate_matches_measured_peak_rss():
    """A second adapter, additive (LoRA) and subtractive (PiSSA), on PiSSA's residual base: the
    original weights rebuilt, the initial factors and the decomposition are what the run adds."""
    reports = _reports({method: FURTHER_CHILD.format(method=method, shape=SHAPE) for method in ("lora", "pissa")})
    for method, report in reports.items():
        assert report["items"]["original weights"] > 0 and report["items"]["initial factors"] > 0
        assert abs(report["estimate"] / report["increase"] - 1) <= 0.35, (method, report)


# Partial-LoRA derives its per-layer ratios on few-shot batches before anything is decomposed
# (score="svd": each layer's full SVD in turn; "snip": every target's gradient at once).
PARTIAL_CHILD = """
import json
import corda_kernels as ck
from corda_kernels.testing import tiny_llama, token_batches

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key))

score = {score!r}
ck.apply(tiny_llama(layers=1), "partial_lora", rank=2, few_shot=token_batches(128, n_batches=1), score=score,
         progress=False)
model = tiny_llama(**{shape!r})
few_shot = token_batches({vocab}, n_batches=2, batch=2, seq=64)
options = dict(rank=8, few_shot=few_shot, score=score)
estimate = ck.estimate_memory(model, "partial_lora", batch_size=1, seq_len=8, n_batches=1, **options)
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
ck.apply(model, "partial_lora", progress=False, **options)
print(json.dumps({{"increase": status("VmHWM") - base, "estimate": estimate.extra_bytes(),
                  "phase": estimate.peak_phase()}}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_partial_lora_derivation_estimate_matches_measured_peak_rss():
    codes = {score: PARTIAL_CHILD.format(score=score, shape=SHAPE, vocab=SHAPE["vocab"]) for score in ("svd", "snip")}
    for score, report in _reports(codes).items():
        assert report["phase"] == "derive ratios", (score, report)
        assert abs(report["estimate"] / report["increase"] - 1) <= 0.35, (score, report)


LORA_BLOCKWISE_CHILD = """
import json
import corda_kernels as ck
from corda_kernels.testing import tiny_llama, token_batches

def status(key):
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith(key))

ck.apply_blockwise(tiny_llama(layers=1), token_batches(128, n_batches=1), "lora", rank=2, progress=False)
model = tiny_llama(**{shape!r})
batches = token_batches({vocab}, **{data!r})
estimate = ck.estimate_memory(model, "lora", batch_size={batch}, seq_len={seq}, n_batches={n}, rank=8, blockwise=True)
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")
ck.apply_blockwise(model, batches, "lora", rank=8, progress=False)
print(json.dumps({{"increase": status("VmHWM") - base, "estimate": estimate.extra_bytes()}}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_blockwise_lora_estimate_matches_measured_peak_rss():
    """Block-wise LoRA: no residual and no undo copy (the swapped layer keeps the weight tensor)."""
    code = LORA_BLOCKWISE_CHILD.format(
        shape=SHAPE, vocab=SHAPE["vocab"], data=DATA, batch=DATA["batch"], seq=DATA["seq"], n=DATA["n_batches"]
    )
    report = _reports({"lora": code})["lora"]
    assert abs(report["estimate"] / report["increase"] - 1) <= 0.35, report


def test_partial_lora_derivation_items(tmp_path):
    """The derivation phase: SNIP holds every target's gradient; given densities derive nothing; a
    further adapter derives on the rebuilt original weights; methods that do not subtract keep the
    weight itself (no residual copy)."""
    model = tiny_llama(layers=2)
    layers = {n: m for n, m in model.named_modules() if n.endswith("proj")}
    weights = sum(m.weight.numel() * m.weight.element_size() for m in layers.values())
    few_shot = token_batches(128, n_batches=1, batch=2, seq=16)
    options = dict(batch_size=2, seq_len=12, n_batches=1, rank=4)
    snip = ck.estimate_memory(model, "partial_lora", few_shot=few_shot, score="snip", **options)
    assert snip.phases["derive ratios"][("gradients", "cpu")] == weights
    svd = ck.estimate_memory(model, "partial_lora", few_shot=few_shot, **options)
    assert ("gradients", "cpu") not in svd.phases["derive ratios"] and svd.phases["derive ratios"][
        ("ratio search", "cpu")
    ]
    given = ck.estimate_memory(model, "partial_lora", densities=0.5, **options)
    assert "derive ratios" not in given.phases
    swap = {
        m: ck.estimate_memory(model, m, **options).phases["swap"][("residual copies + adapters", "cpu")]
        for m in ("lora", "pissa")
    }
    assert swap["pissa"] - swap["lora"] == weights  # PiSSA's residuals are new tensors; LoRA keeps W
    blockwise = ck.estimate_memory(model, "partial_lora", few_shot=few_shot, blockwise=True, **options)
    assert blockwise.phases["derive ratios"] == svd.phases["derive ratios"]
    adapted = ck.apply(tiny_llama(layers=2), "pissa", rank=4, progress=False)
    ck.save_peft_adapter(adapted, str(tmp_path))
    further = ck.estimate_memory(
        adapted, "partial_lora", few_shot=few_shot, adapter_name="b", initial=str(tmp_path), **options
    )
    assert further.phases["derive ratios"][("original weights", "cpu")] == weights


def test_further_adapter_items(tmp_path):
    """What a further adapter's run holds, item by item, from the model's adapted layers."""
    model = ck.apply(tiny_llama(layers=2), "pissa", rank=4, progress=False)
    ck.save_peft_adapter(model, str(tmp_path))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ck.LowRankLinear)}
    weights = sum(m.weight.numel() * m.weight.element_size() for m in layers.values())
    factors = sum(m.A.numel() * 4 + m.B.numel() * 4 for m in layers.values())  # fp32 at rank 4
    options = dict(batch_size=2, seq_len=12, n_batches=2, adapter_name="b", initial=str(tmp_path))
    for method in ("lora", "pissa", "corda"):
        whole = ck.estimate_memory(model, method, rank=4, **options)
        assert ("calibrate" in whole.phases) == (method == "corda")
        decompose, swap = whole.phases["decompose"], whole.phases["swap"]
        assert decompose[("loaded adapters", "cpu")] == factors + len(layers)  # A, B (fp32), a bool merged flag
        assert decompose[("initial factors", "cpu")] == factors  # A0, B0 as save_peft_adapter wrote them
        assert decompose[("original weights", "cpu")] == weights  # every layer rebuilt as W' + s·B0·A0
        assert ("original weights", "cpu") not in swap and ("residual copies + adapters", "cpu") not in swap
        largest = max(m.weight.numel() for m in layers.values())
        own = factors if method != "lora" else 0  # a subtractive adapter keeps its own A0, B0
        assert swap[("new adapter", "cpu")] == 2 * factors + own + 8 * largest
        blockwise = ck.estimate_memory(model, method, rank=4, blockwise=True, **options)
        per_block = blockwise.phases["decompose block"][("original weights", "cpu")]
        assert per_block == weights // 2  # one block's layers at a time
        assert max(items.get(("undo copies", "cpu"), 0) for items in blockwise.phases.values()) == weights
    lora = ck.apply(tiny_llama(layers=2), "lora", rank=4, progress=False)  # its base is the original
    plain = ck.estimate_memory(lora, "lora", rank=4, batch_size=2, seq_len=12, n_batches=2, adapter_name="b")
    assert ("original weights", "cpu") not in plain.phases["decompose"]
    assert ("initial factors", "cpu") not in plain.phases["decompose"]
    with pytest.raises(ValueError, match=r"estimate_memory\(adapter_name='b'\): layer model\.layers\.0\..*initial="):
        ck.estimate_memory(model, "lora", rank=4, batch_size=2, seq_len=12, n_batches=2, adapter_name="b")
    with pytest.raises(ValueError, match=r"estimate_memory: initial= is for adding a further adapter"):
        ck.estimate_memory(tiny_llama(layers=1), batch_size=2, seq_len=12, n_batches=2, initial=str(tmp_path))


def test_items_match_what_calibration_holds():
    model = tiny_llama(layers=2)
    batches = token_batches(128, n_batches=2, batch=2, seq=12)
    full = ck.calibrate(model, batches, progress=False)
    packed = ck.calibrate(model, batches, progress=False, storage="packed")
    estimate = ck.estimate_memory(model, batch_size=2, seq_len=12, n_batches=2)
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    assert estimate.phases["calibrate"][("weights", "cpu")] == weights
    assert estimate.phases["calibrate"][("covariances", "cpu")] == full.nbytes  # q/k/v and gate/up counted once
    assert estimate.peak_bytes() == weights + estimate.extra_bytes()
    packed_estimate = ck.estimate_memory(model, batch_size=2, seq_len=12, n_batches=2, storage="packed")
    assert packed_estimate.phases["decompose"][("covariances", "cpu")] == packed.nbytes

    # A GPU run planned from a meta model: offloaded covariances are host memory, the rest device memory.
    with torch.device("meta"):
        meta = tiny_llama(layers=2)
    gpu = ck.estimate_memory(
        meta, batch_size=2, seq_len=12, n_batches=2, covariance_device="cpu", device="cuda:0", max_batch_bytes=1 << 30
    )
    assert gpu.locations == ["cuda:0", "cpu"]
    assert gpu.phases["decompose"][("covariances", "cpu")] == full.nbytes
    assert gpu.phases["calibrate"][("covariances", "cuda:0")] == full.nbytes
    text = gpu.summary()
    assert "peak on cuda:0" in text and "peak on cpu" in text and "decomposition" in text

    pissa = ck.estimate_memory(model, batch_size=2, seq_len=12, n_batches=2, method="pissa")
    assert list(pissa.phases) == ["decompose", "swap"]
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ck.estimate_memory(model, batch_size=0, seq_len=12, n_batches=2)


def test_blockwise_undo_copies_follow_the_undo_mode():
    """undo="cpu" parks every replaced weight; undo="reconstruct" keeps what rebuilds them bit for bit
    (blockwise._Rebuild), counted as RECONSTRUCT_BYTES_PER_WEIGHT per weight: at least what it keeps."""
    from corda_kernels.blockwise import _Rebuild
    from corda_kernels.memory import RECONSTRUCT_BYTES_PER_WEIGHT

    model = tiny_llama(layers=2)
    kept = {}
    for undo in ("cpu", "reconstruct"):
        estimate = ck.estimate_memory(model, batch_size=2, seq_len=12, n_batches=2, blockwise=True, undo=undo)
        kept[undo] = max(items.get(("undo copies", "cpu"), 0) for items in estimate.phases.values())
    targets = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    weights = sum(m.weight.numel() for m in targets.values())
    assert kept["cpu"] == 4 * weights  # at the last block's swap: every replaced fp32 weight
    assert kept["reconstruct"] == int(RECONSTRUCT_BYTES_PER_WEIGHT * weights)
    # LoRA keeps each weight itself: parked where it lives, the old module costs nothing more
    lora = ck.estimate_memory(model, "lora", batch_size=2, seq_len=12, n_batches=2, blockwise=True, undo="cpu")
    assert not any(("undo copies", "cpu") in items for items in lora.phases.values())
    adapted = ck.apply(copy.deepcopy(model), "pissa", rank=8, target_modules=list(targets), progress=False)
    measured = sum(_Rebuild(adapted.get_submodule(n), m.weight).nbytes() for n, m in targets.items())
    assert measured <= kept["reconstruct"]


def test_cli_estimate(capsys, smollm2):
    assert cli.main(["estimate", "--samples", "16", "--seq-len", "64", "--blockwise", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "block-wise" in printed and "210 target layers" in printed and "undo copies" in printed
    assert "peak on cpu" in printed


# `corda-kernels init` at its defaults and two other sizes: the peak RSS it prints per stage must be
# within 1.25x of what `corda-kernels estimate` with the same options says (both as a user runs
# them, default malloc settings; the estimate counts its own process's runtime and tokenizer).
INIT_OPTIONS = {
    "defaults": [],
    "16x64": ["--samples", "16", "--seq-len", "64"],
    "32x128-kpa-r16": ["--samples", "32", "--seq-len", "128", "--mode", "kpa", "--rank", "16"],
}


def _command(args: list[str], cwd) -> str:
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "import sys; from corda_kernels.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=1800
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def estimated_totals(printed: str) -> dict[str, float]:
    """Phase -> total MiB on the CPU, from `corda-kernels estimate`'s table."""
    header = next(line for line in printed.splitlines() if line.startswith("MiB"))
    total = next(line for line in printed.splitlines() if line.startswith("total") and " cpu " in line)
    return dict(zip(header.split()[2:], (float(x.replace(",", "")) for x in total.split()[2:])))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(INIT_OPTIONS))
def test_estimate_matches_init_peak_rss(tmp_path, name, smollm2):
    options = [*INIT_OPTIONS[name], "--device", "cpu"]
    _command(["init", *options, "--no-progress", "--no-residual", "--out", str(tmp_path / "out")], tmp_path)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    stages = {s["name"]: s["peak_rss"] / 2**20 for s in report["stages"]}
    estimate = estimated_totals(_command(["estimate", *options], tmp_path))
    pairs = {
        "calibrate": (stages["calibrate"], estimate["calibrate"]),
        "decompose": (stages["decompose"], max(estimate["decompose"], estimate["swap"])),  # apply: both
    }
    for stage, (measured, estimated) in pairs.items():
        ratio = estimated / measured
        print(f"{name} {stage}: measured {measured:,.0f} MiB, estimated {estimated:,.0f} MiB ({ratio:.2f}x)")
        assert 1 / 1.25 <= estimated / measured <= 1.25, (name, stage, measured, estimated)
