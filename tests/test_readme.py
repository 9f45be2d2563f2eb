"""The README is executed: every fenced block and every inline command is checked against the code.

- ``python`` blocks run as written (the API snippet on the default GGUF model, end to end), then
  their outputs are checked (adapter + residual reproduce the original, merged model too).
- ``bash`` blocks: each ``&&``-separated command's program exists; ``pip install -e ".[x]"`` names
  extras that ``pyproject.toml`` declares; ``corda-kernels init`` runs at a small size (the
  arguments in ``SMALL_INIT`` are appended; nothing else is changed); ``python -m pytest`` is only
  checked to start (``--help``).
- The ``corda-kernels init`` usage block: every option exists with the default it shows.
- Inline commands (``python X.py``, ``python -m pytest bench ...``, ``corda-kernels CMD``): scripts
  exist, subcommands answer ``--help``.
- The layout block names every module and package of ``corda_kernels`` and every path it names exists.
- The ops table names public functions, and the ops it says are registered with ``torch.library`` are.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from corda_kernels import cli
from corda_kernels.integrations import loading

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()

# `corda-kernels init` at a small size: 8 texts of 32 tokens, the first two decoder blocks.
SMALL_INIT = ["--samples", "8", "--seq-len", "32", "--batch-size", "4", "--targets", r"model\.layers\.[01]\..*"]


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def block(language: str, containing: str) -> str:
    found = [body for lang, body in fenced_blocks(README) if lang == language and containing in body]
    assert len(found) == 1, f"expected one {language} block containing {containing!r}, found {len(found)}"
    return found[0]


def bash_commands() -> list[list[str]]:
    commands = []
    for lang, body in fenced_blocks(README):
        if lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    words = shlex.split(part, comments=True)
                    if words:
                        commands.append(words)
    return commands


def _cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``corda-kernels ARGS`` as a user runs it (the installed entry point), on this checkout."""
    exe = shutil.which("corda-kernels")
    cmd = [exe] if exe else [sys.executable, "-c", "import sys; from corda_kernels.cli import main; sys.exit(main())"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=900, **kwargs)


def test_readme_has_the_blocks_this_test_checks():
    langs = [lang for lang, _ in fenced_blocks(README)]
    assert langs.count("bash") >= 3 and langs.count("python") >= 1, langs
    assert any(cmd[:2] == ["corda-kernels", "init"] for cmd in bash_commands())


def _extras() -> set[str]:
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^(\w+)\s*=", section, re.M))


