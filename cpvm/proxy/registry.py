"""The live console sessions of one cpvm process, and what happens around each one.

``SessionRegistry`` creates sessions, enforces capacity, connects them upstream, keeps
the metrics and the audit stream, queues end reports for the heartbeat
(:mod:`cpvm.proxy.heartbeat`), and ends sessions an administrator terminated. What it
needs of the configuration is a ``RegistrySettings``, built by :mod:`cpvm.proxy.tap`.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from cpvm import __version__, rfb
from cpvm.common.contract import Outcome, end_reason
from cpvm.common.ratelimit import LogThrottle, TokenBuckets
from cpvm.common.tokens import looks_like_token
from cpvm.proxy.end_reports import ENDS_PER_HEARTBEAT, EndReports
from cpvm.proxy.manager_client import (
    ManagerClient,
    ManagerUnavailable,
    Redemption,
    RedemptionRefused,
)
from cpvm.proxy.metrics import ProxyMetrics
from cpvm.proxy.recording.sessions import NO_RECORDINGS, NoRecordings, SessionRecordings
from cpvm.proxy.session import ConsoleSession, SessionLimits
from cpvm.proxy.upstream import VncClientFactory, tls_creator, vnc_endpoint

audit_log = Logger(namespace="cpvm.audit")


@dataclass(frozen=True)
class RegistrySettings:
    """What the session registry needs of cpvm's configuration, and nothing more."""

    #: Each session's timeouts and sharing.
    limits: SessionLimits
    #: Live and pending sessions of this process, at most.
    max_sessions: int
    #: Redemptions waiting for the manager, at most.
    max_pending: int
    #: Failed redemptions per client address: a burst, then a rate per second.
    failed_redemption_burst: int
    failed_redemption_rate: float
    #: Seconds to wait for the VNC server's TCP connection.
    connect_timeout: float
    #: VeNCrypt TLSNone/TLSVnc allowed when the manager asks for ``tls = anonymous``.
    allow_anonymous_tls: bool
    #: The CA (PEM) a VNC server's certificate is checked against when the manager names none.
    default_ca_pem: bytes | None
    #: What the heartbeat advertises: where browsers reach this proxy...
    public_host: str
    public_port: int
    tls: bool
    public_address: str | None
    #: ... and the capacity of the whole proxy (every worker process reports all of it;
    #: the manager counts sessions from its own records).
    capacity: int


