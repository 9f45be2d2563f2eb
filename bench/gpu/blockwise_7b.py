"""Block-wise CorDA on a LLaMA-2-7B-shaped stack: peak GPU memory against whole-model calibration.

Issue #5's GPU figure. A random-weight Llama with LLaMA-2-7B's shapes (32 blocks, hidden 4096,
intermediate 11008, bf16, ~12.6 GiB of weights) on one GPU, random calibration tokens
(``--samples`` x ``--seq-len``), CorDA-IPA rank 128. Each configuration starts from a freshly built
model; its peak is ``torch.cuda.max_memory_allocated`` during the run minus what was allocated
before it (the model), with ``corda_kernels.estimate_memory``'s GPU figure beside it:

- ours, block-wise: ``apply_blockwise(block_inputs_device="cpu", undo="reconstruct")`` (hidden states cached
  in host memory; one block's covariances and decomposition on the GPU at a time);
- ours, whole model: ``calibrate`` (batches of ``--batch-size``; q/k/v and gate/up share one
  covariance), covariances kept on the GPU;
- PEFT 0.21's whole-model calibration: ``calib_cov_distribution``, the first step of
  ``preprocess_corda`` (batch size 1, one fp32 covariance per target module), run alone: its
  decomposition step (full U and V of every layer, moved to the CPU) comes after and is not
  counted, so PEFT's true peak is at least this.

Run: ``python bench/gpu/blockwise_7b.py`` on a GPU (a few minutes). On a CPU a small stand-in
runs (no GPU peaks). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from llama7b import add_model_arguments, build_model, parse_model_arguments, write_json

import corda_kernels as ck

GiB = 2**30


def calibration_batches(args, device) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=g)
    return [
        {
            "input_ids": ids[i : i + args.batch_size].to(device),
            "attention_mask": torch.ones_like(ids[i : i + args.batch_size]).to(device),
        }
        for i in range(0, args.samples, args.batch_size)
    ]


class Peak:
    """Wall time and peak CUDA memory above what was allocated on entry (None on a CPU)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        self.bytes = torch.cuda.max_memory_allocated() - self.base if self.cuda else None


def estimate(args, blockwise: bool) -> int:
    """``estimate_memory``'s peak above the model on the compute device: the whole block-wise run,
    or the calibration phase of whole-model CorDA."""
    options = dict(blockwise=True, block_inputs_device="cpu", undo="reconstruct") if blockwise else {}
    est = ck.estimate_memory(
        build_model(args, "meta"),
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        n_batches=-(-args.samples // args.batch_size),
        rank=args.rank,
        device=args.device,
        **options,
    )
    return est.extra_bytes() if blockwise else est.total("calibrate", exclude=("weights",))


def ours_blockwise(args, device) -> dict:
    model = build_model(args, device)
    batches = calibration_batches(args, device)
    with Peak(device) as peak:
        ck.apply_blockwise(
            model,
            batches,
            "corda",
            mode="ipa",
            rank=args.rank,
            block_inputs_device="cpu",
            undo="reconstruct",
            progress=args.progress,
        )
    layers = sum(isinstance(m, ck.LowRankLinear) for m in model.modules())
    del model, batches
    gc.collect()
    return {"seconds": peak.seconds, "bytes": peak.bytes, "layers": layers}


def ours_whole(args, device) -> dict:
    model = build_model(args, device)
    batches = calibration_batches(args, device)
    with Peak(device) as peak:
        calibration = ck.calibrate(model, batches, progress=args.progress)
    covariances = len(calibration.covariances)
    del model, batches, calibration
    gc.collect()
    return {"seconds": peak.seconds, "bytes": peak.bytes, "covariances": covariances}


def peft_whole(args, device) -> dict:
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import calib_cov_distribution

    model = build_model(args, device)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    config = LoraConfig(r=args.rank, target_modules=targets, init_lora_weights="corda", corda_config=CordaConfig())
    ids = torch.cat([b["input_ids"] for b in calibration_batches(args, device)])

    @torch.no_grad()
    def run_model(model=model):
        for row in ids:
            model(input_ids=row[None])

    with Peak(device) as peak:
        calib_cov_distribution(model, config, run_model, None, None)
    covariances = sum(isinstance(getattr(m, "covariance_matrix", None), torch.Tensor) for m in model.modules())
    del model
    gc.collect()
    return {"seconds": peak.seconds, "bytes": peak.bytes, "covariances": covariances}


def _gib(value) -> str:
    return "-" if value is None else f"{value / GiB:.1f}"


def run(args) -> list[str]:
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    model_bytes = sum(p.numel() * p.element_size() for p in build_model(args, "meta").parameters())
    block = ours_blockwise(args, device)
    whole = ours_whole(args, device)
    peft = peft_whole(args, device) if args.peft else None
    estimates = {"blockwise": estimate(args, True), "whole": estimate(args, False)}
    if args.json:
        write_json(args.json, args, blockwise=block, whole=whole, peft=peft, estimate=estimates)
    lines = [
        f"{name}, torch {torch.__version__}; {args.blocks} blocks, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, {args.dtype} ({model_bytes / GiB:.1f} GiB of weights); {args.samples} x "
        f"{args.seq_len} calibration tokens; CorDA-IPA rank {args.rank}. Peak GPU memory above the loaded model.\n",
        "| configuration | time (s) | peak above model (GiB) | `estimate_memory` (GiB) | covariances |",
        "| --- | --- | --- | --- | --- |",
        f'| ours: `apply_blockwise(block_inputs_device="cpu", undo="reconstruct")` (calibrate + decompose + adapt) | '
        f"{block['seconds']:.1f} | {_gib(block['bytes'])} | {_gib(estimates['blockwise'])} | one block's |",
        f"| ours: whole-model `calibrate` (batches of {args.batch_size}) | {whole['seconds']:.1f} | "
        f"{_gib(whole['bytes'])} | {_gib(estimates['whole'])} | {whole['covariances']} |",
    ]
    if peft:
        lines.append(
            f"| PEFT: `calib_cov_distribution` (batch size 1; decomposition not counted) | "
            f"{peft['seconds']:.1f} | {_gib(peft['bytes'])} | - | {peft['covariances']} |"
        )
    return lines


def parse(argv=None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--samples", type=int, default=64 if gpu else 8)
    p.add_argument("--seq-len", type=int, default=2048 if gpu else 64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-peft", dest="peft", action="store_false", help="skip PEFT's calibration")
    return parse_model_arguments(p, argv)


if __name__ == "__main__":
    print("\n".join(run(parse())))
