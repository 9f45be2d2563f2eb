"""Shared by tests/test_readme.py and tests/test_docs.py: the fenced blocks of a Markdown page and
the checks every documented command gets (its program exists, its options exist)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DOCS = os.path.join(ROOT, "docs")

# `<!-- not-run: reason -->` right before a ```python block of docs/ keeps the suite from running it.
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->\s*\n\s*$")


def read(path: str) -> str:
    return open(os.path.join(ROOT, path), encoding="utf-8").read()


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return [(lang, body) for lang, body, _ in fenced_blocks_with_notes(text)]


def fenced_blocks_with_notes(text: str) -> list[tuple[str, str, str | None]]:
    """(language, body, not-run reason or None) of every fenced code block, in order."""
    found = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        before = text[max(0, m.start() - 400) : m.start()]
        note = NOT_RUN.search(before)
        found.append((m.group(1), m.group(2), note.group(1) if note else None))
    return found


def block(text: str, language: str, containing: str, where: str = "README") -> str:
    found = [body for lang, body in fenced_blocks(text) if lang == language and containing in body]
    assert len(found) == 1, f"expected one {language} block in {where} containing {containing!r}, found {len(found)}"
    return found[0]


def bash_commands(text: str) -> list[list[str]]:
    """Each ``&&``-separated command of every ``bash`` block, as argv lists."""
    commands = []
    for lang, body in fenced_blocks(text):
        if lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    words = shlex.split(part, comments=True)
                    if words:
                        commands.append(words)
    return commands


def extras() -> set[str]:
    """The optional-dependency groups ``pyproject.toml`` declares."""
    section = read("pyproject.toml").split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^(\w+)\s*=", section, re.M))


def cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``corda-kernels ARGS`` as a user runs it (the installed entry point), on this checkout."""
    exe = shutil.which("corda-kernels")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from corda_kernels.cli import main; sys.exit(main())"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=900, **kwargs)


def _pytest_help() -> str:
    done = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def check_commands(commands: list[list[str]], where: str, run_cli_help: bool = True) -> None:
    """Each command's program is there, its options exist and pip's extras are declared.

    ``corda-kernels`` commands are parsed by the real argument parser (unknown options and bad
    choices fail); with ``run_cli_help`` each subcommand's ``--help`` also runs through the
    installed entry point. ``python -m pytest`` and ``bash bench/gpu/run.sh`` are checked against
    their ``--help``; their path arguments must exist.
    """
    from corda_kernels.cli import build_parser

    pytest_help = None
    for cmd in commands:
        if cmd[0] == "pip":
            assert cmd[1] == "install", (where, cmd)
            for arg in cmd[2:]:
                found = re.fullmatch(r"\.\[([\w,]+)\]", arg)
                if found:
                    assert set(found.group(1).split(",")) <= extras(), (where, arg, extras())
        elif cmd[:3] == ["python", "-m", "pytest"]:
            pytest_help = pytest_help or _pytest_help()
            for arg in cmd[3:]:
                if arg.startswith("--"):
                    assert arg.split("=")[0] in pytest_help, f"{where}: pytest has no option {arg}"
                elif not arg.startswith("-"):
                    assert os.path.exists(os.path.join(ROOT, arg.split("::")[0])), (where, arg)
        elif cmd[0] == "corda-kernels":
            try:
                build_parser().parse_args(cmd[1:])
            except SystemExit as exc:
                raise AssertionError(f"{where}: `{shlex.join(cmd)}` does not parse") from exc
            if run_cli_help:
                done = cli([cmd[1], "--help"])
                assert done.returncode == 0, done.stderr
        elif cmd[:2] == ["bash", "bench/gpu/run.sh"]:  # its --small run is tests/bench/test_gpu_check.py
            done = subprocess.run(["bash", os.path.join(ROOT, cmd[1]), "--help"], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            for arg in cmd[2:]:
                assert not arg.startswith("--") or arg in done.stdout, f"{where}: run.sh has no option {arg}"
        else:
            raise AssertionError(f"{where}: command not covered by the docs checks: {cmd}")


def check_inline_commands(text: str, where: str) -> int:
    """Commands quoted inline (`python bench/gpu/x.py`, `corda-kernels report`, ...) exist; returns
    how many were checked."""
    from corda_kernels import cli as cli_package

    spans = re.findall(r"`((?:python|corda-kernels) [^`]+)`", text)
    for span in spans:
        words = shlex.split(span)
        if words[0] == "corda-kernels" and words[1].startswith("-"):  # a top-level flag: run it
            command = [sys.executable, "-m", "corda_kernels.cli", *words[1:]]
            proc = subprocess.run(command, capture_output=True, text=True)
            assert proc.returncode == 0 and proc.stdout.strip(), (where, span, proc.stderr[-2000:])
        elif words[0] == "corda-kernels":
            assert words[1] in cli_package.COMMANDS, (where, span)
        elif words[1] == "-m":
            assert words[2] == "pytest", (where, span)
            paths = [w for w in words[3:] if not w.startswith("-") and "/" in w or w in ("bench", "tests")]
            for path in paths:
                assert os.path.exists(os.path.join(ROOT, path.split("::")[0])), (where, span)
        else:
            assert os.path.exists(os.path.join(ROOT, words[1])), (where, span)
    return len(spans)
