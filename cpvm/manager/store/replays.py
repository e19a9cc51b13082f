"""Signed URLs that may be used once: a signature, once spent, is refused until it expires.

The legacy console URL (``/client/console?cmd=access``) is a signed GET a person opens in
a browser; like the console it leads to, it works once. Only a hash of the signature is
kept (the signature itself would let a reader of the database compute nothing, but it is
a credential until ``expires``), and only until the request's own ``expires``: after that
the signature check refuses it anyway.
"""

from __future__ import annotations

import hashlib

from cpvm.manager.db import Tx


def signature_hash(signature: str) -> str:
    """What is kept of a signature: SHA-256, hex."""
    return hashlib.sha256(signature.encode("utf-8")).hexdigest()


def spend_signature(tx: Tx, signature: str, expires_at: float) -> bool:
    """Record ``signature`` as spent; False if it already was (a replay).

    One statement that cannot fail on a duplicate (``ON CONFLICT DO NOTHING``, in SQLite
    and PostgreSQL alike), so two managers racing on one URL let exactly one through and
    neither transaction is aborted.
    """
    tx.execute(
        "INSERT INTO spent_signatures (signature_hash, expires_at) VALUES (?, ?) "
        "ON CONFLICT (signature_hash) DO NOTHING",
        (signature_hash(signature), expires_at),
    )
    return tx.rowcount == 1


def forget_expired_signatures(tx: Tx, now: float) -> int:
    """Delete the records of signatures whose requests have expired; how many."""
    tx.execute("DELETE FROM spent_signatures WHERE expires_at < ?", (now,))
    return tx.rowcount
