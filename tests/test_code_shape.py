"""The shape issue #22 holds the code to: no function in raysae/ over 60 lines, no class over
300, and the README's layout names every module (so a new file cannot hide from the map)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "raysae"
MAX_FUNCTION, MAX_CLASS = 60, 300


def _too_long(package: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            limit = (MAX_FUNCTION if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                     else MAX_CLASS if isinstance(node, ast.ClassDef) else None)
            if limit is not None and node.end_lineno - node.lineno + 1 > limit:
                lines = node.end_lineno - node.lineno + 1
                out.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.name}: {lines} lines")
    return out


def test_no_function_over_60_lines_no_class_over_300() -> None:
    assert _too_long() == []


def test_the_limits_see_a_long_function(tmp_path: Path) -> None:
    lines = [f"    x{i} = {i}" for i in range(MAX_FUNCTION)]
    long, ok = "\n".join(lines), "\n".join(lines[:-1])  # 61 and 60 lines with the def
    (tmp_path / "long.py").write_text(f"def f():\n{long}\n\n\ndef g():\n{ok}\n")
    assert [e.split(" ", 1)[1] for e in _too_long(tmp_path)] == [f"f: {MAX_FUNCTION + 1} lines"]


def test_readme_layout_lists_every_module() -> None:
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\s+([\w.]+\.py)\b", layout, flags=re.M))
    modules = {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert modules - named == set()
