"""Console tokens and sessions: issuing, redeeming, proxy selection, session ends.

:class:`ConsoleBroker` is the logic behind both APIs. It takes the database, the
key-encryption box, a clock (``seconds()``; the reactor in production, ``Clock`` in tests)
and explicit settings; the HTTP resources only parse requests and format answers.
"""

from __future__ import annotations

import hmac
import ipaddress
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import inlineCallbacks, succeed
from twisted.logger import Logger

from cpvm.common.contract import (
    REDEMPTION_ERROR_MESSAGE,
    REDEMPTION_ERROR_STATUS,
    WEBSOCKET_PATH,
)
from cpvm.common.tokens import new_token
from cpvm.manager import instances, store
from cpvm.manager.db import Database
from cpvm.manager.metrics import ManagerMetrics
from cpvm.manager.proxy_policy import NO_LIMITS, ProxyPolicy
from cpvm.manager.secrets_box import SecretBox, sha256_hex

NOVNC_PATH = "/resource/noVNC/vnc.html"
# How long a token's hash is kept after expiry, so a late redemption is told "expired"
# rather than "invalid"; then cleanup forgets it.
EXPIRED_TOKEN_GRACE = 300.0

audit = Logger(namespace="cpvm.audit")


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


@dataclass(frozen=True)
class Endpoint:
    """A console endpoint answer: either a URL + WebSocket details, or why not."""

    success: bool
    details: str | None = None
    url: str | None = None
    websocket: dict[str, str] | None = None
    session_id: str | None = None


@dataclass(frozen=True)
class Redemption:
    """The outcome of a redemption: ``error`` is None on success, else the contract code."""

    error: str | None
    body: dict[str, Any] = field(default_factory=dict)


# The contract's redemption errors, with success: HTTP status and message by error name.
REDEEM_STATUS: dict[str | None, int] = {None: 200}
REDEEM_STATUS.update(REDEMPTION_ERROR_STATUS)
REDEEM_MESSAGE = REDEMPTION_ERROR_MESSAGE


def console_host(public_host: str, address: str | None, url_domain: str | None) -> str:
    """The host name browsers use, after CloudStack's ``consoleproxy.url.domain`` rules.

    ``*.example.com`` with address 1.2.3.4 gives ``1-2-3-4.example.com``; a plain domain is
    used as is; no domain (or no usable address for a pattern) keeps the proxy's public host.
    """
    if not url_domain:
        return public_host
    if url_domain.startswith("*."):
        source = address or public_host
        try:
            ip = ipaddress.ip_address(source)
        except ValueError:
            return public_host
        label = str(ip).replace(".", "-").replace(":", "-")
        return f"{label}.{url_domain[2:]}"
    return url_domain


def console_url(host: str, port: int, tls: bool, token: str, extra: str | None) -> str:
    """The stock-noVNC URL that opens ``ws[s]://host:port/websockify?token=…``."""
    path = f"{WEBSOCKET_PATH}?token={quote(token, safe='')}"
    if extra is not None:
        path += f"&extra={quote(extra, safe='')}"
    scheme = "https" if tls else "http"
    host_in_url = f"[{host}]" if ":" in host else host
    return (
        f"{scheme}://{host_in_url}:{port}{NOVNC_PATH}?autoconnect=true&reconnect=false"
        f"&host={quote(host, safe='')}&port={port}&encrypt={1 if tls else 0}"
        f"&path={quote(path, safe='')}&show_dot=true"
    )


def choose_proxy(candidates: Sequence[store.ProxyLoad]) -> store.ProxyLoad | None:
    """Sticky first (a non-full proxy already serving this VM), else the least loaded.

    Full proxies (load >= capacity) are never chosen. Ties go to the smaller absolute load,
    then the proxy id, so the choice is deterministic.
    """
    open_ = [c for c in candidates if c.capacity > 0 and c.load < c.capacity]
    if not open_:
        return None
    sticky = [c for c in open_ if c.vm_sessions > 0]
    pool = sticky or open_
    return min(pool, key=lambda c: (c.load / c.capacity, c.load, c.proxy.id))


