"""The README is executed: every fenced block and every inline command is checked against the code.

- ``python`` blocks run as written: the API snippet on the default GGUF model, end to end, then
  its outputs are checked (adapter + residual reproduce the original, merged model too); every
  other block (the PEFT drop-in) in a fresh namespace.
- ``bash`` blocks: each ``&&``-separated command's program exists; ``pip install -e ".[x]"`` names
  extras that ``pyproject.toml`` declares; ``corda-kernels`` commands parse with the real parser
  and ``corda-kernels init`` runs at a small size (the arguments in ``SMALL_INIT`` are appended;
  nothing else is changed); ``python -m pytest`` is only checked to start (``--help``).
- Inline commands (``python X.py``, ``python -m pytest bench ...``, ``corda-kernels CMD``): scripts
  exist, subcommands exist.
- The README stays a product page: short, no dated measurement prose (figures live in
  ``bench/results/``), and its links point at files that exist.

The reference blocks that used to be here (the ``init`` usage block, the layout block, the ops
table) moved to ``docs/`` with their checks: ``tests/test_docs.py``.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from doc_blocks import ROOT, bash_commands, block, check_commands, check_inline_commands, cli, fenced_blocks, read

from corda_kernels.integrations import loading

README = read("README.md")

# `corda-kernels init` at a small size: 8 texts of 32 tokens, the first two decoder blocks.
SMALL_INIT = ["--samples", "8", "--seq-len", "32", "--batch-size", "4", "--targets", r"model\.layers\.[01]\..*"]
API_SNIPPET = "import corda_kernels as ck\nfrom corda_kernels.integrations.loading"
MAX_LINES = 250


def test_readme_has_the_blocks_this_test_checks():
    langs = [lang for lang, _ in fenced_blocks(README)]
    assert langs.count("bash") >= 3 and langs.count("python") >= 1, langs
    assert any(cmd[:2] == ["corda-kernels", "init"] for cmd in bash_commands(README))


def test_bash_commands_exist():
    """Each command of the README's bash blocks: its program is there and its options and pip extras exist."""
    check_commands(bash_commands(README), "README")


def test_inline_commands_exist():
    """Commands quoted inline (`corda-kernels report`, ...) exist."""
    assert check_inline_commands(README, "README")


def test_readme_is_a_product_page():
    """Short, no dated measurement narrative (figures and their dates live in bench/results/), and
    every relative link points at a file of this checkout."""
    lines = README.splitlines()
    assert len(lines) <= MAX_LINES, f"README has {len(lines)} lines; the reference belongs in docs/"
    prose = re.sub(r"`[^`]*`", "", README)  # file names such as gpu-h200-2026-12-04.md are fine
    for pattern in (r"\b20\d\d-\d\d-\d\d\b", r"\bUTC\b", r"load average", r"\bidle (cores|machine)\b"):
        found = re.search(pattern, prose, re.I)
        assert not found, f"README carries dated measurement prose ({found.group(0)!r}); move it to bench/results/"
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not re.match(r"\w+://", target):
            assert os.path.exists(os.path.join(ROOT, target)), f"README links to {target}, which does not exist"
    for path in re.findall(r"`(bench/results/[^`]+)`", README):
        assert os.path.exists(os.path.join(ROOT, path)), path


def test_other_python_blocks_run(tmp_path, monkeypatch):
    """Every README python block besides the API snippet (run by the slow test below) runs as written."""
    others = [body for lang, body in fenced_blocks(README) if lang == "python" and API_SNIPPET not in body]
    assert others, "the README's PEFT drop-in block is gone"
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(others):
        exec(compile(code, f"README.md:python[{i}]", "exec"), {})


@pytest.mark.slow
def test_corda_kernels_init_at_small_size(tmp_path, smollm2):
    (cmd,) = [c for c in bash_commands(README) if c == ["corda-kernels", "init"]]
    done = cli([*cmd[1:], *SMALL_INIT, "--no-progress"], cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "corda-out"  # the README's default --out
    for path in ["adapter/adapter_config.json", "residual_model/config.json", "report.json"]:
        assert (out / path).exists(), path
    assert "output check" in done.stdout and ": OK" in done.stdout


@pytest.mark.slow
def test_python_api_snippet_end_to_end(tmp_path, smollm2, monkeypatch):
    """The README's Python API block as written, on the default GGUF model (the block loads it)."""
    code = block(README, "python", API_SNIPPET)
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
