"""The schema's migrations, and the indexes the hot queries rely on (SQLite's planner)."""

from __future__ import annotations

import time

from cpvm.manager import db
from cpvm.manager.config import DatabaseConfig

# What choosing a proxy for a new token asks (store.live_proxies): open sessions only.
LOAD_QUERIES = [
    "SELECT proxy_id, COUNT(*) FROM console_sessions WHERE acquired_at IS NULL "
    "AND ended_at IS NULL AND expires_at >= 0 GROUP BY proxy_id",
    "SELECT proxy_id, COUNT(*) FROM console_sessions WHERE acquired_at IS NOT NULL "
    "AND ended_at IS NULL GROUP BY proxy_id",
]


def test_migrations_reach_the_latest_version_once(tmp_path):
    config = DatabaseConfig("sqlite", str(tmp_path / "m.db"), None, 1)
    assert db.migrate(config, time.time()) == [v for v, _ in db.MIGRATIONS]
    assert db.migrate(config, time.time()) == []
    conn = db.connect_sync(config)
    try:
        (version,) = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        assert version == db.SCHEMA_VERSION
    finally:
        conn.close()


def test_counting_open_sessions_searches_an_index(tmp_path):
    # A scan would grow with every session kept for retention_days.
    config = DatabaseConfig("sqlite", str(tmp_path / "m.db"), None, 1)
    db.migrate(config, time.time())
    conn = db.connect_sync(config)
    try:
        for query in LOAD_QUERIES:
            plan = " ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query))
            assert "SEARCH console_sessions USING INDEX console_sessions_ended" in plan, plan
    finally:
        conn.close()