def test_bash_commands_exist():
    """Each command of the README's bash blocks: its program is there and the pip extras exist."""
    for cmd in bash_commands():
        if cmd[0] == "pip":
            assert cmd[1] == "install", cmd
            for arg in cmd[2:]:
                extras = re.fullmatch(r"\.\[([\w,]+)\]", arg)
                if extras:
                    assert set(extras.group(1).split(",")) <= _extras(), (arg, _extras())
        elif cmd[:3] == ["python", "-m", "pytest"]:
            done = subprocess.run([sys.executable, "-m", "pytest", "--help"], capture_output=True, text=True, cwd=ROOT)
            assert done.returncode == 0, done.stderr
            for arg in cmd[3:]:
                if arg.startswith("--"):
                    assert arg.split("=")[0] in done.stdout, f"pytest has no option {arg}"
                else:
                    assert os.path.exists(os.path.join(ROOT, arg)), arg
        elif cmd[0] == "corda-kernels":
            done = _cli([*cmd[1:], "--help"])
            assert done.returncode == 0, done.stderr
        elif cmd[:2] == ["bash", "bench/gpu/run.sh"]:  # its --small run is tests/test_gpu_check.py
            done = subprocess.run(["bash", os.path.join(ROOT, cmd[1]), "--help"], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            for arg in cmd[2:]:
                assert not arg.startswith("--") or arg in done.stdout, f"run.sh has no option {arg}"
        else:
            raise AssertionError(f"README command not covered by this test: {cmd}")


def _usage_options(usage: str) -> dict[str, str | None]:
    """``--option`` -> the default the usage block shows (``[--rank 8]``), None when it shows a
    metavariable (``[--alpha A]``) or a choice list (``[--mode ipa|kpa]``)."""
    found = {}
    for name, value in re.findall(r"\[(--[\w-]+)(?: ([^\]\s\[]+))?", usage):
        is_default = value is not None and value != "" and not value.isupper() and "|" not in value
        found[name] = value if is_default else None
    return found


def test_init_usage_block_matches_the_parser():
    import argparse

    usage = block("", "corda-kernels init [--model")
    parser = argparse.ArgumentParser()
    cli.init.add_arguments(parser)
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    shown = _usage_options(usage)
    assert len(shown) >= 10, shown
    for option, default in shown.items():
        assert option in actions, f"README shows {option}, which `corda-kernels init` does not have"
        action = actions[option]
        if default is not None:
            assert str(action.default) == default, (option, action.default, default)
        if action.choices:
            listed = re.search(re.escape(option) + r" ([\w|]+)", usage)
            assert listed and set(listed.group(1).split("|")) == set(action.choices), (option, action.choices)


def test_inline_commands_exist():
    """Commands quoted inline (`python bench/gpu/x.py`, `corda-kernels report`, ...) exist."""
    spans = re.findall(r"`((?:python|corda-kernels) [^`]+)`", README)
    assert spans
    subcommands = set(cli.COMMANDS)
    for span in spans:
        words = shlex.split(span)
        if words[0] == "corda-kernels" and words[1].startswith("-"):  # a top-level flag: run it
            command = [sys.executable, "-m", "corda_kernels.cli", *words[1:]]
            proc = subprocess.run(command, capture_output=True, text=True)
            assert proc.returncode == 0 and proc.stdout.strip(), (span, proc.stderr[-2000:])
        elif words[0] == "corda-kernels":
            assert words[1] in subcommands, span
        elif words[1] == "-m":
            assert words[2] == "pytest", span
            paths = [w for w in words[3:] if not w.startswith("-") and "/" in w or w in ("bench", "tests")]
            for path in paths:
                assert os.path.exists(os.path.join(ROOT, path.split("::")[0])), span
        else:
            assert os.path.exists(os.path.join(ROOT, words[1])), span


def test_layout_block_names_every_module():
    layout = block("", "corda_kernels/\n")
    named = set(re.findall(r"[\w./]+", layout))
    package = os.path.join(ROOT, "corda_kernels")
    for entry in sorted(os.listdir(package)):
        if entry.startswith("__pycache__") or entry == "data" or entry.endswith((".so", ".pyd")):
            continue
        if entry.endswith(".py") or os.path.isdir(os.path.join(package, entry)):
            label = entry if entry.endswith(".py") else entry + "/"
            assert label in named or entry in named, f"README layout does not name corda_kernels/{label}"
    for sub in ("calibration", "decomposition"):  # the stage packages: each module named on their line
        (line,) = [line for line in layout.splitlines() if line.strip().startswith(sub + "/")]
        for module in os.listdir(os.path.join(package, sub)):
            if module.endswith(".py") and module != "__init__.py":
                assert re.search(rf"\b{module[:-3]}\b", line), f"README layout's {sub}/ line omits {module}"
    for line in layout.splitlines():
        head = line.split()[0] if line.strip() else ""
        if head.endswith("/") and head != "corda_kernels/" and not line.startswith("  "):
            assert os.path.isdir(os.path.join(ROOT, head)), head
        elif line.startswith("  ") and head:
            for word in line.split("  ")[1].split():  # the file names before the description
                base = word.rstrip("/")
                assert os.path.exists(os.path.join(package, base)), f"README layout names {word}, missing"


def test_ops_table_and_registration_claims():
    import corda_kernels as ck

    table = README.split("## Ops (the kernels)", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `(\w+)", table, re.M) + re.findall(r"^\| `\w+[^|]*`, `(\w+)", table, re.M)
    assert len(names) >= 6, names
    for name in names:
        assert callable(getattr(ck, name, None)), f"README ops table names ck.{name}, which is not public"
    paragraph = [p for p in table.split("\n\n") if "are custom ops registered with" in p]
    assert paragraph, "the ops section no longer says which ops are registered with torch.library"
    claimed = re.findall(r"`(\w+)`", paragraph[0].split("are custom ops registered with", 1)[0])
    assert claimed, paragraph
    namespace = torch.ops.corda_kernels
    for name in claimed:
        assert hasattr(namespace, name), f"README says {name} is registered with torch.library"
    for name in names:
        if name not in claimed:
            assert not hasattr(namespace, name), f"{name} is registered but the README says it is not"


@pytest.mark.slow
def test_corda_kernels_init_at_small_size(tmp_path, smollm2):
    (cmd,) = [c for c in bash_commands() if c[:2] == ["corda-kernels", "init"]]
    done = _cli([*cmd[1:], *SMALL_INIT, "--no-progress"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "corda-out"  # the README's default --out
    for path in ["adapter/adapter_config.json", "residual_model/config.json", "report.json"]:
        assert (out / path).exists(), path
    assert "output check" in done.stdout and ": OK" in done.stdout


@pytest.mark.slow
def test_python_api_snippet_end_to_end(tmp_path, smollm2, monkeypatch):
    """The README's Python API block as written, on the default GGUF model (the block loads it)."""
    code = block("python", "import corda_kernels as ck")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md:python", "exec"), namespace)
    model, tokenizer = namespace["model"], namespace["tokenizer"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original, _ = loading.load_model(None, None)
    batch = tokenizer(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        want = original(**batch).logits
        adapted = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(tmp_path / "residual")), str(tmp_path / "adapter")
        ).eval()
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
        assert (adapted(**batch).logits - want).abs().max() < 2e-4
        assert (merged(**batch).logits - want).abs().max() < 2e-4
        assert (model(**batch).logits - want).abs().max() < 2e-4