def check_redemption(
    row: store.TokenRow | None,
    *,
    proxy_id: str,
    extra_hash: str,
    client_address: str,
    now: float,
) -> str | None:
    """The contract's checks in order; returns the error code or None. Never writes."""
    if row is None:
        return "invalid_token"
    if row.proxy_id != proxy_id:
        return "wrong_proxy"
    if row.acquired_at is not None:
        return "token_used"
    if row.ended_at is not None or now > row.expires_at:
        return "expired_token"
    if not hmac.compare_digest((row.extra_hash or "").encode("ascii"), extra_hash.encode("ascii")):
        return "extra_mismatch"
    if row.bound_address is not None and not _same_address(row.bound_address, client_address):
        return "address_mismatch"
    if row.vm is None or row.vm.state != "Running":
        return "vm_unavailable"
    if not row.account_ok:
        return "account_unavailable"
    return None


def parse_proxy_key(key: str) -> tuple[str, str] | None:
    """(proxy id, SHA-256 of the secret) of a ``cpvmk_<id>.<secret>`` key, or None.

    Only the syntax: whether the key is known and not revoked is decided in the database,
    in the same transaction as the request it authorises (see :func:`admit_proxy`).
    """
    if not key.startswith("cpvmk_") or "." not in key:
        return None
    proxy_id, _, secret = key[len("cpvmk_") :].partition(".")
    if not proxy_id or not secret or len(key) > 512:
        return None
    return proxy_id, sha256_hex(secret)


def proxy_key_policy(tx: Any, parsed: tuple[str, str]) -> ProxyPolicy | None:
    """The limits of the active proxy the parsed key belongs to, or None when it is unknown
    or revoked (constant-time hash comparison)."""
    record = store.proxy_key_record(tx, parsed[0])
    if record is None or not hmac.compare_digest(record[0].encode(), parsed[1].encode()):
        return None
    return record[1]


class _Forbidden:
    def __repr__(self) -> str:
        return "FORBIDDEN"


# Returned by the ``*_with_key`` methods when the proxy key is unknown or revoked...
UNAUTHORIZED = None
# ...and when the key is valid but the call comes from outside its allowed networks.
FORBIDDEN: Any = _Forbidden()


def admit_proxy(tx: Any, key: tuple[str, str] | None, peer: str | None) -> Any:
    """In the request's transaction: the key's :class:`ProxyPolicy` when the call may go
    on, else ``UNAUTHORIZED`` or ``FORBIDDEN``. No key: a trusted internal caller."""
    if key is None:
        return NO_LIMITS
    policy = proxy_key_policy(tx, key)
    if policy is None:
        return UNAUTHORIZED
    if not policy.admits(peer):
        return FORBIDDEN
    return policy


def check_instance(
    tx: Any,
    proxy_id: str,
    caller: str | None,
    address: str | None,
    now: float,
    timeout: float,
    *,
    heartbeat: bool,
) -> instances.InstanceEvent | None:
    """Apply the one-instance-per-key rule in the caller's transaction: a
    :class:`~cpvm.manager.instances.InstanceEvent` (recorded; ``refused`` false for a takeover)
    or None. A heartbeat renews its instance's binding, or takes over the key of a silent
    instance; a redemption only binds a key nobody held (it leaves takeovers to the
    heartbeat, which logs them). Redemptions take no lock: they must not queue behind
    each other on the proxy's row (PostgreSQL)."""
    binding = store.instance_binding(tx, proxy_id, lock=heartbeat)
    if binding is None:
        return None
    decision = instances.decide(binding.instance_id, binding.seen_at, caller, now, timeout)
    if decision.accepted and caller is not None and decision.bind:
        if heartbeat:
            store.bind_instance(tx, proxy_id, caller, address, now)
            if decision.takeover:
                return instances.InstanceEvent(binding, caller, address, now, refused=False)
        elif binding.instance_id is None and not store.claim_instance(
            tx, proxy_id, caller, address, now
        ):
            # Another instance bound the key since we read it: decide again on that.
            binding = store.instance_binding(tx, proxy_id, lock=False) or binding
            decision = instances.decide(binding.instance_id, binding.seen_at, caller, now, timeout)
    if not decision.accepted:
        store.refuse_instance(tx, proxy_id, caller, address, now)
        return instances.InstanceEvent(binding, caller, address, now)
    return None


