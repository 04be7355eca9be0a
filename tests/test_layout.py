"""The layout targets of the package: sizes, private imports, and notebooks that do not repeat each other."""

from __future__ import annotations

import ast
import difflib
import itertools
import json
from pathlib import Path

import pytest

from clml_core.paths import NOTEBOOKS_DIR, PROJ_ROOT

PACKAGE = PROJ_ROOT / "clml_core"
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 300
MAX_ENGINE_LINES = 450
MAX_SHARED_NOTEBOOK_LINES = 7  # no two notebooks share a run of 8 or more identical code lines


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(PROJ_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def oversized(tree: ast.AST, function_limit: int, class_limit: int) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function longer than ``function_limit`` lines and every class longer
    than ``class_limit`` lines (from ``def``/``class`` to the end of the body, docstring included)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            length = node.end_lineno - node.lineno + 1
            if length > (class_limit if isinstance(node, ast.ClassDef) else function_limit):
                found.append((node.name, node.lineno, length))
    return found


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module an ``import from`` names, relative ones (``from .dataset import x``) resolved against ``package``."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def private_imports(tree: ast.AST, module: str, package: str) -> list[str]:
    """``from clml_core.x import _name`` (or ``from .x import _name``) of another module's private name, and
    ``import clml_core.x as m`` followed by ``m._name``; ``package`` is the importing module's package."""
    found, aliases = [], {}
    for node in ast.walk(tree):
        source = _absolute(node, package) if isinstance(node, ast.ImportFrom) else ""
        if source.startswith("clml_core"):
            for alias in node.names:
                if alias.name.startswith("_") and source != module:
                    found.append(f"from {source} import {alias.name}")
                aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("clml_core"):
                    aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_"):
            target = aliases.get(node.value.id)
            if target is not None and not node.attr.startswith("__") and target != module:
                found.append(f"{node.value.id}.{node.attr} ({target})")
    return found


def notebook_code_lines(path: Path) -> list[str]:
    """The notebook's code lines in order, stripped, blank lines left out (runs may continue across cells)."""
    cells = json.loads(path.read_text())["cells"]
    lines = [
        line.strip() for cell in cells if cell["cell_type"] == "code" for line in "".join(cell["source"]).split("\n")
    ]
    return [line for line in lines if line]


def longest_shared_run(a: list[str], b: list[str]) -> tuple[int, list[str]]:
    match = difflib.SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return match.size, a[match.a : match.a + match.size]


def test_the_checks_find_what_they_look_for():
    source = "def f():\n" + "    x = 1\n" * 3 + "class C:\n    def g(self):\n        pass\n"
    assert [name for name, _, _ in oversized(ast.parse(source), 3, 2)] == ["f", "C"]
    imports = (
        "from clml_core.engine import _x, y\nimport clml_core.losses as L\nL._hidden\nfrom clml_core import a\n"
        "a._b\nfrom .dataset import _m\nfrom . import _n\n"
    )
    assert private_imports(ast.parse(imports), "clml_core.data.other", "clml_core.data") == [
        "from clml_core.engine import _x",
        "from clml_core.data.dataset import _m",
        "from clml_core.data import _n",
        "L._hidden (clml_core.losses)",
        "a._b (clml_core.a)",
    ]
    assert longest_shared_run(["a", "b", "c", "d"], ["x", "b", "c", "y"]) == (2, ["b", "c"])


def test_the_engine_stays_small():
    lines = len((PACKAGE / "engine.py").read_text().splitlines())
    assert lines <= MAX_ENGINE_LINES, f"clml_core/engine.py has {lines} lines (at most {MAX_ENGINE_LINES})"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PROJ_ROOT)))
def test_no_function_or_class_is_too_long(path):
    found = oversized(ast.parse(path.read_text()), MAX_FUNCTION_LINES, MAX_CLASS_LINES)
    assert not found, f"{path.relative_to(PROJ_ROOT)}: " + ", ".join(
        f"{n} (line {at}, {k} lines)" for n, at, k in found
    )


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PROJ_ROOT)))
def test_no_module_imports_another_modules_private_name(path):
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = private_imports(ast.parse(path.read_text()), module, package)
    assert not found, f"{path.relative_to(PROJ_ROOT)}: {found}"


def test_no_two_notebooks_share_a_run_of_identical_lines():
    notebooks = {path.stem: notebook_code_lines(path) for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb"))}
    assert len(notebooks) >= 5
    for (name_a, a), (name_b, b) in itertools.combinations(notebooks.items(), 2):
        size, run = longest_shared_run(a, b)
        assert size <= MAX_SHARED_NOTEBOOK_LINES, f"{name_a} and {name_b} share {size} lines: {run}"
