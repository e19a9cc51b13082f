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

from cpvm.common.contract import (
    REDEMPTION_ERROR_MESSAGE,
    REDEMPTION_ERROR_STATUS,
    is_unclean_end,
)
from cpvm.manager import instances, proxy_logs, store, viewers
from cpvm.manager.db import Database
from cpvm.manager.decisions import parse_proxy_key
from cpvm.manager.metrics import ManagerMetrics
from cpvm.manager.proxy_admission import (
    ProxyForbidden,
    ProxyUnauthorized,
    admit_proxy,
    check_instance,
)
from cpvm.manager.redemption_tx import Redeemed, redeem_in
from cpvm.manager.secrets_box import SecretBox, sha256_hex
from cpvm.manager.session_audit import log_acquired, log_ended, log_lost
from cpvm.manager.store import recordings as recording_store

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
        self._clamps = proxy_logs.ClampLog()

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
        browser_hash: str | None = None,
    ) -> Redemption:
        """One atomic check-and-mark of a token for the proxy holding ``key``, for the
        browser whose console cookie hashes to ``browser_hash`` (it may resume later)."""

        def redeem(parsed: tuple[str, str]) -> Awaitable[Redemption]:
            return self._redeem(
                parsed, token, extra, client_address, worker, instance, peer, browser_hash
            )

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
        browser_hash: str | None,
    ) -> Redemption:
        proxy_id = key[0]
        now = self._clock.seconds()
        extra_hash = self._box.keyed_hash(extra) if extra else ""
        # Not waiting for the disk saves a sync per console set-up; a power cut can forget the
        # redemption, so the next start voids pending tokens (recover_sqlite).
        error, result, why = await self._db.run(
            redeem_in,
            self.settings,
            key,
            sha256_hex(token),
            extra_hash,
            client_address,
            (worker, browser_hash),
            instance,
            peer,
            now,
            durable=False,
        )
        if error == "instance_conflict":
            self._metrics.redemptions.labels(error).inc()
            proxy_logs.instance_refused(self._metrics, proxy_id, "redeem", result)
            return Redemption(error)
        row = result.row if error is None else result
        resumed = result.resumed if error is None else None
        outcome = error or ("resumed" if resumed else "ok")
        self._metrics.redemptions.labels(outcome).inc()
        self._metrics.redemption_seconds.observe(max(0.0, self._clock.seconds() - now))
        log_fields = dict(
            proxy=proxy_id,
            client_address=client_address,
            session=row.session_id if row else None,
            vm=row.vm_id if row else None,
            account=row.account_name if row else None,
            recorded=error is None and result.recorded,
        )
        if error is not None:
            why = f" (not resumed: {why.why})" if why is not None else ""
            self._log.info(
                "redemption refused: {outcome}{why}", outcome=outcome, why=why, **log_fields
            )
            return Redemption(error)
        waited = now - (row.expires_at - self.settings.token_ttl)
        log_acquired(
            row, result.taken_over, waited, log_fields, resumed.reconnects if resumed else 0
        )
        return Redemption(None, self._redemption_body(result))

    def _redemption_body(self, redeemed: Redeemed) -> dict[str, Any]:
        """What the proxy needs to open the console (it holds the VNC password), how the
        viewer policy decided, and for a resume what is left of the session's time limit
        and its reconnect count."""
        row, resumed = redeemed.row, redeemed.resumed
        assert row.vm is not None
        vm = row.vm
        max_duration: float | None = self.settings.max_duration
        if resumed is not None and resumed.remaining_duration is not None:
            max_duration = resumed.remaining_duration
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
            "limits": {"idle_timeout": self.settings.idle_timeout, "max_duration": max_duration},
            "account": row.account_name,
            "view_only": row.view_only,
            "viewer_policy": redeemed.decision.policy.value,
            "taken_over": redeemed.taken_over,
            "reconnects": resumed.reconnects if resumed is not None else 0,
            **({"recording": True} if redeemed.recorded else {}),  # absent: not recorded
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
            proxy_logs.instance_refused(self._metrics, proxy_id, "heartbeat", result)
            return result
        terminate, taken_over, records, lost, ceiling, takeover = result
        self._clamps.note(proxy_id, beat["capacity"], ceiling)
        if takeover is not None:
            proxy_logs.takeover(proxy_id, takeover)
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
            (recording_store.end_session(tx, sid, proxy_id, report, now, self._keeps), report)
            for sid, report in beat.get("ended") or []
        ]
        recording_store.mark_deleted(tx, proxy_id, beat.get("recordings_deleted") or [], now)
        active = beat.get("active_sessions")
        window_on = self.settings.reconnect_window > 0
        worker = beat.get("worker", 0)
        lost = (
            []
            if active is None
            else store.reconcile(tx, proxy_id, worker, active, now - grace, now, window_on)
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

    def _report_end_in(
        self,
        tx: Any,
        key: tuple[str, str],
        session_id: str,
        report: dict[str, Any],
        peer: str | None,
        now: float,
    ) -> store.SessionRecord | None:
        admit_proxy(tx, key, peer)
        return recording_store.end_session(tx, session_id, key[0], report, now, self._keeps)

    def _keeps(self, report: dict[str, Any]) -> bool:
        """Whether a session ending with ``report`` keeps its token's hash: an unclean
        end with the reconnect window on (the same browser may come back with it)."""
        return self.settings.reconnect_window > 0 and is_unclean_end(report["reason"])
