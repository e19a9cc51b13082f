"""Spent signatures (cpvm/manager/store/replays.py): one use each, on SQLite and on
PostgreSQL, and forgotten once their request expired."""

from __future__ import annotations

import time
import uuid

import pytest

from cpvm.manager import db, store
from cpvm.manager.config import DatabaseConfig


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        config = DatabaseConfig("sqlite", str(tmp_path / "m.db"), None, 1)
    else:
        postgres = request.getfixturevalue("postgres")
        config = DatabaseConfig(
            "postgresql", None, postgres.create_database(f"replays_{uuid.uuid4().hex[:12]}"), 1
        )
    db.migrate(config, time.time())
    conn = db.connect_sync(config)
    yield lambda fn, *args: db.run_sync(conn, config.kind, fn, *args)
    conn.close()


def test_a_signature_is_spent_once(database):
    assert database(store.spend_signature, "c2lnbmF0dXJl+/=", 2000.0) is True
    assert database(store.spend_signature, "c2lnbmF0dXJl+/=", 2000.0) is False
    assert database(store.spend_signature, "another", 2000.0) is True


def test_expired_signatures_are_forgotten_by_the_cleanup(database):
    database(store.spend_signature, "old", 1000.0)
    database(store.spend_signature, "new", 3000.0)
    database(store.cleanup, 2000.0, 60.0, 60.0, 86400.0)
    assert database(store.forget_expired_signatures, 4000.0) == 1  # only "new" was left
    assert database(store.spend_signature, "old", 5000.0) is True


def test_only_a_hash_is_kept(database):
    database(store.spend_signature, "the-signature", 2000.0)
    rows = database(lambda tx: tx.execute("SELECT signature_hash FROM spent_signatures").fetchall())
    assert rows == [(store.replays.signature_hash("the-signature"),)]
    assert "the-signature" not in rows[0][0]