def _same_address(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


class ConsoleBroker:
    """Issues console endpoints and redeems their one-time tokens."""

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
        # Proxy id -> the claimed capacity last logged as clamped (one line per change,
        # not one per heartbeat).
        self._clamped: dict[str, int] = {}

    def _extra_hash(self, extra: str | None) -> str:
        return self._box.keyed_hash(extra) if extra else ""

    # Public API -----------------------------------------------------------------------

    @inlineCallbacks
    def create_endpoint(
        self, account: store.Account, vm_id: str, extra: str | None, creator_address: str
    ):
        """Pick a proxy, record a pending session with a fresh token, build the URL."""
        now = self._clock.seconds()
        token = new_token()
        session_id = str(uuid.uuid4())
        settings = self.settings
        extra_hash = self._extra_hash(extra) or None

        def txn(tx):
            vm = store.get_vm(tx, vm_id)
            if vm is None:
                return Endpoint(False, f"virtual machine {vm_id} not found")
            if not account.is_admin and vm.owner_id != account.id:
                return Endpoint(
                    False,
                    f"permission denied: account {account.name} may not access "
                    f"virtual machine {vm_id}",
                )
            if vm.state != "Running":
                return Endpoint(False, f"virtual machine {vm_id} is not running (state {vm.state})")
            chosen = choose_proxy(store.live_proxies(tx, now, settings.proxy_timeout, vm_id))
            if chosen is None:
                return Endpoint(False, "no console proxy available")
            store.insert_session(
                tx,
                {
                    "id": session_id,
                    "token_hash": sha256_hex(token),
                    "extra_hash": extra_hash,
                    "expires_at": now + settings.token_ttl,
                    "created_at": now,
                    "account_id": account.id,
                    "account_name": account.name,
                    "vm_id": vm.id,
                    "vm_name": vm.name,
                    "proxy_id": chosen.proxy.id,
                    "creator_address": creator_address,
                    "bound_address": creator_address if settings.bind_client_address else None,
                },
            )
            p = chosen.proxy
            host = console_host(p.public_host or "", p.address, settings.url_domain)
            port = int(p.public_port or (8443 if p.tls else 8080))
            websocket = {"host": host, "port": str(port), "path": WEBSOCKET_PATH, "token": token}
            if extra is not None:
                websocket["extra"] = extra
            return (
                Endpoint(
                    True,
                    url=console_url(host, port, p.tls, token, extra),
                    websocket=websocket,
                    session_id=session_id,
                ),
                p,
                vm,
            )

        result = yield self._db.run(txn)
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
            session=session_id,
            account=account.name,
            vm=vm.id,
            vm_name=vm.name,
            proxy=proxy.name,
            client_address=creator_address,
            ttl=settings.token_ttl,
        )
        return endpoint

    @inlineCallbacks
    def list_sessions(self, account: store.Account, **filters: Any):
        if not account.is_admin:
            filters["account_id"] = account.id
        result = yield self._db.read(lambda tx: store.list_sessions(tx, **filters))
        return result

    @inlineCallbacks
    def end_session_request(self, account: store.Account, session_id: str):
        """``endConsoleSession``: returns (ok, message)."""
        now = self._clock.seconds()

        def txn(tx):
            record = store.get_session(tx, session_id)
            if record is None or (not account.is_admin and record.account_id != account.id):
                return None, f"console session {session_id} not found"
            if record.ended_at is not None:
                return None, f"console session {session_id} has already ended"
            return store.request_terminate(tx, session_id, now), None

        record, error = yield self._db.run(txn)
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

    # Proxy API ------------------------------------------------------------------------

    @inlineCallbacks
    def authenticate_proxy(self, key: str, peer: str | None = None):
        """The proxy id for a ``cpvmk_<id>.<secret>`` key used from TCP peer ``peer``, or
        ``UNAUTHORIZED`` (None), or ``FORBIDDEN``."""
        parsed = parse_proxy_key(key)
        if parsed is None:
            return UNAUTHORIZED
        # A read: authenticating never waits behind writers.
        admitted = yield self._db.read(admit_proxy, parsed, peer)
        if isinstance(admitted, ProxyPolicy):
            return parsed[0]
        return self._refused(admitted, parsed[0], peer)

    def _refused(self, admitted: Any, proxy_id: str, peer: str | None) -> Any:
        """Pass on a refusal of :func:`admit_proxy` (``UNAUTHORIZED`` or ``FORBIDDEN``),
        logging a ``FORBIDDEN`` (the key id, never its secret)."""
        if admitted is FORBIDDEN:
            self._log.warn(
                "proxy key {proxy} refused: call from {client_address}, outside the key's "
                "allowed networks",
                proxy=proxy_id,
                client_address=peer,
            )
        return admitted

    def redeem(self, proxy_id: str, token: str, extra: str | None, client_address: str):
        """One atomic check-and-mark of a token; fires with a :class:`Redemption`."""
        return self._redeem(proxy_id, None, token, extra, client_address)

    def redeem_with_key(
        self,
        key: str,
        token: str,
        extra: str | None,
        client_address: str,
        worker: int = 0,
        instance: str | None = None,
        peer: str | None = None,
    ):
        """:meth:`redeem` for the proxy holding ``key``, called from TCP peer ``peer``,
        checked in the same transaction (one database round trip instead of two); fires
        with ``UNAUTHORIZED`` (None) when the key is unknown or revoked, ``FORBIDDEN`` when
        ``peer`` is outside its allowed networks, and then nothing was read or written."""
        parsed = parse_proxy_key(key)
        if parsed is None:
            return succeed(UNAUTHORIZED)
        return self._redeem(parsed[0], parsed, token, extra, client_address, worker, instance, peer)

    @inlineCallbacks
    def _redeem(
        self,
        proxy_id: str,
        key: tuple[str, str] | None,
        token: str,
        extra: str | None,
        client_address: str,
        worker: int = 0,
        instance: str | None = None,
        peer: str | None = None,
    ):
        started = self._clock.seconds()
        now = started
        token_hash = sha256_hex(token)
        extra_hash = self._extra_hash(extra)
        box = self._box
        settings = self.settings

        def txn(tx):
            admitted = admit_proxy(tx, key, peer)
            if not isinstance(admitted, ProxyPolicy):
                return admitted
            # Before the token is looked at: a refused instance consumes nothing.
            refusal = check_instance(
                tx, proxy_id, instance, peer, now, settings.proxy_timeout, heartbeat=False
            )
            if refusal is not None and refusal.refused:
                return "instance_conflict", refusal
            row = store.token_row(tx, token_hash)
            error = check_redemption(
                row,
                proxy_id=proxy_id,
                extra_hash=extra_hash,
                client_address=client_address,
                now=now,
            )
            if error is not None:
                return error, row
            assert row is not None
            # Validated in this transaction; the conditional UPDATE decides who wins.
            if not store.mark_acquired(tx, row.session_id, client_address, now, worker):
                return "token_used", row
            return None, row

        # Not waiting for the disk saves ~0.4 ms per console set-up; a power cut can
        # forget the redemption, so the next start voids pending tokens (recover_sqlite).
        result = yield self._db.run(txn, durable=False)
        if not isinstance(result, tuple):
            return self._refused(result, proxy_id, peer)
        error, row = result
        if error == "instance_conflict":
            self._metrics.redemptions.labels(error).inc()
            self._instance_refused(proxy_id, "redeem", row)
            return Redemption(error)
        outcome = error or "ok"
        self._metrics.redemptions.labels(outcome).inc()
        self._metrics.redemption_seconds.observe(max(0.0, self._clock.seconds() - started))
        log_fields = dict(
            proxy=proxy_id,
            client_address=client_address,
            session=row.session_id if row else None,
            vm=row.vm_id if row else None,
            account=row.account_name if row else None,
        )
        if error is not None:
            self._log.info("redemption refused: {outcome}", outcome=outcome, **log_fields)
            return Redemption(error)
        assert row is not None and row.vm is not None
        vm = row.vm
        audit.info(
            "session {session} acquired from {client_address} via proxy {proxy}",
            audit=True,
            event="acquired",
            waited=now - (row.expires_at - settings.token_ttl),
            **log_fields,
        )
        return Redemption(
            None,
            {
                "session_id": row.session_id,
                "vm": {"id": vm.id, "name": vm.name},
                "vnc": {
                    "host": vm.vnc_host,
                    "port": vm.vnc_port,
                    "password": box.decrypt(vm.vnc_password_enc) if vm.vnc_password_enc else None,
                    "tls": vm.vnc_tls,
                    "ca_pem": vm.vnc_ca_pem,
                    "server_name": vm.vnc_server_name,
                },
                "limits": {
                    "idle_timeout": settings.idle_timeout,
                    "max_duration": settings.max_duration,
                },
                "account": row.account_name,
            },
        )

    def heartbeat(self, proxy_id: str, beat: dict[str, Any]):
        return self._heartbeat(proxy_id, None, beat)

    def heartbeat_with_key(self, key: str, beat: dict[str, Any], peer: str | None = None):
        """:meth:`heartbeat` authorised by ``key`` (from TCP peer ``peer``) in the same
        transaction, or ``UNAUTHORIZED`` / ``FORBIDDEN``."""
        parsed = parse_proxy_key(key)
        if parsed is None:
            return succeed(UNAUTHORIZED)
        return self._heartbeat(parsed[0], parsed, beat, peer)

    @inlineCallbacks
    def _heartbeat(
        self,
        proxy_id: str,
        key: tuple[str, str] | None,
        beat: dict[str, Any],
        peer: str | None = None,
    ):
        now = self._clock.seconds()

        ended = beat.get("ended") or []
        active = beat.get("active_sessions")
        worker = beat.get("worker", 0)
        grace = self.settings.proxy_timeout
        takeovers: list[instances.InstanceEvent] = []

        def txn(tx):
            admitted = admit_proxy(tx, key, peer)
            if not isinstance(admitted, ProxyPolicy):
                return admitted
            # Before anything is recorded: a second instance must not move the proxy's
            # endpoint or reconcile away the sessions of the one that holds the key.
            event = check_instance(
                tx, proxy_id, beat.get("instance"), beat.get("peer"), now, grace, heartbeat=True
            )
            if event is not None and event.refused:
                return event
            # End reports first, so a session ended in this beat is not asked to terminate.
            records = [
                (store.end_session(tx, sid, proxy_id, report, now), report) for sid, report in ended
            ]
            lost = (
                []
                if active is None
                else store.reconcile(tx, proxy_id, worker, active, now - grace, now)
            )
            if event is not None:
                takeovers.append(event)  # logged after the commit
            # Never more than the administrator's ceiling, whatever the key's holder claims.
            granted = {**beat, "capacity": admitted.clamp(beat["capacity"])}
            return (
                store.heartbeat(tx, proxy_id, granted, now),
                records,
                lost,
                admitted.max_capacity,
            )

        # A bare heartbeat is repeated every interval: it need not survive a power loss;
        # end reports must.
        result = yield self._db.run(txn, durable=bool(ended))
        if isinstance(result, instances.InstanceEvent):
            self._instance_refused(proxy_id, "heartbeat", result)
            return result
        if not isinstance(result, tuple):
            return self._refused(result, proxy_id, peer)
        terminate, records, lost, ceiling = result
        self._note_clamp(proxy_id, beat["capacity"], ceiling)
        for event in takeovers:
            old = event.binding
            self._log.warn(
                "proxy {proxy}: cpvm instance {instance} at {client_address} took the key "
                "over from instance {bound} at {bound_address}, silent for {age:.1f} s",
                proxy=proxy_id,
                instance=event.caller,
                client_address=event.address,
                bound=old.instance_id,
                bound_address=old.address,
                age=event.now - (old.seen_at or event.now),
            )
        for record, report in records:
            if record is not None:
                self._ended(record, report)
        for record in lost:
            self._lost(record, now)
        return {"heartbeat_interval": self.settings.heartbeat_interval, "terminate": terminate}

    def report_end(self, proxy_id: str, session_id: str, report: dict[str, Any]):
        """Record a session end; False when the session is unknown to this proxy."""
        return self._report_end(proxy_id, None, session_id, report)

    def report_end_with_key(
        self, key: str, session_id: str, report: dict[str, Any], peer: str | None = None
    ):
        """:meth:`report_end` authorised by ``key`` (from TCP peer ``peer``) in the same
        transaction, or ``UNAUTHORIZED`` / ``FORBIDDEN``."""
        parsed = parse_proxy_key(key)
        if parsed is None:
            return succeed(UNAUTHORIZED)
        return self._report_end(parsed[0], parsed, session_id, report, peer)

    @inlineCallbacks
    def _report_end(
        self,
        proxy_id: str,
        key: tuple[str, str] | None,
        session_id: str,
        report: dict[str, Any],
        peer: str | None = None,
    ):
        now = self._clock.seconds()

        def txn(tx):
            admitted = admit_proxy(tx, key, peer)
            if not isinstance(admitted, ProxyPolicy):
                return admitted
            return True, store.end_session(tx, session_id, proxy_id, report, now)

        result = yield self._db.run(txn)
        if not isinstance(result, tuple):
            return self._refused(result, proxy_id, peer)
        _, record = result
        if record is None:
            return False
        self._ended(record, report)
        return True

    def _note_clamp(self, proxy_id: str, claimed: int, ceiling: int | None) -> None:
        """Log, once per change, that a heartbeat claimed more than the key's ceiling."""
        if ceiling is None or claimed <= ceiling:
            self._clamped.pop(proxy_id, None)
            return
        if self._clamped.get(proxy_id) != claimed:
            self._clamped[proxy_id] = claimed
            self._log.warn(
                "proxy {proxy} claims capacity {claimed}, above its key's ceiling: counted "
                "as {ceiling}",
                proxy=proxy_id,
                claimed=claimed,
                ceiling=ceiling,
            )

    def _instance_refused(
        self, proxy_id: str, endpoint: str, refusal: instances.InstanceEvent
    ) -> None:
        self._metrics.instance_conflicts.labels(endpoint).inc()
        if not refusal.worth_logging:
            return
        bound = refusal.binding
        self._log.error(
            "proxy {proxy}: refused {endpoint} from cpvm instance {instance} at "
            "{client_address}: the key is in use by instance {bound} at {bound_address}, "
            "last heard {age:.1f} s ago (one proxy key per running cpvm)",
            proxy=proxy_id,
            endpoint=endpoint,
            instance=refusal.caller or "(none sent)",
            client_address=refusal.address,
            bound=bound.instance_id,
            bound_address=bound.address,
            age=refusal.now - (bound.seen_at or refusal.now),
        )

    def _lost(self, record: store.SessionRecord, now: float) -> None:
        self._metrics.sessions_ended.labels("proxy_lost").inc()
        audit.info(
            "session {session} ended: {reason}",
            audit=True,
            event="ended",
            session=record.id,
            reason="proxy_lost",
            account=record.account_name,
            vm=record.vm_id,
            proxy=record.proxy_name,
            client_address=record.client_address,
            duration=now - (record.acquired_at or now),
        )

    def _ended(self, record: store.SessionRecord, report: dict[str, Any]) -> None:
        self._metrics.sessions_ended.labels(report["reason"]).inc()
        audit.info(
            "session {session} ended: {reason}",
            audit=True,
            event="ended",
            session=record.id,
            reason=report["reason"],
            account=record.account_name,
            vm=record.vm_id,
            proxy=record.proxy_name,
            client_address=record.client_address,
            bytes_to_client=report["bytes_to_client"],
            bytes_to_server=report["bytes_to_server"],
            duration=report["duration"],
        )

    # Housekeeping ---------------------------------------------------------------------

    @inlineCallbacks
    def cleanup(self):
        """Periodic: sessions of silent proxies end ``proxy_lost``; old records go."""
        now = self._clock.seconds()
        result = yield self._db.run(
            store.cleanup,
            now,
            self.settings.proxy_timeout,
            EXPIRED_TOKEN_GRACE,
            self.settings.retention_seconds,
        )
        for record in result.lost:
            self._lost(record, now)
        if result.expired or result.deleted:
            self._log.info(
                "cleanup: {expired} tokens expired unused, {deleted} old sessions deleted",
                expired=result.expired,
                deleted=result.deleted,
            )
        return result
