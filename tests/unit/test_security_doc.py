"""docs/security.md maps each threat to tests: every test it names must exist, so the page
cannot silently point auditors at tests that were renamed or removed."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+)(?:\[[^\]`]*\])?)?`")


def _references(text: str) -> list[tuple[str, str | None]]:
    refs, current = [], None
    for m in REFERENCE.finditer(text):
        path, name = m.group(1), m.group(2)
        current = path or current
        if path or name:
            refs.append((current, name))
    return refs


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def test_every_test_named_in_security_md_exists():
    refs = _references((ROOT / "docs" / "security.md").read_text())
    assert len(refs) > 50  # the page is the map; an empty parse would prove nothing
    missing = []
    for path, name in refs:
        file = ROOT / path
        if not file.is_file() or (name and name not in _test_names(file)):
            missing.append(f"{path}::{name}" if name else path)
    assert missing == []


def test_the_check_notices_a_missing_test():
    refs = _references(
        "`tests/unit/test_contract.py::test_no_such_test` and `::test_vnc_tls_modes_are_one_list[x]`"
    )
    assert refs == [
        ("tests/unit/test_contract.py", "test_no_such_test"),
        ("tests/unit/test_contract.py", "test_vnc_tls_modes_are_one_list"),
    ]
    names = _test_names(ROOT / "tests/unit/test_contract.py")
    assert "test_no_such_test" not in names and "test_vnc_tls_modes_are_one_list" in names
