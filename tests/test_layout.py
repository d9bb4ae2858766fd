"""Imports point one way: detectors -> knowledge -> agent; eval and finetune sit on top.

Checked statically with ``ast`` (nothing is imported), so a forbidden import fails
here even if it sits in a function body or behind ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN: dict[str, frozenset[str]] = {
    "detectors": frozenset({"knowledge", "agent", "eval", "finetune"}),
    "knowledge": frozenset({"agent", "eval", "finetune"}),
    "agent": frozenset({"eval", "finetune"}),
}
EXEMPT = {Path("agent/cli.py")}
"""The CLI is the composition root: it may wire evaluation and fine-tuning in."""


def _package_of(path: Path) -> list[str]:
    """Package parts that relative imports in ``path`` start from."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1]  # a module's package; for __init__.py, the package itself


def imported_packages(source: str, package: list[str]) -> set[tuple[int, str]]:
    """(line, top-level package) of every import in ``source``, relative ones resolved against ``package``."""
    found: set[tuple[int, str]] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update((node.lineno, alias.name.split(".")[0]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add((node.lineno, (node.module or "").split(".")[0]))
            else:
                base = package[: max(0, len(package) - (node.level - 1))]
                target = [*base, *(node.module.split(".") if node.module else [])]
                found.update((node.lineno, name) for name in (target[:1] or [a.name for a in node.names]))
        elif isinstance(node, ast.Call):
            # importlib.import_module("agent.x") / __import__("agent")
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            arg = node.args[0] if node.args else None
            if name in ("import_module", "__import__") and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add((node.lineno, arg.value.split(".")[0]))
    return found


def _files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py")
                  if p.relative_to(ROOT) not in EXEMPT and "__pycache__" not in p.parts)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    files = _files(package)
    assert files, f"no Python files under {package}/"
    bad = []
    for path in files:
        for line, top in sorted(imported_packages(path.read_text(encoding="utf-8"), _package_of(path))):
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    assert not bad, f"{package}/ must not import {sorted(FORBIDDEN[package])}:\n" + "\n".join(bad)


def test_checker_sees_every_import_form() -> None:
    source = (
        "import agent.records\n"
        "from eval import hdfs\n"
        "from ..knowledge import store\n"
        "def f():\n    import finetune\n"
        "import importlib\nimportlib.import_module('prompts.x')\n"
        "from . import base\n"
        "from .. import agent\n"
    )
    found = imported_packages(source, ["detectors", "logs"])
    assert {top for _, top in found} == {"agent", "eval", "detectors", "finetune", "importlib", "prompts"}
    # "from ..knowledge" in detectors/logs/x.py is detectors.knowledge, not the knowledge package
    assert (3, "detectors") in found
    # at the top of a package, "from .. import agent" would name the top-level package
    assert (1, "agent") in imported_packages("from .. import agent\n", [])
