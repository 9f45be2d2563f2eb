"""The ``corda-kernels`` command: ``init`` (the main job), ``report`` (the discard report) and
``estimate`` (peak memory beforehand); one module each."""

from __future__ import annotations

import argparse
import sys

from . import estimate, init, report

COMMANDS = {
    "init": (init, "calibrate, decompose, check and export adapters"),
    "report": (report, "perplexity after discarding the smallest r components (SVD/ASVD/CO-SVD)"),
    "estimate": (estimate, "peak memory of an init run, estimated beforehand (reads no weights)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corda-kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][0].run(args)
    except (ValueError, TypeError, OSError) as exc:
        print(f"corda-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
