"""Whole-model vs block-wise calibration: time and peak RSS on CPU, and the scaling with depth.

(a) SmolLM2-135M-Instruct (fp32, the embedded GGUF, built-in calibration text): ``calibrate`` +
    ``apply`` (default storage, and ``storage="packed"``) against ``apply_blockwise`` (cache in
    place, and ``block_inputs_device="cpu"``), CorDA-IPA rank 8.
(b) Random Llamas of one width with 2, 4, 8, 16 blocks: whole-model against block-wise.

Every configuration runs in a fresh subprocess: it first warms every code path up on a tiny model
(lazy initializations are not the run's memory), loads the model and the batches, resets the
peak RSS (``/proc/self/clear_refs``; Linux >= 4.0), runs, and reports the wall time and the peak
RSS above the loaded model (``VmHWM - VmRSS`` before the run), with
:func:`corda_kernels.estimate_memory`'s figure for the same run beside it.

Run: ``python bench/studies/blockwise_memory.py`` (about 9 minutes on 2 cores) prints the markdown tables.
``--part smollm2|scaling`` runs one of (a), (b); ``--quick`` runs (b) only, at 2 and 4 blocks.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time

MiB = 2**20
HERE = os.path.dirname(os.path.abspath(__file__))
SMOLLM2 = dict(samples=32, seq_len=256, batch_size=8)
WIDTH = dict(hidden=768, intermediate=2048, heads=12, kv_heads=4, vocab=8000)
RANDOM_DATA = dict(n_batches=4, batch=8, seq=256)
# glibc's default keeps freed blocks up to 32 MiB for reuse; this makes it return them (RSS ~ live bytes).
RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key))


def _load(spec):
    """(model, batches) of a configuration."""
    import torch

    from corda_kernels.integrations import loading

    if spec["model"] == "smollm2":
        model, tokenizer = loading.load_model(None, None)
        texts = loading.load_texts("builtin")[: SMOLLM2["samples"]]
        return model, loading.token_batches(tokenizer, texts, SMOLLM2["seq_len"], SMOLLM2["batch_size"])
    from corda_kernels.testing import tiny_llama, token_batches

    model = tiny_llama(
        layers=spec["blocks"],
        hidden=WIDTH["hidden"],
        intermediate=WIDTH["intermediate"],
        heads=WIDTH["heads"],
        kv_heads=WIDTH["kv_heads"],
        vocab=WIDTH["vocab"],
    )
    torch.manual_seed(0)
    return model, token_batches(WIDTH["vocab"], **RANDOM_DATA)


def child(spec) -> dict:
    import torch

    import corda_kernels as ck
    from corda_kernels.testing import tiny_llama, token_batches

    warm = token_batches(128, n_batches=1)
    ck.apply(
        tiny_llama(layers=1),
        "corda",
        rank=2,
        covariances=ck.calibrate(tiny_llama(layers=1), warm, progress=False),
        progress=False,
    )
    ck.apply_blockwise(tiny_llama(layers=1), warm, "corda", rank=2, progress=False)
    model, batches = _load(spec)
    blockwise = spec["mode"] == "blockwise"
    options = {k: spec[k] for k in ("block_inputs_device", "storage", "undo") if spec.get(k)}
    estimate = ck.estimate_memory(
        model,
        batch_size=max(b["input_ids"].shape[0] for b in batches),
        seq_len=max(b["input_ids"].shape[1] for b in batches),
        n_batches=len(batches),
        rank=8,
        blockwise=blockwise,
        **options,
    )
    gc.collect()
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    start = time.perf_counter()
    if blockwise:
        ck.apply_blockwise(model, batches, "corda", rank=8, progress=False, **options)
    else:
        cal = ck.calibrate(model, batches, progress=False, **options)
        ck.apply(model, "corda", rank=8, covariances=cal, progress=False)
    seconds = time.perf_counter() - start
    undo = estimate.phases.get(estimate.peak_phase(), {}).get(("undo copies", "cpu"), 0)
    return {
        "seconds": seconds,
        "peak_above_model": _status("VmHWM") - base,
        "model_rss": base,
        "estimate": estimate.extra_bytes(),
        "undo": undo,
        "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
        "batches": len(batches),
        "threads": torch.get_num_threads(),
    }


def run(spec, env_extra=None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    load = os.getloadavg()[0]
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        raise RuntimeError(f"configuration {spec} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_before"] = load
    print(f"  {spec} {env_extra or ''}: {result}", file=sys.stderr, flush=True)
    return result


def _mib(n: float) -> str:
    return f"{n / MiB:,.0f}"


def smollm2_table() -> list[str]:
    rows = [
        ("whole model: `calibrate` + `apply`", {"mode": "whole"}, None),
        ('whole model, `calibrate(storage="packed")`', {"mode": "whole", "storage": "packed"}, None),
        ("whole model, glibc returning freed memory\u00b9", {"mode": "whole"}, RETURN_FREED),
        (
            'whole model, `storage="packed"`, glibc returning freed memory\u00b9',
            {"mode": "whole", "storage": "packed"},
            RETURN_FREED,
        ),
        ("block-wise: `apply_blockwise`", {"mode": "blockwise"}, None),
        ('block-wise, `block_inputs_device="cpu"`', {"mode": "blockwise", "block_inputs_device": "cpu"}, None),
        ("block-wise, glibc returning freed memory\u00b9", {"mode": "blockwise"}, RETURN_FREED),
    ]
    lines = [
        "| configuration | time (s) | peak RSS above the loaded model (MiB) | estimated (MiB) | "
        "of which undo copies (estimated, MiB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    info = None
    for label, spec, env in rows:
        r = run({"model": "smollm2", **spec}, env)
        info = info or r
        lines.append(
            f"| {label} | {r['seconds']:.1f} | {_mib(r['peak_above_model'])} | {_mib(r['estimate'])} | "
            f"{_mib(r['undo']) if r['undo'] else '-'} |"
        )
    lines.insert(
        0,
        f"SmolLM2-135M-Instruct fp32 (model RSS {_mib(info['model_rss'])} MiB), CorDA-IPA rank 8, "
        f"{info['batches']} batches of {SMOLLM2['batch_size']} texts (<= {SMOLLM2['seq_len']} tokens; "
        f"{info['tokens']} tokens), {info['threads']} threads.\n",
    )
    return lines


def scaling_table(depths) -> list[str]:
    lines = [
        f"Random Llamas, hidden {WIDTH['hidden']}, intermediate {WIDTH['intermediate']}, {WIDTH['heads']} heads "
        f"({WIDTH['kv_heads']} KV), vocab {WIDTH['vocab']}, fp32; {RANDOM_DATA['n_batches']} batches x "
        f"{RANDOM_DATA['batch']} x {RANDOM_DATA['seq']} tokens; CorDA-IPA rank 8. Peak RSS above the loaded "
        "model (estimate in parentheses), MiB.\n",
        "| blocks | whole: time (s) | whole: peak | block-wise: time (s) | block-wise: peak | "
        "block-wise, glibc returning freed memory\u00b9: peak | of which undo copies (estimated) | "
        'block-wise, `undo="reconstruct"`, glibc returning freed memory\u00b9: peak |',
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for blocks in depths:
        w = run({"model": "random", "blocks": blocks, "mode": "whole"})
        b = run({"model": "random", "blocks": blocks, "mode": "blockwise"})
        f = run({"model": "random", "blocks": blocks, "mode": "blockwise"}, RETURN_FREED)
        r = run({"model": "random", "blocks": blocks, "mode": "blockwise", "undo": "reconstruct"}, RETURN_FREED)
        lines.append(
            f"| {blocks} | {w['seconds']:.1f} | {_mib(w['peak_above_model'])} ({_mib(w['estimate'])}) | "
            f"{b['seconds']:.1f} | {_mib(b['peak_above_model'])} ({_mib(b['estimate'])}) | "
            f"{_mib(f['peak_above_model'])} | {_mib(b['undo'])} | "
            f"{_mib(r['peak_above_model'])} ({_mib(r['estimate'])}) |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=["smollm2", "scaling"], help="run (a) or (b) only")
    parser.add_argument("--quick", action="store_true", help="(b) only, 2 and 4 blocks")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if not os.path.exists("/proc/self/clear_refs"):
        sys.exit("needs Linux: the peak RSS is reset through /proc/self/clear_refs")
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load = os.getloadavg()
    lines = [
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {started}; load average "
        f"before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "",
    ]
    if not args.quick and args.part != "scaling":
        lines += smollm2_table()
        lines += [""] if args.part != "smollm2" else []
    if args.part != "smollm2":
        lines += scaling_table((2, 4) if args.quick else (2, 4, 8, 16))
    load = os.getloadavg()
    lines += [
        "",
        f"\u00b9 `{' '.join(f'{k}={v}' for k, v in RETURN_FREED.items())}`: glibc then maps every block over "
        "64 KiB separately and unmaps it when freed, so RSS follows live bytes (what the estimate counts); by "
        "default it keeps freed blocks up to 32 MiB for reuse.",
        "",
        f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
