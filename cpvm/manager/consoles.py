"""Console tokens and sessions: issuing, listing, termination requests, cleanup.

:class:`ConsoleBroker` is the logic behind both APIs. It takes the database, the
key-encryption box, a clock (``seconds()``; the reactor in production, ``Clock`` in tests)
and explicit settings; the HTTP resources only parse requests and format answers. What
cpvm instances call (redemption, heartbeats, end reports) is its :attr:`proxies`, a
:class:`~cpvm.manager.proxy_broker.ProxyBroker`; the pure rules are in
:mod:`cpvm.manager.decisions`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

from cpvm.common.contract import WEBSOCKET_PATH, ViewerPolicy
from cpvm.common.tokens import new_token
from cpvm.manager import store
from cpvm.manager.db import Database
from cpvm.manager.decisions import choose_proxy, console_host, console_url
from cpvm.manager.metrics import ManagerMetrics
from cpvm.manager.proxy_broker import ProxyBroker
from cpvm.manager.secrets_box import SecretBox, sha256_hex
from cpvm.manager.session_audit import audit, log_lost

# How long a token's hash is kept after expiry, so a late redemption is told "expired"
# rather than "invalid"; then cleanup forgets it.
EXPIRED_TOKEN_GRACE = 300.0

# What :meth:`ConsoleBroker.list_sessions` gives the public API's JSON renderings.
SessionRecord = store.SessionRecord


@dataclass(frozen=True)
class BrokerSettings:
    """The settings the broker needs, taken from the configuration by the wiring."""

    token_ttl: float
    bind_client_address: bool
    proxy_timeout: float
    heartbeat_interval: int
    url_domain: str | None
    idle_timeout: int | None
    max_duration: int | None
    retention_seconds: float
    # [tokens] reconnect_window: seconds after an unclean end during which the same
    # browser may resume its session with the used token (resume.py); 0: never.
    reconnect_window: float = 0.0
    # For VMs without a viewer policy of their own.
    viewer_policy: ViewerPolicy = ViewerPolicy.SHARED
    # [recording] default: whether a session is recorded when neither its VM nor its
    # account says (cpvm.manager.recording_policy).
    record_default: str = "never"


@dataclass(frozen=True)
class Endpoint:
    """A console endpoint answer: either a URL + WebSocket details, or why not."""

    success: bool
    details: str | None = None
    url: str | None = None
    websocket: dict[str, Any] | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class _Issue:
    """One ``createConsoleEndpoint``: its fresh token and session id, and what to record."""

    account: store.Account
    vm_id: str
    extra: str | None
    extra_hash: str | None
    creator_address: str
    token: str
    session_id: str
    now: float
    view_only: bool = False


class ConsoleBroker:
    """Issues console endpoints, lists and ends sessions; :attr:`proxies` redeems their
    one-time tokens."""

    _log = Logger()

    def __init__(
        self,
        db: Database,
        box: SecretBox,
        clock: Any,
        settings: BrokerSettings,
        metrics: ManagerMetrics,
    ):
        self._db = db
        self._box = box
        self._clock = clock
        self.settings = settings
        self._metrics = metrics
        self.proxies = ProxyBroker(db, box, clock, settings, metrics)

    # Public API -----------------------------------------------------------------------

    async def create_endpoint(
        self,
        account: store.Account,
        vm_id: str,
        extra: str | None,
        creator_address: str,
        view_only: bool = False,
    ) -> Endpoint:
        """Pick a proxy, record a pending session with a fresh token, build the URL;
        ``view_only``: a console that only watches (cpvm drops its input)."""
        issue = _Issue(
            account,
            vm_id,
            extra,
            self._box.keyed_hash(extra) if extra else None,
            creator_address,
            new_token(),
            str(uuid.uuid4()),
            self._clock.seconds(),
            view_only,
        )
        result = await self._db.run(self._create_in, issue)
        if isinstance(result, Endpoint):
            self._log.info(
                "console refused: {reason}",
                reason=result.details,
                account=account.name,
                vm=vm_id,
                client_address=creator_address,
            )
            return result
        endpoint, proxy, vm = result
        self._metrics.tokens_issued.inc()
        audit.info(
            "session {session} created for {account} on VM {vm} via proxy {proxy}",
            audit=True,
            event="created",
            session=issue.session_id,
            account=account.name,
            vm=vm.id,
            vm_name=vm.name,
            proxy=proxy.name,
            client_address=creator_address,
            ttl=self.settings.token_ttl,
            view_only=view_only,
        )
        return endpoint

    def _create_in(self, tx: Any, issue: _Issue) -> Any:
        """The endpoint's transaction: a refusal (an :class:`Endpoint`), or
        ``(endpoint, proxy, vm)`` with the pending session recorded."""
        vm_id, account, settings = issue.vm_id, issue.account, self.settings
        vm = store.get_vm(tx, vm_id)
        if vm is None:
            return Endpoint(False, f"virtual machine {vm_id} not found")
        if not account.is_admin and vm.owner_id != account.id:
            return Endpoint(
                False,
                f"permission denied: account {account.name} may not access virtual machine {vm_id}",
            )
        if vm.state != "Running":
            return Endpoint(False, f"virtual machine {vm_id} is not running (state {vm.state})")
        chosen = choose_proxy(store.live_proxies(tx, issue.now, settings.proxy_timeout, vm_id))
        if chosen is None:
            return Endpoint(False, "no console proxy available")
        store.insert_session(
            tx,
            {
                "id": issue.session_id,
                "token_hash": sha256_hex(issue.token),
                "extra_hash": issue.extra_hash,
                "expires_at": issue.now + settings.token_ttl,
                "created_at": issue.now,
                "account_id": account.id,
                "account_name": account.name,
                "vm_id": vm.id,
                "vm_name": vm.name,
                "proxy_id": chosen.proxy.id,
                "creator_address": issue.creator_address,
                "bound_address": issue.creator_address if settings.bind_client_address else None,
                "view_only": issue.view_only,
            },
        )
        return self._endpoint(issue, chosen.proxy), chosen.proxy, vm

    def _endpoint(self, issue: _Issue, p: store.Proxy) -> Endpoint:
        """The answer for a console on proxy ``p``: its URL and WebSocket details."""
        host = console_host(p.public_host or "", p.address, self.settings.url_domain)
        port = int(p.public_port or (8443 if p.tls else 8080))
        websocket: dict[str, Any] = {
            "host": host,
            "port": str(port),
            "path": WEBSOCKET_PATH,
            "token": issue.token,
        }
        if issue.extra is not None:
            websocket["extra"] = issue.extra
        if issue.view_only:
            websocket["viewonly"] = True  # a cpvm extension
        return Endpoint(
            True,
            url=console_url(
                host,
                port,
                p.tls,
                issue.token,
                issue.extra,
                issue.view_only,
                reconnect=self.settings.reconnect_window > 0,
            ),
            websocket=websocket,
            session_id=issue.session_id,
        )

    async def find_account(self, name_or_id: str) -> store.Account | None:
        """The account with this name or id, or None (``listConsoleSessions``' filter)."""
        try:
            return await self._db.read(store.find_account, name_or_id)
        except store.NotFound:
            return None

    async def list_sessions(
        self, account: store.Account, **filters: Any
    ) -> list[store.SessionRecord]:
        """The sessions ``account`` may see (all of them for an admin), filtered."""
        if not account.is_admin:
            filters["account_id"] = account.id
        return await self._db.read(lambda tx: store.list_sessions(tx, **filters))

    async def end_session_request(
        self, account: store.Account, session_id: str
    ) -> tuple[bool, str | None]:
        """``endConsoleSession``: returns (ok, message)."""
        now = self._clock.seconds()

        def txn(tx):
            record = store.get_session(tx, session_id)
            if record is None or (not account.is_admin and record.account_id != account.id):
                return None, f"console session {session_id} not found"
            if record.ended_at is not None:
                return None, f"console session {session_id} has already ended"
            return store.request_terminate(tx, session_id, now), None

        record, error = await self._db.run(txn)
        if error:
            return False, error
        audit.info(
            "session {session} termination requested by {by}",
            audit=True,
            event="terminate_requested",
            session=session_id,
            by=account.name,
            account=record.account_name,
            vm=record.vm_id,
            proxy=record.proxy_name,
        )
        return True, None

    # Housekeeping ---------------------------------------------------------------------

    async def cleanup(self) -> store.CleanupResult:
        """Periodic: sessions of silent proxies end ``proxy_lost``; old records go."""
        now = self._clock.seconds()
        result = await self._db.run(
            store.cleanup,
            now,
            self.settings.proxy_timeout,
            EXPIRED_TOKEN_GRACE,
            self.settings.retention_seconds,
            self.settings.reconnect_window,
        )
        for record in result.lost:
            log_lost(self._metrics, record, now)
        if result.expired or result.deleted:
            self._log.info(
                "cleanup: {expired} tokens expired unused, {deleted} old sessions deleted",
                expired=result.expired,
                deleted=result.deleted,
            )
        return result
