"""SQLite across a power cut: redemptions commit without waiting for the disk, so a
start after an unclean stop voids every token not yet redeemed; a clean stop leaves a
marker that spares them."""

from __future__ import annotations

import os

from cpvm.manager.config import DatabaseConfig
from cpvm.manager.connections import Tx, connect_sync, run_sync, sqlite_connect

CLEAN_STOP_SUFFIX = ".clean-stop"


def recover_sqlite(config: DatabaseConfig, now: float) -> int | None:
    """Start-up, before anything is served (SQLite only): keep tokens one-time across a
    power cut.

    Redemptions commit without waiting for the disk (``Database.run(durable=False)``): a
    manager crash loses nothing, but a power cut or kernel crash can forget the last ones,
    and a forgotten redemption would let its token be redeemed again. So unless the
    previous run left its clean-stop marker (written by ``Database.close`` once everything
    was on disk), every token not yet redeemed is voided here, durably. Returns the number
    voided, or None after a clean stop.
    """
    assert config.kind == "sqlite" and config.path is not None
    marker = config.path + CLEAN_STOP_SUFFIX
    if os.path.exists(marker):
        # Gone, durably, before the first redemption: a crash from now on must sweep.
        os.unlink(marker)
        _fsync_dir(marker)
        return None
    conn = connect_sync(config)
    try:
        return run_sync(conn, "sqlite", _void_unredeemed, now)
    finally:
        conn.close()


def _void_unredeemed(tx: Tx, now: float) -> int:
    tx.execute(
        "UPDATE console_sessions SET ended_at = ?, end_reason = 'voided', token_hash = NULL, "
        "extra_hash = NULL WHERE acquired_at IS NULL AND ended_at IS NULL",
        (now,),
    )
    return tx.rowcount


def mark_clean_stop(path: str) -> bool:
    """After the pool closed: everything committed goes into the database file, on disk;
    then the marker says so. False (no marker) if the checkpoint could not complete."""
    conn = sqlite_connect(path)
    try:
        busy, frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    if busy or frames != done:
        return False
    marker = path + CLEAN_STOP_SUFFIX
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(marker)
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
