"""The installed packages import one way and in no circle: ``server/`` and ``trainer/`` import ``hpr/``, never each
other, and no module is in an import cycle, counting imports inside functions and under ``TYPE_CHECKING``.

The graph is read from the source with :mod:`ast` (nothing is imported), so a circle hidden in a function-local
import is found as well as one at the top of a file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hpr", "server", "trainer")
# What each installed package may import of the repository's own top-level packages (besides itself).
ALLOWED = {"hpr": set(), "server": {"hpr"}, "trainer": {"hpr"}}
REPO_PACKAGES = (*PACKAGES, "bench", "tests", "docs")


def module_files(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file under ``root/<package>``."""
    found: dict[str, Path] = {}
    for package in packages:
        for file in sorted((root / package).rglob("*.py")):
            parts = list(file.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = file
    return found


def _imported_names(module: str, file: Path) -> set[str]:
    """Every dotted name ``file`` imports, anywhere in it; ``from a import b`` gives ``a.b``, which resolves to the
    module ``a.b`` if there is one, else to ``a`` (``b`` is then a name defined in ``a``)."""
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: ``from .x import y`` inside package ``p`` is ``p.x``
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.update(base if alias.name == "*" else f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the modules of ``modules`` it imports (a name resolves to its longest known prefix)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, file in modules.items():
        targets = {resolve(name) for name in _imported_names(module, file)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: the import circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_module_is_in_an_import_cycle() -> None:
    modules = module_files(REPO_ROOT, PACKAGES)
    assert "hpr.checkpoint" in modules and "server.runtime" in modules and "trainer.cli" in modules
    assert cycles(import_graph(modules)) == []


def test_packages_import_one_way() -> None:
    """``hpr`` imports none of the others; ``server`` and ``trainer`` only ``hpr``; none imports bench/ or tests/."""
    wrong = []
    for module, file in module_files(REPO_ROOT, PACKAGES).items():
        own = module.split(".")[0]
        for name in _imported_names(module, file):
            top = name.split(".")[0]
            if top in REPO_PACKAGES and top != own and top not in ALLOWED[own]:
                wrong.append(f"{module} imports {name}")
    assert wrong == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # the circle this test was written for: a module-level import one way, a function-local one back
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "from pkg.b import f\n",
                "pkg/b.py": "def f():\n    from pkg import a\n    return a\n",
            },
            [["pkg.a", "pkg.b"]],
        ),
        # three modules, one of them through a relative import under TYPE_CHECKING
        (
            {
                "pkg/__init__.py": "",
                "pkg/a.py": "import pkg.b\n",
                "pkg/b.py": "from . import c\n",
                "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import X\n",
                "pkg/d.py": "from pkg.a import Y\n",  # imports into the circle without being in it
            },
            [["pkg.a", "pkg.b", "pkg.c"]],
        ),
        ({"pkg/__init__.py": "", "pkg/a.py": "from pkg.b import f\n", "pkg/b.py": "import os\n"}, []),
    ],
)
def test_cycles_are_found_through_any_kind_of_import(
    tmp_path: Path, files: dict[str, str], expected: list[list[str]]
) -> None:
    _write(tmp_path, files)
    assert cycles(import_graph(module_files(tmp_path, ("pkg",)))) == expected
