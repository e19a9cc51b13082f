"""One console session: the lifecycle from WebSocket open to the last byte relayed.

``ConsoleSession`` is driven by events from its two sides (the browser's WebSocket and
the VNC client protocol) and by its timers; it owns neither socket. The order of a
session's set-up is:

1. the WebSocket opens: cpvm sends its RFB version to the browser and, at the same time,
   redeems the token with the manager;
2. the token is good: cpvm connects to the VNC server and authenticates upstream;
3. upstream security is complete: cpvm offers the browser security type None, reads its
   ClientInit and forwards it; the VNC server's ServerInit goes back to the browser;
4. the relay: bytes both ways, unchanged, with TCP backpressure in both directions.

A failure before step 3 is told to the person through noVNC's own "connection rejected
with reason" path (an RFB security failure), then the WebSocket closes with its code.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from cpvm import rfb
from cpvm.common.contract import RECORDING_MARKER, UPSTREAM_FAILURES, Outcome
from cpvm.proxy import relaytransport
from cpvm.proxy.manager_client import ManagerUnavailable, Redemption, RedemptionRefused
from cpvm.proxy.recording.recorder import SessionRecorder
from cpvm.proxy.session_sides import Browser, SessionHooks, SessionLimits, SessionStats, Upstream

# The browser speaks only a few bytes before ServerInit; more is a broken client.
MAX_PRE_RELAY_BUFFER = 64 * 1024
# How long a refusal waits for the browser's RFB version so noVNC can show the reason.
REFUSAL_GRACE = 2.0


class ConsoleSession:
    """Drives one console session; see the module docstring for the order of events."""

    _log = Logger()

    def __init__(
        self,
        *,
        reactor: IReactorTime,
        browser: Browser,
        token: str,
        extra: str | None,
        client_address: str,
        redeem: Callable[[str, str | None, str], Deferred],
        connect_upstream: Callable[["ConsoleSession", Redemption], Deferred],
        limits: SessionLimits,
        hooks: SessionHooks,
    ):
        self._reactor = reactor
        self._browser = browser
        self._token = token
        self._extra = extra
        self.client_address = client_address
        self._redeem = redeem
        self._connect_upstream = connect_upstream
        self._limits = limits
        self._hooks = hooks
        self.stats = SessionStats(started=reactor.seconds())
        self.redemption: Redemption | None = None
        self.outcome: Outcome | None = None
        self._upstream: Upstream | None = None
        self._server_hs = rfb.RfbServerHandshake()
        self._browser_version_seen = False
        self._upstream_secure = False
        self._browser_ready = False
        self._pre_relay_bytes = 0
        self._security_offered = False
        self._relaying = False
        self._scanner = rfb.ClientInputScanner()
        self._viewer: rfb.ViewOnlyFilter | None = None  # a view-only console's, once redeemed
        self._last_input = self.stats.started
        self._refusal: tuple[Outcome, str] | None = None
        self._timers: dict[str, IDelayedCall] = {}
        self.recorder: SessionRecorder | None = None  # the registry's, when recorded

    # -- identity for logs (never the token) --------------------------------------------

    @property
    def session_id(self) -> str | None:
        return self.redemption.session_id if self.redemption else None

    def log_fields(self) -> dict:
        r = self.redemption
        return {
            "session": r.session_id if r else None,
            "vm": r.vm_id if r else None,
            "account": r.account if r else None,
            "client": self.client_address,
        }

    @property
    def closed(self) -> bool:
        return self.outcome is not None

    # -- browser events ------------------------------------------------------------------

    def start(self) -> None:
        """The WebSocket is open: greet the browser and redeem the token."""
        self._timer("handshake", self._limits.handshake_timeout, self._handshake_timed_out)
        self._send_browser(self._server_hs.start())
        token, self._token = self._token, ""  # the token is spent from here on
        d = self._redeem(token, self._extra, self.client_address)
        d.addCallbacks(self._redeemed, self._redeem_failed)
        d.addErrback(self._bug)

    def browser_data(self, data: bytes) -> None:
        """Binary WebSocket message payload from the browser."""
        if self.closed:
            return
        if self._relaying:
            if self._scanner.desynchronised:
                self._last_input = self._reactor.seconds()
            elif self._scanner.feed(data):  # a watcher's keys too: the person is there
                self._last_input = self._reactor.seconds()
            self._write_upstream(data)
            return
        # Everything the browser sends before the relay is buffered somewhere (handshake
        # machine, VNC socket): bound it, whoever the sender is.
        self._pre_relay_bytes += len(data)
        if self._pre_relay_bytes > MAX_PRE_RELAY_BUFFER:
            self.close(
                Outcome.CLIENT_PROTOCOL_ERROR, "browser sent too much before the session started"
            )
            return
        if self._browser_ready:
            self._queue_for_upstream(data)
            return
        self._send_browser(self._server_hs.receive(data))

    def browser_closed(self, code: int | None, clean: bool = True, sent: int | None = None) -> None:
        """The WebSocket closed, ``clean``ly or lost (``sent``: cpvm's own close code, if any)."""
        if {code, sent} & {1002, 1007, 1009}:  # Autobahn failed it: the browser broke the protocol
            outcome = Outcome.CLIENT_PROTOCOL_ERROR
        else:
            outcome = Outcome.CLIENT_CLOSED if clean else Outcome.CLIENT_LOST
        self.close(outcome, f"browser closed the WebSocket (code {code})", notify_browser=False)

    def browser_text_frame(self) -> None:
        self.close(Outcome.TEXT_FRAME, "browser sent a text frame")

    def terminate(self, outcome: Outcome, detail: str) -> None:
        """End the session from outside (administrator, shutdown)."""
        self.close(outcome, detail)

    # -- redemption ----------------------------------------------------------------------

    def _redeemed(self, redemption: Redemption) -> None:
        if self.closed:
            # The session ended while the manager was redeeming: the token is spent and
            # the manager has a live record; it must hear how this one ended.
            self.redemption = redemption
            self._hooks.redeemed_after_close(self)
            return
        self.redemption = redemption
        self._viewer = rfb.ViewOnlyFilter() if redemption.view_only else None
        self._hooks.redeemed(self)
        limit = _smaller(self._limits.max_duration, redemption.max_duration)
        self._timer(
            "max_duration",
            limit,
            lambda: self.close(Outcome.MAX_DURATION, f"session reached its limit of {limit:g} s"),
        )
        d = self._connect_upstream(self, redemption)
        d.addErrback(self._upstream_connect_failed)
        d.addErrback(self._bug)

    def _redeem_failed(self, failure: Failure) -> None:
        if self.closed:
            return
        if failure.check(RedemptionRefused):
            err = failure.value
            self._refuse(err.outcome, f"token refused: {err.error}")
        elif failure.check(ManagerUnavailable):
            self._refuse(Outcome.MANAGER_UNREACHABLE, str(failure.value))
        else:
            self._bug(failure)

    # -- upstream events (from VncClientProtocol) ----------------------------------------

    def upstream_connected(self, upstream: Upstream) -> None:
        if self.closed:
            upstream.close()
            return
        self._upstream = upstream

    def _upstream_connect_failed(self, failure: Failure) -> None:
        if not self.closed:
            self._refuse(
                Outcome.VNC_UNREACHABLE,
                f"cannot connect to the VNC server: {failure.type.__name__}",
            )

    def upstream_security_complete(self) -> None:
        if self.closed:
            return
        self._upstream_secure = True
        self._offer_security_if_ready()

    def upstream_server_init(self, server_init: rfb.ServerInit, leftover: bytes) -> None:
        if self.closed:
            return
        name = self.redemption.vm_name.encode("utf-8") if self.redemption else b""
        if self.recorder is not None:  # the person is told
            name = RECORDING_MARKER.encode("utf-8") + name
        self._send_browser(self._server_hs.send_server_init(server_init, name or None))
        self._relaying = True
        self._cancel("handshake")
        self.stats.relay_started = self._reactor.seconds()
        self._last_input = self.stats.relay_started
        if self.recorder is not None:
            self.recorder.start(server_init.with_name(name), self.stats.relay_started)
        if leftover:
            self.upstream_data(leftover)
        # Flow control: from here on each transport's buffer is the other's brake.
        assert self._upstream is not None  # ServerInit came through it
        relaytransport.couple(self._browser.transport, self._upstream.transport)
        if self._idle_limit() > 0:
            self._timer("idle", self._idle_limit(), self._check_idle)
        self._hooks.relay_started(self)

    def upstream_data(self, data: bytes) -> None:
        """RFB bytes from the VNC server, after ServerInit: to the browser unchanged."""
        if self.closed:
            return
        if self.recorder is not None:
            # First: a recording too slow to take it ends the session before it shows more.
            self.recorder.server_data(data, self._reactor.seconds(), self._scanner.pixel_format)
            if self.closed:
                return
        self.stats.bytes_to_client += len(data)
        self._browser.send(data)

    def upstream_failed(self, kind: str, message: str) -> None:
        if self.closed:
            return
        self._refuse(UPSTREAM_FAILURES.get(kind, Outcome.VNC_PROTOCOL_ERROR), message)

    def upstream_lost(self, reason: str) -> None:
        if self.closed:
            return
        if self._relaying:
            self.close(Outcome.SERVER_CLOSED, f"VNC server closed the connection ({reason})")
        else:
            self._refuse(
                Outcome.VNC_PROTOCOL_ERROR,
                f"VNC server closed the connection during the handshake ({reason})",
            )

    # -- the browser-side handshake ------------------------------------------------------

    def _send_browser(self, events: list) -> None:
        for event in events:
            if isinstance(event, rfb.Send):
                self._browser.send(event.data)
            elif isinstance(event, rfb.ClientVersionReceived):
                self._browser_version_seen = True
                if self._refusal is not None:
                    self._refuse(*self._refusal)
                    return
                self._offer_security_if_ready()
            elif isinstance(event, rfb.ClientInitReceived):
                self._browser_ready = True
                assert self._upstream is not None
                assert self.redemption is not None
                shared = self.redemption.vnc_shared_flag(event.shared and self._limits.shared)
                self._upstream.send_client_init(shared)
                if event.leftover:
                    self._queue_for_upstream(event.leftover)
            elif isinstance(event, rfb.Failed):
                self.close(Outcome.CLIENT_PROTOCOL_ERROR, f"browser: {event.message}")
                return

    def _offer_security_if_ready(self) -> None:
        if self._browser_version_seen and self._upstream_secure and not self.closed:
            self._security_offered = True
            self._send_browser(self._server_hs.accept())

    def _queue_for_upstream(self, data: bytes) -> None:
        # The VNC server reads client messages only after its ServerInit; TCP keeps the
        # order, so these bytes can go now.
        self._scanner.feed(data)
        self._write_upstream(data)

    def _write_upstream(self, data: bytes) -> None:
        """To the VNC server; a view-only console's through its filter (fail closed)."""
        if self._viewer is not None:
            data = self._viewer.feed(data)
            if self._viewer.failed:
                self._upstream.write(data)  # type: ignore[union-attr]
                kind = self._viewer.unknown_type
                self.close(Outcome.VIEW_ONLY_UNCHECKABLE, f"browser message type {kind} unsizable")
                return
        self.stats.bytes_to_server += len(data)
        if self.recorder is not None:  # what reached the VM, on the recording's clock
            self.recorder.client_data(data, self._reactor.seconds())
        self._upstream.write(data)  # type: ignore[union-attr]

    def _refuse(self, outcome: Outcome, detail: str) -> None:
        """Fail set-up; tell noVNC the reason through RFB when the handshake allows it."""
        if self.closed:
            return
        if self._security_offered:
            # Too late for an RFB refusal (the browser was offered None): the close code
            # and its reason are all the browser gets.
            self.close(outcome, detail)
            return
        if self._browser_version_seen:
            self._send_browser(self._server_hs.reject(outcome.text))
            self.close(outcome, detail)
            return
        # The browser has not sent its version yet: wait briefly for it.
        self._refusal = (outcome, detail)
        self._timer("refusal", REFUSAL_GRACE, lambda: self.close(outcome, detail))
        if self._upstream is not None:
            self._upstream.close()

    # -- flow control, timers ------------------------------------------------------------

    def _idle_limit(self) -> float:
        r = self.redemption
        return _smaller(self._limits.idle_timeout, r.idle_timeout if r else None)

    def _check_idle(self) -> None:
        # One timer per session re-armed lazily: input updates a timestamp only.
        limit = self._idle_limit()
        quiet = self._reactor.seconds() - self._last_input
        if quiet >= limit:
            self.close(Outcome.IDLE_TIMEOUT, f"no input from the browser for {quiet:.0f} s")
        else:
            self._timer("idle", limit - quiet, self._check_idle)

    def _handshake_timed_out(self) -> None:
        if self.redemption is None:
            self._refuse(Outcome.MANAGER_UNREACHABLE, "token redemption timed out")
        else:
            self._refuse(
                Outcome.VNC_HANDSHAKE_TIMEOUT,
                f"session not set up within {self._limits.handshake_timeout:g} s",
            )

    def _timer(self, name: str, delay: float, fn: Callable[[], None]) -> None:
        self._cancel(name)
        if delay and delay > 0:
            self._timers[name] = self._reactor.callLater(delay, fn)  # type: ignore[attr-defined]

    def _cancel(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    # -- the end -------------------------------------------------------------------------

    def close(self, outcome: Outcome, detail: str, notify_browser: bool = True) -> None:
        """End the session once: close both sides, stop timers, report."""
        if self.closed:
            return
        self.outcome = outcome
        self.stats.ended = self._reactor.seconds()
        for name in list(self._timers):
            self._cancel(name)
        if self._upstream is not None:
            self._upstream.close()
        if notify_browser:
            self._browser.close(outcome.code, outcome.text)
        self._hooks.ended(self, outcome, detail)

    def _bug(self, failure: Failure) -> None:
        self._log.failure("console session failed unexpectedly", failure, **self.log_fields())
        self.close(Outcome.ERROR, "internal error")


def _smaller(ours: float, theirs: float | None) -> float:
    """The stricter of two limits where 0 or None means "no limit"."""
    if not theirs:
        return ours
    if not ours:
        return theirs
    return min(ours, theirs)