class SessionRegistry:
    """Registry and life-support of every console session in this process."""

    _log = Logger()

    def __init__(
        self,
        reactor,
        settings: RegistrySettings,
        manager: ManagerClient,
        metrics: ProxyMetrics,
        recordings: SessionRecordings | NoRecordings = NO_RECORDINGS,
    ):
        self._reactor = reactor
        self.recordings = recordings  # recorders for the sessions the manager says to record
        self._settings = settings
        self._manager = manager
        self.metrics = metrics
        self._all: set[ConsoleSession] = set()
        self._by_id: dict[str, ConsoleSession] = {}
        # Capacity counts sessions the manager accepted (until they end) and redemptions
        # it has not answered yet; a session being refused counts for neither.
        self._live: set[ConsoleSession] = set()
        self._pending = 0
        # Failed redemptions per client address: every attempt spends a token, a good
        # one gives it back, an empty bucket is refused here (4029).
        self._attempts = TokenBuckets(
            reactor,
            burst=settings.failed_redemption_burst,
            rate=settings.failed_redemption_rate,
        )
        self._quiet = LogThrottle(reactor)
        # End reports wait here for the next heartbeat, which carries them in one request.
        self.ends = EndReports()
        self.accepting = True

    # -- creation ------------------------------------------------------------------------

    def at_capacity(self) -> bool:
        """No room for one more session: stopping, or ``max_sessions`` live or pending."""
        return not self.accepting or len(self._live) + self._pending >= self._settings.max_sessions

    def too_many_pending(self) -> bool:
        """``max_pending`` redemptions already wait for the manager."""
        return self._pending >= self._settings.max_pending

    @property
    def pending(self) -> int:
        return self._pending

    def refused(self, reason: str) -> None:
        self.metrics.refused.labels(reason=reason).inc()

    def create(
        self, browser, token: str, extra: str | None, client: str, browser_hash: str | None = None
    ) -> ConsoleSession:
        session = ConsoleSession(
            reactor=self._reactor,
            browser=browser,
            token=token,
            extra=extra,
            client_address=client,
            # The browser's cookie hash goes with the redemption only (browser_cookie.py).
            redeem=lambda token, extra, client: self._redeem(token, extra, client, browser_hash),
            connect_upstream=self._connect_upstream,
            limits=self._settings.limits,
            hooks=self,
        )
        self._all.add(session)
        return session

    def __len__(self) -> int:
        return len(self._all)

    def count_relayed(self) -> None:
        """Add what live sessions relayed since the last call to the byte counters (at a
        scrape and each heartbeat; an ending session adds the rest itself)."""
        for s in self._all:
            self._count_relayed(s.stats)

    def _count_relayed(self, stats) -> None:
        m = self.metrics
        delta = stats.bytes_to_client - stats.counted_to_client
        if delta:
            m.relayed_to_client.inc(delta)
            stats.counted_to_client = stats.bytes_to_client
        delta = stats.bytes_to_server - stats.counted_to_server
        if delta:
            m.relayed_to_server.inc(delta)
            stats.counted_to_server = stats.bytes_to_server

    # -- redemption and upstream ---------------------------------------------------------

    def _redeem(
        self, token: str, extra: str | None, client: str, browser_hash: str | None = None
    ) -> Deferred:
        refusal = self._refuse_locally(token, client)
        if refusal is not None:
            return fail(refusal)
        started = self._reactor.seconds()
        self._pending += 1
        d = self._manager.redeem(token, extra, client, browser_hash)

        def done(result):
            self._pending -= 1
            self.metrics.redemption_latency.observe(self._reactor.seconds() - started)
            if not isinstance(result, Failure) or result.check(ManagerUnavailable):
                self._attempts.give_back(client)  # not the client's failure
            if isinstance(result, Failure):
                if result.check(ManagerUnavailable):
                    self.metrics.manager_failures.labels(call="redeem").inc()
                    self.metrics.redemptions.labels(result="manager_unreachable").inc()
                    self._log.warn(
                        "token redemption failed: {why}", why=str(result.value), client=client
                    )
                else:
                    err = getattr(result.value, "error", "error")
                    self.metrics.redemptions.labels(result=err).inc()
                    if err == "instance_conflict":
                        self._log.error(
                            "manager refused a redemption: proxy key {key_id} is in use by "
                            "another running cpvm instance",
                            key_id=self._manager.key_id,
                            client=client,
                        )
            else:
                self.metrics.redemptions.labels(result="ok").inc()
            return result

        d.addBoth(done)
        return d

    def _refuse_locally(self, token: str, client: str) -> RedemptionRefused | None:
        """What cpvm refuses without a manager round trip: an address out of attempts,
        and (spending an attempt) anything that cannot be a token."""
        if not self._attempts.take(client):
            self.metrics.redemptions.labels(result="rate_limited").inc()
            return RedemptionRefused(
                Outcome.RATE_LIMITED, "rate_limited", "too many failed attempts from this address"
            )
        if not looks_like_token(token):
            self.metrics.redemptions.labels(result="malformed_token").inc()
            return RedemptionRefused(
                Outcome.INVALID_TOKEN, "invalid_token", "not the shape of a console token"
            )
        return None

    def _connect_upstream(self, session: ConsoleSession, r: Redemption) -> Deferred:
        settings = self._settings
        target = r.vnc
        allow_anon = target.tls == "anonymous" and settings.allow_anonymous_tls
        handshake = rfb.RfbClientHandshake(
            target.password,
            allow_anonymous_tls=allow_anon,
            allow_none=target.tls == "none",
            require_tls=target.tls != "none",
            allow_x509=bool(target.ca_pem or settings.default_ca_pem),
        )
        factory = VncClientFactory(
            session,
            handshake,
            lambda anonymous: tls_creator(target, settings.default_ca_pem, anonymous),
        )
        endpoint = vnc_endpoint(self._reactor, target.host, target.port, settings.connect_timeout)
        return endpoint.connect(factory)

    # -- hooks called by sessions --------------------------------------------------------

    def redeemed(self, session: ConsoleSession) -> None:
        self._live.add(session)
        sid = session.session_id
        if sid:
            self._by_id[sid] = session
        self.recordings.attach(session)
        audit_log.info(
            "console session acquired: vm {vm} by {client}",
            event="acquired",
            reconnects=_reconnects(session),
            recorded=session.recorder is not None,
            **session.log_fields(),
        )
        taken = session.redemption.taken_over if session.redemption else ()
        if taken:
            # Before this console reaches the VNC server: the old one hears why it ends.
            self.terminate(taken, Outcome.TAKEN_OVER, f"taken over by session {sid}")

    def redeemed_after_close(self, session: ConsoleSession) -> None:
        outcome = session.outcome or Outcome.ERROR
        sid = session.session_id
        assert sid is not None  # set by the redemption that called us
        self._log.info(
            "session {session} was redeemed after it ended ({reason})",
            session=sid,
            reason=outcome.report,
        )
        self.ends.add(
            sid,
            _reconnects(session),
            {
                "reason": end_reason(outcome),
                "client_address": session.client_address,
                "bytes_to_client": 0,
                "bytes_to_server": 0,
                "duration": 0.0,
            },
        )

    def relay_started(self, session: ConsoleSession) -> None:
        self.metrics.active_sessions.inc()
        self.metrics.handshake_duration.observe(
            (session.stats.relay_started or 0) - session.stats.started
        )
        self._log.info("console session relaying: vm {vm} for {client}", **session.log_fields())

    def ended(self, session: ConsoleSession, outcome: Outcome, detail: str) -> None:
        self._all.discard(session)
        self._live.discard(session)
        sid = session.session_id
        if sid:
            self._by_id.pop(sid, None)
        stats = session.stats
        if stats.relay_started is not None:
            self.metrics.active_sessions.dec()
        self.metrics.sessions.labels(outcome=outcome.report).inc()
        self._count_relayed(stats)
        if outcome in (
            Outcome.VNC_UNREACHABLE,
            Outcome.VNC_AUTH_FAILED,
            Outcome.VNC_PROTOCOL_ERROR,
            Outcome.VNC_HANDSHAKE_TIMEOUT,
        ):
            self.metrics.upstream_failures.labels(kind=outcome.report).inc()
        self._log_end(session, outcome, detail)
        if sid:
            self._audit_end(sid, session, outcome)

    def _log_end(self, session: ConsoleSession, outcome: Outcome, detail: str) -> None:
        # 1006: the browser's connection was lost, the network's doing, like a close.
        level = self._log.info if outcome.code in (1000, 1001, 1006) else self._log.warn
        if outcome is not Outcome.RATE_LIMITED:
            level(
                "console session ended: {reason} ({detail})",
                reason=outcome.report,
                detail=detail,
                code=outcome.code,
                **session.log_fields(),
            )
            return
        # A flood's refusals: one line per interval, with how many it stands for.
        count = self._quiet.event(outcome.report)
        if count is not None:
            level(
                "console sessions refused: {reason} ({count} since the last line), "
                "last from {client}",
                reason=outcome.report,
                count=count,
                code=outcome.code,
                client=session.client_address,
            )

    def _audit_end(self, sid: str, session: ConsoleSession, outcome: Outcome) -> None:
        """The audit record of a session the manager knows of, and its end report."""
        stats = session.stats
        duration = (stats.ended or stats.started) - stats.started
        audit_log.info(
            "console session ended: vm {vm} reason {reason}, {bytes_to_client} bytes "
            "to client, {bytes_to_server} to server, {duration:.1f} s",
            event="ended",
            reason=outcome.report,
            bytes_to_client=stats.bytes_to_client,
            bytes_to_server=stats.bytes_to_server,
            duration=duration,
            **session.log_fields(),
        )
        report = {
            "reason": end_reason(outcome),
            "client_address": session.client_address,
            "bytes_to_client": stats.bytes_to_client,
            "bytes_to_server": stats.bytes_to_server,
            "duration": round(duration, 3),
        }
        n = _reconnects(session)  # a recorded session's report waits for its file's summary
        self.recordings.end_report(session, report, lambda r: self.ends.add(sid, n, r))

    def take_ended(self, limit: int = ENDS_PER_HEARTBEAT) -> list[dict]:
        """End reports for the next heartbeat (give them back if it fails)."""
        return self.ends.take(limit)

    def give_back_ended(self, reports: list[dict]) -> None:
        self.ends.give_back(reports)

    @property
    def ended_waiting(self) -> int:
        return len(self.ends)

    # -- control from outside ------------------------------------------------------------

    def terminate(
        self,
        session_ids,
        outcome: Outcome = Outcome.TERMINATED,
        detail: str = "terminated through the API",
    ) -> int:
        """End sessions an administrator terminated (or, with ``Outcome.TAKEN_OVER``, a
        newer console replaced); returns how many were here."""
        n = 0
        for sid in session_ids:
            session = self._by_id.get(sid) if isinstance(sid, str) else None
            if session is not None and not session.closed:
                session.terminate(outcome, detail)
                n += 1
        return n

    def heartbeat_payload(self) -> dict:
        settings = self._settings
        return {
            "public_host": settings.public_host,
            "public_port": settings.public_port,
            "tls": settings.tls,
            "address": settings.public_address,
            "capacity": settings.capacity,
            "active_sessions": sorted(self._by_id),
            "version": __version__,
        }

    def shutdown(self) -> None:
        """Stop accepting and tell every browser (1001); their end reports are queued."""
        self.accepting = False
        for session in list(self._all):
            session.terminate(Outcome.SHUTDOWN, "cpvm is stopping")


def _reconnects(session: ConsoleSession) -> int:
    """Which connection of its session this one is (0: the first; the redemption says)."""
    return session.redemption.reconnects if session.redemption else 0
