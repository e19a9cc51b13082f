"""The house rule on size: no module in cpvm/ over 400 lines, no function over 60.

Long files and long functions are where a newcomer gets lost; the limits are the ones the
project's review asked for. A function's length counts every line from its `def` (or first
decorator) to its last line, docstring included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "cpvm"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MODULES = sorted(ROOT.rglob("*.py"))


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            yield node.name, first, node.end_lineno or node.lineno


def test_the_package_is_where_the_test_looks():
    assert len(MODULES) > 40, MODULES


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_short_enough(path: Path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_functions_are_short_enough(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    long = [
        f"{name} ({end - first + 1} lines, line {first})"
        for name, first, end in _functions(tree)
        if end - first + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{path.relative_to(ROOT)}: {', '.join(long)}"


def test_the_counter_sees_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"@decorated\ndef f():\n{body}\n")
    ((name, first, end),) = list(_functions(tree))
    assert (name, end - first + 1) == ("f", MAX_FUNCTION_LINES + 2)
