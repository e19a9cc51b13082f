"""The manager's resource tree in memory: a real SQLite database (migrated, in the test's
directory) run synchronously instead of in adbapi's threads, a ``Clock``, and
``tests.stubhttp.MemoryHttp`` in front of ``manager_site``. No reactor, no socket, no thread.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from cpvm.manager import db, store
from cpvm.manager.config import DatabaseConfig
from cpvm.manager.consoles import BrokerSettings, ConsoleBroker
from cpvm.manager.metrics import ManagerMetrics
from cpvm.manager.secrets_box import SecretBox, sha256_hex
from cpvm.manager.tap import manager_site
from tests.signing import DEFAULT_TTL, signed_query
from tests.stubhttp import Answer, MemoryHttp

NOW = 1_800_000_000.0
SETTINGS = BrokerSettings(
    token_ttl=60,
    bind_client_address=False,
    proxy_timeout=20,
    heartbeat_interval=5,
    url_domain=None,
    idle_timeout=None,
    max_duration=None,
    retention_seconds=30 * 86400.0,
)


class SyncDatabase:
    """``cpvm.manager.db.Database``'s interface on one SQLite connection, answering at
    once: each ``run`` is one real transaction (``db.run_sync``)."""

    kind = "sqlite"

    def __init__(self, path: Path, now: float):
        config = DatabaseConfig("sqlite", str(path), None, 1)
        db.migrate(config, now)
        self.conn = db.connect_sync(config)
        # What ``ping`` does instead of SELECT 1: None (answer), an exception, or "hang".
        self.ping_outcome: Any = None

    def run(self, fn: Callable[..., Any], *args: Any, durable: bool = True) -> Deferred:
        try:
            return succeed(db.run_sync(self.conn, self.kind, fn, *args))
        except Exception:
            return fail()

    def read(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        """Read-only transactions (the real Database has a pool of its own for them)."""
        return self.run(fn, *args)

    def ping(self) -> Deferred:
        if self.ping_outcome == "hang":
            return Deferred()
        if isinstance(self.ping_outcome, Exception):
            return fail(self.ping_outcome)
        return self.run(lambda tx: tx.execute("SELECT 1").fetchall())

    def close(self) -> None:
        self.conn.close()


@dataclass
class Caller:
    """An account with an API key, as ``cpvm-manager-admin`` would have made it."""

    account_id: str
    api_key: str
    secret: str


@dataclass
class MemoryManager:
    """A manager's site, database and clock, with ways to set up and call it."""

    database: SyncDatabase
    box: SecretBox
    clock: Clock
    http: MemoryHttp
    secrets_seen: list[str] = field(default_factory=list)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return db.run_sync(self.database.conn, "sqlite", fn, *args)

    def account(self, name: str, role: str = "user") -> Caller:
        account = self.run(store.create_account, str(uuid.uuid4()), name, role, NOW)
        api_key, secret = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self.run(
            store.create_api_key,
            str(uuid.uuid4()),
            account.id,
            api_key,
            self.box.encrypt(secret),
            NOW,
        )
        self.secrets_seen.append(secret)
        return Caller(account.id, api_key, secret)

    def vm(self, owner: Caller, password: str = "vncsecret-1") -> str:
        vm_id = str(uuid.uuid4())
        self.run(
            store.add_vm,
            {
                "id": vm_id,
                "name": "web-01",
                "owner_id": owner.account_id,
                "state": "Running",
                "vnc_host": "10.0.0.5",
                "vnc_port": 5901,
                "vnc_tls": "none",
                "vnc_password_enc": self.box.encrypt(password),
            },
            NOW,
        )
        self.secrets_seen.append(password)
        return vm_id

    def proxy_key(self, name: str = "cpvm-1") -> str:
        proxy_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
        self.run(store.create_proxy, proxy_id, name, sha256_hex(secret), NOW)
        self.secrets_seen.append(secret)
        return f"cpvmk_{proxy_id}.{secret}"

    def api(self, caller: Caller | None, **params: str) -> Answer:
        """A public API call, signed by ``caller`` unless ``signature`` is given."""
        query = {"response": "json", **params}
        if caller is not None:
            # Signature version 3 with an expiry, as [security] signature_expiry requires.
            query = signed_query(
                query, caller.api_key, caller.secret, expires_at=self.clock.seconds() + DEFAULT_TTL
            )
        return self.http.get("http://manager.test/client/api?" + urlencode(query))

    def proxy(
        self,
        key: str | None,
        path: str,
        body: bytes | str = b"{}",
        method: str = "POST",
        authorization: str | None = None,
    ) -> Answer:
        headers = {"Content-Type": ["application/json"]}
        if authorization is None and key is not None:
            authorization = f"Bearer {key}"
        if authorization is not None:
            headers["Authorization"] = [authorization]
        data = body.encode() if isinstance(body, str) else body
        return self.http.request(
            method, f"http://manager.test/proxy/{path}", data=data, headers=headers
        )


def memory_manager(directory: Path) -> MemoryManager:
    """The manager's site over a fresh database in ``directory``."""
    clock = Clock()
    clock.advance(NOW)
    database = SyncDatabase(directory / "manager.db", NOW)
    box = SecretBox.from_file(directory / "secret.key")
    metrics = ManagerMetrics()
    broker = ConsoleBroker(database, box, clock, SETTINGS, metrics)  # type: ignore[arg-type]
    site = manager_site(broker, database, box, clock, clock, metrics)  # type: ignore[arg-type]
    return MemoryManager(database, box, clock, MemoryHttp(site.resource))
