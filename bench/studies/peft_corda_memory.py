"""Peak host memory of PEFT's ``preprocess_corda``, unpatched vs under ``corda_kernels.peft_patched()``.

Each (mode, side) runs in a fresh subprocess: build the model, import ``corda_kernels`` (both
sides) and run one calibration pass as a warm-up (lazy imports and first-call allocations are
not the method's memory), then measure the peak resident set size of ``preprocess_corda`` alone
(``corda_kernels._measure``: RSS sampled every 20 ms, relative to the RSS just before the call,
after ``malloc_trim``), and the size of the ``eigens`` it leaves on the model (both crop to r).

Model: the reduced-depth LLaMA shape of ``bench/speed/bench_peft_init.py`` by default (hidden 512,
intermediate 1376, 4 blocks; ``--hidden/--intermediate/--layers`` to change it), r 16, targets
q/k/v/o/gate/up/down, 16 calibration sequences of 64 tokens, batch size 1.

Run: ``python bench/studies/peft_corda_memory.py [--modes ipm kpm] [--small]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def child(args) -> None:
    import torch
    from peft import LoraConfig
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from transformers import LlamaConfig, LlamaForCausalLM

    import corda_kernels as ck
    import corda_kernels.integrations.peft_init  # noqa: F401  (imported before measuring, both sides)
    from corda_kernels._measure import measure, release_free_memory, rss_bytes

    torch.manual_seed(0)
    size = dict(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
    )
    model = LlamaForCausalLM(LlamaConfig(vocab_size=2048, max_position_embeddings=256, **size)).eval()
    ids = torch.randint(0, 2048, (args.samples, args.seq), generator=torch.Generator().manual_seed(1))
    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.rank,
        target_modules=TARGETS,
        init_lora_weights="corda",
        corda_config=CordaConfig(corda_method=args.mode),
    )

    @torch.no_grad()
    def run_model():
        for row in ids:
            model(input_ids=row[None])

    run_model()  # warm-up: first-call allocations and lazy imports are not the method's memory
    release_free_memory()
    before = rss_bytes()
    if args.side == "patched":
        with ck.peft_patched(), measure("preprocess_corda") as stage:
            preprocess_corda(model, config, run_model=run_model)
    else:
        with measure("preprocess_corda") as stage:
            preprocess_corda(model, config, run_model=run_model)
    kept = 0
    for module in model.modules():
        eigens = getattr(module, "eigens", None)
        if eigens is not None:
            kept += sum(t.numel() * t.element_size() for t in vars(eigens).values() if torch.is_tensor(t))
    print(json.dumps(dict(peak=stage.peak_rss - before, seconds=stage.seconds, kept=kept)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=["ipm", "kpm"], choices=["ipm", "kpm"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1376)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--small", action="store_true", help="a tiny model (the suite's rehearsal)")
    parser.add_argument("--child", choices=["peft", "patched"], dest="side", default=None)
    parser.add_argument("--mode", default="ipm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.hidden, args.intermediate, args.layers, args.heads = 64, 96, 2, 4
        args.rank, args.samples, args.seq = 4, 4, 16
    if args.side is not None:
        return child(args)
    size = f"hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} blocks, r {args.rank}"
    print(f"preprocess_corda peak RSS over the model ({size}); each row a fresh process")
    print("| mode | PEFT peak (MiB) | patched peak (MiB) | patched / PEFT | kept by PEFT (MiB) | kept patched (MiB) |")
    print("|---|---|---|---|---|---|")
    forwarded = [
        f"--{k}={getattr(args, k)}" for k in ("hidden", "intermediate", "layers", "heads", "rank", "samples", "seq")
    ]
    for mode in args.modes:
        out = {}
        for side in ("peft", "patched"):
            cmd = [sys.executable, __file__, "--child", side, f"--mode={mode}", *forwarded]
            result = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[side] = json.loads(result.stdout.strip().splitlines()[-1])
        mib = 2**20
        print(
            f"| {mode} | {out['peft']['peak'] / mib:.1f} | {out['patched']['peak'] / mib:.1f} | "
            f"{out['patched']['peak'] / max(out['peft']['peak'], 1):.2f} | {out['peft']['kept'] / mib:.2f} | "
            f"{out['patched']['kept'] / mib:.2f} |"
        )


if __name__ == "__main__":
    main()
