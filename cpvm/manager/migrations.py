"""The schema: numbered migrations recorded in ``schema_version``, one list for SQLite
and PostgreSQL, applied at start-up and by every ``cpvm-manager-admin`` run. Several
managers starting at once serialise on a PostgreSQL advisory lock.
"""

from __future__ import annotations

from cpvm.manager.config import DatabaseConfig
from cpvm.manager.connections import Tx, connect_sync, run_sync

# Key for pg_advisory_xact_lock: serialises migrations of several managers starting at once.
_MIGRATION_LOCK = 0x63707677

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE accounts (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                role TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                disabled INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE api_keys (
                id TEXT PRIMARY KEY,
                account_id TEXT NOT NULL REFERENCES accounts(id),
                api_key TEXT NOT NULL UNIQUE,
                secret_enc TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION
            )""",
            """CREATE TABLE vms (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                owner_id TEXT NOT NULL REFERENCES accounts(id),
                state TEXT NOT NULL,
                vnc_host TEXT NOT NULL,
                vnc_port INTEGER NOT NULL,
                vnc_password_enc TEXT,
                vnc_tls TEXT NOT NULL,
                vnc_ca_pem TEXT,
                vnc_server_name TEXT,
                created_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE proxies (
                id TEXT PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                secret_hash TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION,
                public_host TEXT,
                public_port INTEGER,
                tls INTEGER,
                address TEXT,
                capacity INTEGER,
                active_count INTEGER NOT NULL DEFAULT 0,
                version TEXT,
                last_heartbeat DOUBLE PRECISION
            )""",
            """CREATE TABLE console_sessions (
                id TEXT PRIMARY KEY,
                token_hash TEXT UNIQUE,
                extra_hash TEXT,
                expires_at DOUBLE PRECISION NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                account_id TEXT NOT NULL,
                account_name TEXT NOT NULL,
                vm_id TEXT NOT NULL,
                vm_name TEXT NOT NULL,
                proxy_id TEXT NOT NULL,
                creator_address TEXT,
                bound_address TEXT,
                acquired_at DOUBLE PRECISION,
                client_address TEXT,
                ended_at DOUBLE PRECISION,
                end_reason TEXT,
                bytes_to_client BIGINT,
                bytes_to_server BIGINT,
                duration DOUBLE PRECISION,
                terminate_requested_at DOUBLE PRECISION
            )""",
            "CREATE INDEX console_sessions_proxy ON console_sessions (proxy_id, ended_at)",
            "CREATE INDEX console_sessions_vm ON console_sessions (vm_id, ended_at)",
            "CREATE INDEX console_sessions_created ON console_sessions (created_at)",
        ],
    ),
    (
        2,
        [
            # Which worker process of the proxy redeemed the session: its heartbeats list
            # the sessions it still has, so the others can be ended (crash, restart).
            "ALTER TABLE console_sessions ADD COLUMN worker INTEGER NOT NULL DEFAULT 0",
        ],
    ),
    (
        3,
        [
            # Choosing a proxy for each new token counts the open sessions (ended_at IS
            # NULL): with this index a few rows, not the whole retained history
            # (docs/performance.md has the figures); the retention cleanup's range on
            # ended_at uses it too.
            "CREATE INDEX console_sessions_ended ON console_sessions (ended_at)",
        ],
    ),
    (
        4,
        [
            # Per proxy key, set by the administrator (cpvm-manager-admin proxy-key
            # create|update): the most capacity a heartbeat may claim, and the networks
            # its calls may come from (canonical CIDRs, space-separated). NULL: no limit.
            "ALTER TABLE proxies ADD COLUMN max_capacity INTEGER",
            "ALTER TABLE proxies ADD COLUMN allowed_networks TEXT",
        ],
    ),
    (
        5,
        [
            # One running cpvm instance per proxy key (cpvm/manager/instances.py): the
            # instance the key is bound to, when it was last heard from and from where,
            # and the last instance refused for holding the same key.
            "ALTER TABLE proxies ADD COLUMN instance_id TEXT",
            "ALTER TABLE proxies ADD COLUMN instance_seen_at DOUBLE PRECISION",
            "ALTER TABLE proxies ADD COLUMN instance_address TEXT",
            "ALTER TABLE proxies ADD COLUMN refused_instance_id TEXT",
            "ALTER TABLE proxies ADD COLUMN refused_at DOUBLE PRECISION",
            "ALTER TABLE proxies ADD COLUMN refused_address TEXT",
        ],
    ),
    (
        6,
        [
            # Where each VM comes from: 'manual' (cpvm-manager-admin), 'api'
            # (addConsoleVirtualMachine) or 'libvirt:NAME' ([inventory.libvirt.NAME]);
            # discovery only ever touches its own. hostname / hypervisor: what
            # listVirtualMachines shows (the libvirt host, "KVM"), NULL when unknown.
            "ALTER TABLE vms ADD COLUMN source TEXT NOT NULL DEFAULT 'manual'",
            "ALTER TABLE vms ADD COLUMN hostname TEXT",
            "ALTER TABLE vms ADD COLUMN hypervisor TEXT",
            "CREATE INDEX vms_source ON vms (source)",
        ],
    ),
    (
        7,
        [
            # Signed URLs that open a console once (the legacy /client/console?cmd=access):
            # the hash of each one's signature until its expires, so a replay is refused
            # by every manager on the database (cpvm/manager/store/replays.py).
            """CREATE TABLE spent_signatures (
                signature_hash TEXT PRIMARY KEY,
                expires_at DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX spent_signatures_expires ON spent_signatures (expires_at)",
        ],
    ),
    (
        8,
        [
            # Viewer policy per VM (cpvm/manager/viewers.py): shared, exclusive or
            # takeover; NULL follows the manager's [sessions] viewer_policy.
            "ALTER TABLE vms ADD COLUMN viewer_policy TEXT",
            # A view-only console (createConsoleEndpoint viewonly=true): cpvm drops its
            # input, and it never counts against an exclusive or takeover policy.
            "ALTER TABLE console_sessions ADD COLUMN view_only INTEGER NOT NULL DEFAULT 0",
            # Why an end was requested ('terminated' by a person, 'taken_over' by a newer
            # console): the heartbeat tells the proxy, which closes with that code.
            "ALTER TABLE console_sessions ADD COLUMN end_request_reason TEXT",
        ],
    ),
    (
        9,
        [
            # The reconnect window (cpvm/manager/resume.py): the SHA-256 of the console
            # cookie of the browser that first redeemed the session, how often the session
            # was resumed since, and when last (reconciliation counts from then).
            "ALTER TABLE console_sessions ADD COLUMN browser_hash TEXT",
            "ALTER TABLE console_sessions ADD COLUMN reconnects INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE console_sessions ADD COLUMN resumed_at DOUBLE PRECISION",
        ],
    ),
    (
        10,
        [
            # Session recording (docs/recording.md). The policy per VM and per account:
            # 'always', 'never' or NULL (the [recording] default decides).
            "ALTER TABLE vms ADD COLUMN record_policy TEXT",
            "ALTER TABLE accounts ADD COLUMN record_policy TEXT",
            # Whether the redemption told the proxy to record, and what its end report
            # said of the file: size, SHA-256, duration, complete; when retention removed it.
            "ALTER TABLE console_sessions ADD COLUMN recorded INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE console_sessions ADD COLUMN recording_size BIGINT",
            "ALTER TABLE console_sessions ADD COLUMN recording_sha256 TEXT",
            "ALTER TABLE console_sessions ADD COLUMN recording_duration DOUBLE PRECISION",
            "ALTER TABLE console_sessions ADD COLUMN recording_complete INTEGER",
            "ALTER TABLE console_sessions ADD COLUMN recording_deleted_at DOUBLE PRECISION",
            # One-time playback URLs: the ticket's SHA-256 only, like console tokens.
            """CREATE TABLE playback_tickets (
                ticket_hash TEXT PRIMARY KEY,
                session_id TEXT NOT NULL,
                proxy_id TEXT NOT NULL,
                created_by TEXT NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                used_at DOUBLE PRECISION
            )""",
            "CREATE INDEX playback_tickets_expires ON playback_tickets (expires_at)",
        ],
    ),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]


def _current_version(tx: Tx) -> int:
    row = tx.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def apply(tx: Tx, now: float) -> list[int]:
    """Apply the migrations this database lacks, in one transaction; their versions."""
    if tx.kind == "postgresql":
        tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
    tx.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
    )
    current = _current_version(tx)
    if current > SCHEMA_VERSION:
        raise RuntimeError(
            f"database schema version {current} is newer than this manager ({SCHEMA_VERSION})"
        )
    applied = []
    for version, statements in MIGRATIONS:
        if version <= current:
            continue
        for statement in statements:
            tx.execute(statement)
        tx.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, now))
        applied.append(version)
    return applied


def migrate(config: DatabaseConfig, now: float) -> list[int]:
    """Bring the schema up to date; returns the versions applied. Safe to run concurrently."""
    conn = connect_sync(config)
    try:
        return run_sync(conn, config.kind, apply, now)
    finally:
        conn.close()
