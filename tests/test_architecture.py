"""The package's shape (docs/ARCHITECTURE.md), checked on every `pytest` run: the import-linter
layer contracts, module size, no private names across modules, one home for the GDWS node pattern.
(That `import gdws_onnx` stays light is tests/test_startup.py.)"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gdws_onnx"
MAX_LINES = 800
PATTERN_MODULE = "gdws_onnx/graph/pattern.py"


def _modules() -> list[tuple[str, Path]]:
    """(dotted name, path) of every module in gdws_onnx."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return found


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _import_target(node: ast.ImportFrom, module: str, path: Path) -> str:
    """The absolute module an `from ... import` reads, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(source: str, module: str, path: Path) -> list[str]:
    """'line: what' for each private name of another gdws_onnx module this source uses: imported
    (`from gdws_onnx.x import _name`) or reached through an imported module or name (`x._name`)."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> the gdws_onnx thing it stands for
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _import_target(node, module, path)
            if target.split(".")[0] != "gdws_onnx":
                continue
            for alias in node.names:
                if _is_private(alias.name) and target != module:
                    found.append(f"{node.lineno}: from {target} import {alias.name}")
                bound[alias.asname or alias.name] = f"{target}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gdws_onnx":
                    bound[alias.asname or "gdws_onnx"] = alias.name if alias.asname else "gdws_onnx"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr) and isinstance(node.value, ast.Name) \
                and node.value.id in bound:
            found.append(f"{node.lineno}: {node.value.id}.{node.attr} ({bound[node.value.id]})")
    return found


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (they may describe the pattern)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                ids.add(id(first.value))
    return ids


def pattern_strings(source: str, scopes: tuple[str, ...]) -> list[str]:
    """'line: text' for each string literal (f-string parts included, docstrings not) that spells
    a node-name scope such as '/gdws/' or '.../gdws'."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    spelled = re.compile(r"/(%s)(/|$)" % "|".join(map(re.escape, scopes)))
    return [f"{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and spelled.search(node.value)]


def flag_strings(source: str, flags: set[str]) -> list[str]:
    """'line: text' for each string literal (f-string parts included, docstrings not) that names
    one of `flags` (`--error-budget`, not `--error-budget-x`)."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    token = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
    return [f"{node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
            and set(token.findall(node.value)) & flags]


def _cli_flags() -> set[str]:
    """Every flag of every `onnx-gdws` subcommand."""
    import click

    from gdws_onnx.cli import main

    ctx = click.Context(main)
    return {opt for name in main.list_commands(ctx) for p in main.get_command(ctx, name).params
            for opt in (*p.opts, *p.secondary_opts) if opt.startswith("--")}


# ------------------------------------------------------------------------------------- the checks


def test_import_linter_contracts_hold(monkeypatch, capsys):
    """The layer contracts in pyproject.toml (what `lint-imports` checks in CI), so a plain
    `pytest` run checks them too."""
    from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))  # lint_imports prepends the cwd
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == EXIT_STATUS_SUCCESS, capsys.readouterr().out


def test_no_module_is_longer_than_the_limit():
    long = {_rel(p): n for _, p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them by idea): {long}"


def test_no_private_name_is_used_across_modules():
    """A name another module needs is public and documented; `_name` stays in its module."""
    used = {_rel(p): hits for m, p in _modules() if (hits := private_imports(p.read_text(), m, p))}
    assert not used, f"private names used across modules: {used}"


def test_only_the_pattern_module_spells_node_names():
    """graph/pattern.py is the one place that knows how rewritten nodes are named."""
    from gdws_onnx.graph.pattern import SCOPES

    spelled = {_rel(p): hits for _, p in _modules()
               if _rel(p) != PATTERN_MODULE and (hits := pattern_strings(p.read_text(), SCOPES))}
    assert not spelled, f"node-name scopes spelled outside {PATTERN_MODULE}: {spelled}"


def test_nothing_below_the_cli_names_a_cli_flag():
    """The library names parameters (OptionError, OptionText); only gdws_onnx/cli knows flags."""
    flags = _cli_flags()
    assert {"--error-budget", "--no-skip-first", "--exclude"} <= flags
    named = {_rel(p): hits for m, p in _modules()
             if not m.startswith("gdws_onnx.cli") and (hits := flag_strings(p.read_text(), flags))}
    assert not named, f"CLI flags named below the CLI (name the parameter: errors.OptionText): {named}"


# ------------------------------------------------------------------- the scanners catch what they claim


@pytest.mark.parametrize("source,module,hits", [
    ("from gdws_onnx.graph.rewrite import _consumed, replace_convs", "gdws_onnx.graph.fold", 1),
    ("from .rewrite import _consumed", "gdws_onnx.graph.fold", 1),
    ("from ..eval.attacks import _project as project", "gdws_onnx.alphas.noise_gain", 1),
    ("from gdws_onnx.core import decompose\ndecompose._helper(1)", "gdws_onnx.graph.fold", 1),
    ("import gdws_onnx.core.decompose as d\nd._x", "gdws_onnx.graph.fold", 1),
    ("from gdws_onnx import __version__\nfrom gdws_onnx.core import decompose\ndecompose.spectrum(1)",
     "gdws_onnx.graph.fold", 0),
    ("from numpy import _private\nself._cache = 1", "gdws_onnx.graph.fold", 0),
])
def test_private_name_scanner(source, module, hits):
    path = PACKAGE / Path(*module.split(".")[1:]).with_suffix(".py")
    assert len(private_imports(source, module, path)) == hits


def test_pattern_scanner_reads_code_not_docstrings():
    source = ('"""Nodes are named <conv>/gdws/dw."""\n'
              'def f(site):\n    """Finds \'<conv>/gdws/gather\'."""\n'
              '    base = f"{site.name}/gdws"\n    return "/ssvd/a" in base, "~/.cache/onnx-gdws/x.json"\n')
    assert [h.split(":")[0] for h in pattern_strings(source, ("gdws", "ssvd"))] == ["4", "5"]


def test_flag_scanner_reads_code_not_docstrings():
    source = ('"""Reads what `optimize --alphas` writes."""\n'
              'def f():\n    """--force rewrites anyway."""\n'
              '    a = "use --force"\n    b = f"{a} --no-skip-first"\n'
              '    return "pip install --no-deps x", "--forced-x", "a--force"\n')
    hits = flag_strings(source, {"--force", "--no-skip-first", "--alphas"})
    assert [h.split(":")[0] for h in hits] == ["4", "5"]
