"""The reference site in docs/ is built and executed, and the public API is documented.

- ``mkdocs build --strict`` succeeds (a broken link, reference or docstring section fails it), and
  the built site renders every name of ``corda_kernels.__all__`` with its sections.
- Every name of ``corda_kernels.__all__`` has a Google-style docstring whose ``Args:`` name exactly
  the signature's parameters, with ``Returns:`` when it returns something and ``Raises:`` listing
  at least the exceptions its own body raises.
- Every ``python`` block of ``docs/*.md`` runs (a page's blocks in order, in one namespace, in a
  temporary folder) unless preceded by ``<!-- not-run: reason -->``; those are few and explained.
- Every ``bash`` block's commands exist with their options; inline commands exist.
- The blocks moved from the README keep their checks: the ``corda-kernels init`` usage block
  against the parser (docs/cli.md), the layout block against the package (docs/development.md), the
  ops table against the public names and ``torch.library`` (docs/ops.md).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import dataclasses
import glob
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from doc_blocks import DOCS, ROOT, bash_commands, block, check_commands, check_inline_commands, read
from doc_blocks import fenced_blocks_with_notes as blocks_with_notes

import corda_kernels as ck
from corda_kernels import cli

PAGES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(DOCS, "*.md")))
MAX_NOT_RUN = 3  # blocks of docs/ the suite may skip (each says why)
PUBLIC = [name for name in ck.__all__ if name != "__version__"]
# Public callables that raise nothing of their own, and why (a Raises: section would be empty).
NO_RAISES = {"unpatch_peft": "it only removes what patch_peft set; a model without patches is returned as is"}
INTERNAL_EXCEPTIONS = {"StopForward"}  # control flow caught inside the function, never seen by a caller
GENERATED = {"bench/last_run.md"}  # files the docs name that a run writes (gitignored)


# ---------------------------------------------------------------------------------------------------------------------
# the site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings_handlers") is None:
        pytest.skip("the docs tools are not installed (pip install -e '.[docs]', also in '.[test]')")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return out


def test_mkdocs_build_strict(site):
    """The whole site builds with warnings as errors (broken links, unknown references, docstring
    parameters that are not in the signature, pages missing from the nav)."""
    pages = {os.path.relpath(p, site) for p in glob.glob(os.path.join(site, "**", "index.html"), recursive=True)}
    for page in PAGES:
        name = os.path.splitext(os.path.basename(page))[0]
        assert ("index.html" if name == "index" else f"{name}/index.html") in pages, page


def _rendered(site) -> dict[str, str]:
    """Object id -> the HTML of its rendered block (up to the next object heading)."""
    found = {}
    for path in glob.glob(os.path.join(site, "**", "index.html"), recursive=True):
        html = open(path, encoding="utf-8").read()
        heads = list(re.finditer(r'id="(corda_kernels\.[\w.]+)"', html))
        for i, m in enumerate(heads):
            end = heads[i + 1].start() if i + 1 < len(heads) else len(html)
            found.setdefault(m.group(1), html[m.start() : end])
    return found


def _rendered_block(rendered: dict[str, str], name: str) -> str:
    """The rendered block of public ``name``: under ``corda_kernels.NAME``, or under its defining
    module's path where a submodule of the same name shadows it for the docs tools (co_svd)."""
    obj = getattr(ck, name)
    ids = [f"corda_kernels.{name}"]
    if hasattr(obj, "__qualname__"):
        ids.append(f"{obj.__module__}.{obj.__qualname__}")
    for key in ids:
        html = rendered.get(key)
        if html is not None and "doc-module-name" not in html.split("</h", 1)[0]:
            return html
    raise AssertionError(f"no docs page renders corda_kernels.{name} (::: corda_kernels.{name}); looked for {ids}")


def test_site_renders_every_public_name_with_its_sections(site):
    rendered = _rendered(site)
    for name in ck.__all__:
        _rendered_block(rendered, name)
    for name in PUBLIC:
        html = _rendered_block(rendered, name)
        sections = _sections(inspect.getdoc(getattr(ck, name)))
        for section, title in (("Args", "Parameters:"), ("Returns", "Returns:"), ("Raises", "Raises:")):
            if section in sections:
                assert title in html, f"corda_kernels.{name}: its {section} section is not rendered"
        assert ":func:" not in html and ":class:" not in html, f"corda_kernels.{name}: a Sphinx role shows raw"


# ---------------------------------------------------------------------------------------------------------------------
# the docstrings

SECTION = re.compile(r"^(Args|Returns|Raises|Attributes|Examples|Yields):\s*$")


