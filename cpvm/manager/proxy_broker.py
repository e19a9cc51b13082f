"""The proxy API's logic: redemptions, heartbeats and end reports, each authorised by the
caller's proxy key in its own database transaction (:mod:`cpvm.manager.proxy_admission`).

A key that is malformed, unknown or revoked raises :class:`ProxyUnauthorized`, one used from
outside its allowed networks :class:`ProxyForbidden`; nothing is then read or written.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.logger import Logger

from cpvm.common.contract import REDEMPTION_ERROR_MESSAGE, REDEMPTION_ERROR_STATUS
from cpvm.manager import instances, store, viewers
from cpvm.manager.db import Database
from cpvm.manager.decisions import check_redemption, parse_proxy_key
from cpvm.manager.metrics import ManagerMetrics
from cpvm.manager.proxy_admission import (
    ProxyForbidden,
    ProxyUnauthorized,
    admit_proxy,
    check_instance,
)
from cpvm.manager.secrets_box import SecretBox, sha256_hex
from cpvm.manager.session_audit import log_acquired, log_ended, log_lost

if TYPE_CHECKING:
    from cpvm.manager.consoles import BrokerSettings

T = TypeVar("T")

# The contract's redemption errors, with success: HTTP status and message by error name.
REDEEM_STATUS: dict[str | None, int] = {None: 200}
REDEEM_STATUS.update(REDEMPTION_ERROR_STATUS)
REDEEM_MESSAGE = REDEMPTION_ERROR_MESSAGE


@dataclass(frozen=True)
class Redemption:
    """The outcome of a redemption: ``error`` is None on success, else the contract code."""

    error: str | None
    body: dict[str, Any] = field(default_factory=dict)


class ProxyBroker:
    """What cpvm instances ask of the manager, checked and recorded."""

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

    async def _with_key(
        self, key: str, peer: str | None, work: Callable[[tuple[str, str]], Awaitable[T]]
    ) -> T:
        """``work(parsed key)`` for the proxy holding ``key``, called from TCP peer ``peer``.

        A malformed key is refused before any database work; ``work`` checks the key in its
        own transaction (one round trip instead of two). A refusal for the source network
        is logged here (the key's id, never its secret)."""
        parsed = parse_proxy_key(key)
        if parsed is None:
            raise ProxyUnauthorized()
        try:
            return await work(parsed)
        except ProxyForbidden:
            self._log.warn(
                "proxy key {proxy} refused: call from {client_address}, outside the key's "
                "allowed networks",
                proxy=parsed[0],
                client_address=peer,
            )
            raise

    async def authenticate_proxy(self, key: str, peer: str | None = None) -> str:
        """The proxy id of a ``cpvmk_<id>.<secret>`` key used from TCP peer ``peer``, or
        :class:`ProxyUnauthorized` / :class:`ProxyForbidden`."""

        async def check(parsed: tuple[str, str]) -> str:
            # A read: authenticating never waits behind writers.
            await self._db.read(admit_proxy, parsed, peer)
            return parsed[0]

        return await self._with_key(key, peer, check)

    # Redemption -----------------------------------------------------------------------

    async def redeem_with_key(
        self,
        key: str,
        token: str,
        extra: str | None,
        client_address: str,
        worker: int = 0,
        instance: str | None = None,
        peer: str | None = None,
    ) -> Redemption:
        """One atomic check-and-mark of a token for the proxy holding ``key``."""

        def redeem(parsed: tuple[str, str]) -> Awaitable[Redemption]:
            return self._redeem(parsed, token, extra, client_address, worker, instance, peer)

        return await self._with_key(key, peer, redeem)

    async def _redeem(
        self,
        key: tuple[str, str],
        token: str,
        extra: str | None,
        client_address: str,
        worker: int,
        instance: str | None,
        peer: str | None,
    ) -> Redemption:
        proxy_id = key[0]
        now = self._clock.seconds()
        extra_hash = self._box.keyed_hash(extra) if extra else ""
        # Not waiting for the disk saves a sync per console set-up; a power cut can forget the
        # redemption, so the next start voids pending tokens (recover_sqlite).
        error, row = await self._db.run(
            self._redeem_in,
            key,
            sha256_hex(token),
            extra_hash,
            client_address,
            worker,
            instance,
            peer,
            now,
            durable=False,
        )
        if error == "instance_conflict":
            self._metrics.redemptions.labels(error).inc()
            self._instance_refused(proxy_id, "redeem", row)
            return Redemption(error)
        row, decision, taken_over = row if error is None else (row, None, [])
        outcome = error or "ok"
        self._metrics.redemptions.labels(outcome).inc()
        self._metrics.redemption_seconds.observe(max(0.0, self._clock.seconds() - now))
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
        assert decision is not None
        log_acquired(row, taken_over, now - (row.expires_at - self.settings.token_ttl), log_fields)
        body = self._redemption_body(row)
        body.update(
            view_only=row.view_only, viewer_policy=decision.policy.value, taken_over=taken_over
        )
        return Redemption(None, body)

    def _redeem_in(
        self,
        tx: Any,
        key: tuple[str, str],
        token_hash: str,
        extra_hash: str,
        client_address: str,
        worker: int,
        instance: str | None,
        peer: str | None,
        now: float,
    ) -> tuple[str | None, Any]:
        """The redemption's transaction: ``(error, token row or instance event)``, or
        ``(None, (token row, viewer decision, sessions taken over))``."""
        proxy_id = key[0]
        admit_proxy(tx, key, peer)
        # Before the token is looked at: a refused instance consumes nothing.
        refusal = check_instance(
            tx, proxy_id, instance, peer, now, self.settings.proxy_timeout, heartbeat=False
        )
        if refusal is not None and refusal.refused:
            return "instance_conflict", refusal
        row = store.token_row(tx, token_hash)
        error = check_redemption(
            row, proxy_id=proxy_id, extra_hash=extra_hash, client_address=client_address, now=now
        )
        if error is not None:
            return error, row
        assert row is not None and row.vm is not None
        # The VM's viewer policy, atomic with the single use (viewers.py locks the VM's
        # row on PostgreSQL when the policy is not shared); a refusal spends nothing.
        decision = viewers.check(
            tx,
            row.vm_id,
            row.session_id,
            row.view_only,
            row.vm.viewer_policy,
            self.settings.viewer_policy,
        )
        if decision.error is not None:
            return decision.error, row
        # Validated in this transaction; the conditional UPDATE decides who wins.
        if not store.mark_acquired(tx, row.session_id, client_address, now, worker):
            return "token_used", row
        taken_over = viewers.take_over(tx, decision, row.vm_id, row.session_id, now)
        return None, (row, decision, taken_over)

    def _redemption_body(self, row: store.TokenRow) -> dict[str, Any]:
        """What the proxy needs to open the console (it holds the VNC password)."""
        assert row.vm is not None
        vm = row.vm
        password = self._box.decrypt(vm.vnc_password_enc) if vm.vnc_password_enc else None
        return {
            "session_id": row.session_id,
            "vm": {"id": vm.id, "name": vm.name},
            "vnc": {
                "host": vm.vnc_host,
                "port": vm.vnc_port,
                "password": password,
                "tls": vm.vnc_tls,
                "ca_pem": vm.vnc_ca_pem,
                "server_name": vm.vnc_server_name,
            },
            "limits": {
                "idle_timeout": self.settings.idle_timeout,
                "max_duration": self.settings.max_duration,
            },
            "account": row.account_name,
        }

    # Heartbeat ------------------------------------------------------------------------

    async def heartbeat_with_key(
        self, key: str, beat: dict[str, Any], peer: str | None = None
    ) -> dict[str, Any] | instances.InstanceEvent:
        """Record a heartbeat of the proxy holding ``key``: the answer (interval, sessions to
        terminate), or the :class:`~cpvm.manager.instances.InstanceEvent` that refused it."""

        def beat_once(parsed: tuple[str, str]) -> Awaitable[Any]:
            return self._heartbeat(parsed, beat, peer)

        return await self._with_key(key, peer, beat_once)

    async def _heartbeat(
        self, key: tuple[str, str], beat: dict[str, Any], peer: str | None
    ) -> dict[str, Any] | instances.InstanceEvent:
        proxy_id = key[0]
        now = self._clock.seconds()
        # A bare heartbeat is repeated every interval: it need not survive a power loss;
        # end reports must.
        result = await self._db.run(
            self._heartbeat_in, key, beat, peer, now, durable=bool(beat.get("ended"))
        )
        if isinstance(result, instances.InstanceEvent):
            self._instance_refused(proxy_id, "heartbeat", result)
            return result
        terminate, taken_over, records, lost, ceiling, takeover = result
        self._note_clamp(proxy_id, beat["capacity"], ceiling)
        if takeover is not None:
            self._log_takeover(proxy_id, takeover)
        for record, report in records:
            if record is not None:
                log_ended(self._metrics, record, report)
        for record in lost:
            log_lost(self._metrics, record, now)
        return {
            "heartbeat_interval": self.settings.heartbeat_interval,
            "terminate": terminate,
            # Those of terminate a newer console took over (close code 4023, not 4022).
            "taken_over": taken_over,
        }

    def _heartbeat_in(
        self, tx: Any, key: tuple[str, str], beat: dict[str, Any], peer: str | None, now: float
    ) -> Any:
        """The heartbeat's transaction: the refusing InstanceEvent, or
        ``(terminate, taken over, ended records, lost records, capacity ceiling, instance
        takeover or None)``."""
        proxy_id = key[0]
        grace = self.settings.proxy_timeout
        admitted = admit_proxy(tx, key, peer)
        # Before anything is recorded: a second instance must not move the proxy's
        # endpoint or reconcile away the sessions of the one that holds the key.
        event = check_instance(
            tx, proxy_id, beat.get("instance"), beat.get("peer"), now, grace, heartbeat=True
        )
        if event is not None and event.refused:
            return event
        # End reports first, so a session ended in this beat is not asked to terminate.
        records = [
            (store.end_session(tx, sid, proxy_id, report, now), report)
            for sid, report in beat.get("ended") or []
        ]
        active = beat.get("active_sessions")
        lost = (
            []
            if active is None
            else store.reconcile(tx, proxy_id, beat.get("worker", 0), active, now - grace, now)
        )
        # Never more than the administrator's ceiling, whatever the key's holder claims.
        granted = {**beat, "capacity": admitted.clamp(beat["capacity"])}
        terminate = store.heartbeat(tx, proxy_id, granted, now)
        taken_over = viewers.taken_over_among(tx, terminate)
        return terminate, taken_over, records, lost, admitted.max_capacity, event

    # End reports ----------------------------------------------------------------------

    async def report_end_with_key(
        self, key: str, session_id: str, report: dict[str, Any], peer: str | None = None
    ) -> bool:
        """Record a session end reported by the proxy holding ``key``; False when the
        session is unknown to this proxy."""

        async def report_end(parsed: tuple[str, str]) -> bool:
            now = self._clock.seconds()
            record = await self._db.run(self._report_end_in, parsed, session_id, report, peer, now)
            if record is None:
                return False
            log_ended(self._metrics, record, report)
            return True

        return await self._with_key(key, peer, report_end)

    @staticmethod
    def _report_end_in(
        tx: Any,
        key: tuple[str, str],
        session_id: str,
        report: dict[str, Any],
        peer: str | None,
        now: float,
    ) -> store.SessionRecord | None:
        admit_proxy(tx, key, peer)
        return store.end_session(tx, session_id, key[0], report, now)

    # Logging --------------------------------------------------------------------------

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

    def _log_takeover(self, proxy_id: str, event: instances.InstanceEvent) -> None:
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
