"""Fixtures for the manager tests: running managers, captured log events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.logger import globalLogPublisher

from tests.manager.harness import Manager, start_manager


@pytest.fixture
def log_events():
    """Every log event emitted while the test runs (no globalLogBeginner involved)."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest_twisted.async_yield_fixture
async def managers(tmp_path: Path):
    """``await managers(name, sections, clock=None)`` starts a manager; all stop afterwards."""
    started: list[Manager] = []

    async def start(name: str = "m1", sections: dict | None = None, clock: Any = None):
        manager = await start_manager(tmp_path / name, sections, clock)
        started.append(manager)
        return manager

    yield start
    for manager in started:
        await manager.stop()