def _sections(doc: str | None) -> dict[str, list[str]]:
    """Section title -> its entry names (the text before the colon of each 4-space-indented line)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in (doc or "").splitlines():
        head = SECTION.match(line)
        if head:
            current = sections.setdefault(head.group(1), [])
        elif current is not None and line and not line.startswith(" "):
            current = None  # back to prose
        elif current is not None:
            entry = re.match(r"^    (\*{0,2}\w+)(?: \([^)]*\))?:", line)
            if entry:
                current.append(entry.group(1))
    return sections


def _parameters(fn) -> list[str]:
    names = []
    for p in inspect.signature(fn).parameters.values():
        if p.name == "self":
            continue
        prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
        names.append(prefix + p.name)
    return names


def _own_raises(fn) -> set[str]:
    """Exception classes named in ``raise`` statements of ``fn``'s own body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name):
                names.add(exc.id)
    return names - INTERNAL_EXCEPTIONS


def _exception(name: str, module) -> type:
    found = getattr(builtins, name, None) or getattr(module, name, None)
    assert isinstance(found, type) and issubclass(found, BaseException), f"{name} is not an exception class"
    return found


def _check_callable(label: str, fn, doc: str, returns_value: bool) -> None:
    sections = _sections(doc)
    documented = sections.get("Args", [])
    wanted = _parameters(fn)
    if wanted:
        assert "Args" in sections, f"{label}: no Args: section"
        assert documented == [n for n in documented if n in wanted], f"{label}: Args names {documented}, not {wanted}"
        assert sorted(documented) == sorted(wanted), f"{label}: Args {documented} != signature {wanted}"
    if returns_value:
        assert sections.get("Returns") is not None, f"{label}: returns a value but has no Returns: section"
    module = inspect.getmodule(fn)
    own = _own_raises(fn)
    if label.split(".")[-1] in NO_RAISES:
        assert not own, f"{label} is listed as raising nothing but raises {own}"
        return
    assert sections.get("Raises"), f"{label}: no Raises: section (or list it in NO_RAISES with the reason)"
    listed = [_exception(name, module) for name in sections["Raises"]]
    for name in own:
        exc = _exception(name, module)
        assert any(issubclass(exc, cls) for cls in listed), f"{label} raises {name}, not in its Raises: section"


def _returns_value(fn) -> bool:
    annotation = inspect.signature(fn).return_annotation
    if annotation is inspect.Signature.empty:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        return any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(tree))
    return annotation not in (None, "None")


@pytest.mark.parametrize("name", PUBLIC)
def test_public_docstring_sections(name):
    obj = getattr(ck, name)
    doc = inspect.getdoc(obj)
    assert doc and len(doc.splitlines()) >= 3, f"corda_kernels.{name}: a docstring of a few lines is expected"
    label = f"corda_kernels.{name}"
    if inspect.isclass(obj) and issubclass(obj, Warning):
        return  # a warning category: what it signals and how to silence it, no sections
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        fields = [f.name for f in dataclasses.fields(obj)]
        assert sorted(_sections(doc).get("Attributes", [])) == sorted(fields), f"{label}: Attributes != {fields}"
        return
    if inspect.isclass(obj):
        _check_callable(label, obj.__init__, doc, returns_value=False)
        return
    fn = inspect.unwrap(obj)
    _check_callable(label, fn, doc, _returns_value(fn))


def test_version_is_documented():
    source = read("corda_kernels/_version.py")
    assert re.search(r'^__version__ = "[^"]+"\n"""[^"]+"""', source, re.M), "__version__ needs its attribute docstring"


# ---------------------------------------------------------------------------------------------------------------------
# the code blocks


def _python_blocks(page: str) -> list[tuple[str, str | None]]:
    return [(body, note) for lang, body, note in blocks_with_notes(read(page)) if lang == "python"]


def test_docs_have_python_blocks():
    assert sum(len(_python_blocks(page)) for page in PAGES) >= 15


def test_not_run_blocks_are_few_and_explained():
    skipped = [(page, note) for page in PAGES for _, note in _python_blocks(page) if note is not None]
    assert len(skipped) <= MAX_NOT_RUN, f"{len(skipped)} blocks of docs/ are not run: {skipped}"
    for page, note in skipped:
        assert len(note.split()) >= 3, f"{page}: a not-run block needs its reason, got {note!r}"


