"""Fixtures and ordering shared by the packaging tests.

``deb`` (one build) and ``installed`` (one apt installation, purged at the end) are
session-wide, so every module of ``tests/packaging`` runs against the same installed copy.
Tests marked ``purges_package`` (``test_purge_leaves_nothing``) run after every other
packaging test, whatever the module order. Deselect the lot with ``-m "not packaging"``
(about a minute, root, installs and purges the .deb).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging import package

_HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "packaging: builds, installs (apt, as root) and purges the cpvm .deb"
    )
    config.addinivalue_line(
        "markers", "purges_package: purges the installed .deb; runs after the other packaging tests"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the purging tests behind the last other packaging test."""
    purging = [i for i in items if i.get_closest_marker("purges_package")]
    if not purging:
        return
    rest = [i for i in items if not i.get_closest_marker("purges_package")]
    last = max(
        (n for n, i in enumerate(rest) if _HERE in Path(str(i.path)).parents), default=len(rest) - 1
    )
    items[:] = rest[: last + 1] + purging + rest[last + 1 :]


@pytest.fixture(scope="session")
def deb() -> Path:
    """The .deb, built with the documented command."""
    return package.build()


@pytest.fixture(scope="session")
def installed(deb: Path) -> Iterator[Path]:
    """The package installed with apt (a previous copy purged first); purged afterwards."""
    package.install(deb)
    yield deb
    if package.package_state() != "not-installed":
        package.purge()
