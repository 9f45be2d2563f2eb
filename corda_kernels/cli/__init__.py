"""The ``corda-kernels`` command: ``init`` (the main job), ``report`` (the discard report) and
``estimate`` (peak memory beforehand); one module each.

Errors a user can fix (bad arguments, missing files, a full disk) print one line and exit 2;
Ctrl-C exits 130; neither leaves a partial ``--out`` behind.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import torch

from .._version import __version__
from . import estimate, init, report
from .arguments import HelpFormatter

COMMANDS = {
    "init": (init, "calibrate, decompose, check and export adapters"),
    "report": (report, "perplexity after discarding the smallest r components (SVD/ASVD/CO-SVD)"),
    "estimate": (estimate, "peak memory of an init run, estimated beforehand (reads no weights)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corda-kernels", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        description = module.__doc__.split("\n\n")[0].replace("``", "")
        parser_ = sub.add_parser(name, help=help_text, description=description, formatter_class=HelpFormatter)
        module.add_arguments(parser_)
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C: no partial --out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return COMMANDS[args.command][0].run(args)
    except KeyboardInterrupt:
        out = f"; --out {args.out} left as it was" if hasattr(args, "out") else ""
        print(f"\ncorda-kernels {args.command}: interrupted{out}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as exc:
        print(f"corda-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