@pytest.mark.parametrize("page", [p for p in PAGES if _python_blocks(p)])
def test_python_blocks_run(page, tmp_path, monkeypatch):
    """A page's python blocks, in order, in one namespace (a block may use the names of the ones
    before it), in a temporary working folder."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs.{os.path.basename(page)}"}
    torch.manual_seed(0)
    for i, (code, note) in enumerate(_python_blocks(page)):
        if note is None:
            exec(compile(code, f"{page}:python[{i}]", "exec"), namespace)


def test_bash_commands_exist():
    """Every command of every bash block of docs/: program, options, pip extras (the README's
    `corda-kernels init` is run at a small size by tests/test_readme.py)."""
    commands = [(page, cmd) for page in PAGES for cmd in bash_commands(read(page))]
    assert len(commands) >= 8
    for page, cmd in commands:
        check_commands([cmd], page, run_cli_help=False)
    subcommands = {cmd[1] for _, cmd in commands if cmd[0] == "corda-kernels"}
    assert subcommands == set(cli.COMMANDS), subcommands  # every command is shown in use somewhere


def test_inline_commands_exist():
    assert sum(check_inline_commands(read(page), page) for page in PAGES) >= 5


# ---------------------------------------------------------------------------------------------------------------------
# the blocks moved from the README, with their checks


def _usage_options(usage: str) -> dict[str, str | None]:
    """``--option`` -> the default the usage block shows (``[--rank 8]``), None when it shows a
    metavariable (``[--alpha A]``) or a choice list (``[--mode ipa|kpa]``)."""
    found = {}
    for name, value in re.findall(r"\[(--[\w-]+)(?: ([^\]\s\[]+))?", usage):
        is_default = value is not None and value != "" and not value.isupper() and "|" not in value
        found[name] = value if is_default else None
    return found


def test_init_usage_block_matches_the_parser():
    usage = block(read("docs/cli.md"), "", "corda-kernels init [--model", "docs/cli.md")
    parser = argparse.ArgumentParser()
    cli.init.add_arguments(parser)
    actions = {opt: a for a in parser._actions for opt in a.option_strings}
    shown = _usage_options(usage)
    assert len(shown) >= 10, shown
    for option, default in shown.items():
        assert option in actions, f"docs/cli.md shows {option}, which `corda-kernels init` does not have"
        action = actions[option]
        if default is not None:
            assert str(action.default) == default, (option, action.default, default)
        if action.choices:
            listed = re.search(re.escape(option) + r" ([\w|]+)", usage)
            assert listed and set(listed.group(1).split("|")) == set(action.choices), (option, action.choices)
    for action in parser._actions:
        if action.option_strings and action.option_strings != ["-h", "--help"]:
            shown_once = any(opt in usage for opt in action.option_strings)
            assert shown_once, f"docs/cli.md's usage omits {action.option_strings}"


def test_layout_block_names_every_module():
    layout = block(read("docs/development.md"), "", "corda_kernels/\n", "docs/development.md")
    named = set(re.findall(r"[\w./]+", layout))
    package = os.path.join(ROOT, "corda_kernels")
    for entry in sorted(os.listdir(package)):
        if entry.startswith("__pycache__") or entry == "data" or entry.endswith((".so", ".pyd")):
            continue
        if entry.endswith(".py") or os.path.isdir(os.path.join(package, entry)):
            label = entry if entry.endswith(".py") else entry + "/"
            assert label in named or entry in named, f"the layout does not name corda_kernels/{label}"
    for sub in ("calibration", "decomposition", "export"):  # the stage packages: each module named on their line
        (line,) = [line for line in layout.splitlines() if line.strip().startswith(sub + "/")]
        for module in os.listdir(os.path.join(package, sub)):
            if module.endswith(".py") and module != "__init__.py":
                assert re.search(rf"\b{module[:-3]}\b", line), f"the layout's {sub}/ line omits {module}"
    for line in layout.splitlines():
        head = line.split()[0] if line.strip() else ""
        if head.endswith("/") and head != "corda_kernels/" and not line.startswith("  "):
            assert os.path.isdir(os.path.join(ROOT, head)), head
        elif line.startswith("  ") and head:
            for word in line.split("  ")[1].split():  # the file names before the description
                base = word.rstrip("/")
                assert os.path.exists(os.path.join(package, base)), f"the layout names {word}, missing"


def test_ops_table_and_registration_claims():
    table = read("docs/ops.md").split("## The ops", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `(\w+)", table, re.M) + re.findall(r"^\| `\w+[^|]*`, `(\w+)", table, re.M)
    assert len(names) >= 6, names
    for name in names:
        assert callable(getattr(ck, name, None)), f"the ops table names ck.{name}, which is not public"
    paragraph = [p for p in table.split("\n\n") if "are custom ops registered with" in p]
    assert paragraph, "the ops page no longer says which ops are registered with torch.library"
    claimed = re.findall(r"`(\w+)`", paragraph[0].split("are custom ops registered with", 1)[0])
    assert claimed, paragraph
    namespace = torch.ops.corda_kernels
    for name in claimed:
        assert hasattr(namespace, name), f"the ops page says {name} is registered with torch.library"
    for name in names:
        if name not in claimed:
            assert not hasattr(namespace, name), f"{name} is registered but the ops page says it is not"


def test_paths_named_in_docs_exist():
    """Files quoted in docs/ (`bench/results/x.md`, `tests/test_x.py::test_y`, `corda_kernels/...`) exist."""
    named = 0
    for page in PAGES:
        for path in re.findall(r"`((?:bench|tests|corda_kernels|csrc)/[\w./-]+)(?:::\w+)?`", read(page)):
            named += 1
            if path in GENERATED:
                continue
            assert os.path.exists(os.path.join(ROOT, path)), f"{page} names {path}, which does not exist"
    assert named >= 20, named
