"""The package's parts import one way: proxy and manager never import each other;
common and rfb import neither (nor each other's private parts); the probe, a client of
both daemons, imports only what they share (common, rfb)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cpvm"

# part -> parts it must never import
FORBIDDEN = {
    "proxy": {"manager", "probe"},
    "manager": {"proxy", "probe"},
    "common": {"proxy", "manager", "rfb", "probe"},
    "rfb": {"proxy", "manager", "common", "probe"},
    "probe": {"proxy", "manager"},
}


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "cpvm":
                found += [(node.lineno, f"cpvm.{alias.name}") for alias in node.names]
    return found


def _violations(part: str, package: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted((package / part).rglob("*.py")):
        for line, module in _imported_modules(path):
            names = module.split(".")
            if names[0] == "cpvm" and len(names) > 1 and names[1] in FORBIDDEN[part]:
                bad.append(f"{path.relative_to(package)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_imports_run_one_way(part: str) -> None:
    assert (PACKAGE / part / "__init__.py").is_file()
    assert _violations(part) == []


def test_nothing_but_the_parts_at_the_top() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert modules == ["__init__.py"]
    parts = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert parts == ["common", "manager", "probe", "proxy", "rfb"]


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    # The checker itself can fail: each form of a forbidden import is reported.
    (tmp_path / "manager").mkdir()
    (tmp_path / "manager" / "bad.py").write_text(
        "from cpvm.proxy import session\nimport cpvm.proxy.web\n"
        "def f():\n    from cpvm import proxy\n"
    )
    assert _violations("manager", tmp_path) == [
        "manager/bad.py:1 imports cpvm.proxy",
        "manager/bad.py:2 imports cpvm.proxy.web",
        "manager/bad.py:4 imports cpvm.proxy",
    ]
