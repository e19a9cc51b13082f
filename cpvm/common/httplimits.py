"""HTTP limits enforced in the channel, before twisted.web buffers or parses anything.

twisted.web reads a whole request body (spooling big ones to a temporary file) and parses
form bodies before any resource runs, and its idle timeout restarts with every byte. Both
daemons' sites use :class:`LimitedSite`, which adds, per connection:

- a body limit taken from the headers: a ``Content-Length`` above the cap, or a chunked
  body where no body is accepted at all, is answered 413 and the connection closed before
  one body byte is stored; a chunked body is counted as it arrives and refused the moment
  it passes the cap. Accepted bodies are held in memory (they are small by construction);
- an absolute deadline for each request to arrive (head and body): from TCP accept for
  the first, from the end of the previous response for the next one on a kept-alive
  connection. Trickling bytes does not extend it. A WebSocket upgrade ends it (the
  WebSocket then has its own timers);
- caps on connections still in their HTTP phase, in total and per TCP peer address (never
  ``X-Forwarded-For``): a connection over a cap is closed at once.

Refusals are logged through a :class:`~cpvm.common.ratelimit.LogThrottle` so a flood costs one
line per interval, not one per connection.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from twisted.web import http, server

from cpvm.common.addresses import Network, address_in
from cpvm.common.ratelimit import LogThrottle

_log = Logger(namespace="cpvm.http")


@dataclass(frozen=True)
class HttpLimits:
    """What a site accepts. ``max_body``: 0 refuses any body; ``request_deadline``: seconds
    (0: none); the connection caps count connections not yet done with HTTP (0: no cap)."""

    max_body: int
    request_deadline: float
    max_connections: int = 0
    max_connections_per_address: int = 0
    # Peers the per-address cap does not apply to (reverse proxies carry many browsers).
    per_address_exempt: tuple[Network, ...] = ()


class ConnectionCounter:
    """Connections in their HTTP phase, in total and per address (pure bookkeeping)."""

    def __init__(self, total: int, per_address: int, exempt: tuple[Network, ...] = ()):
        self._cap_total = total
        self._cap_address = per_address
        self._exempt = exempt
        self.total = 0
        self._by_address: dict[str, int] = {}

    def admit(self, address: str) -> str | None:
        """Count a new connection, or answer why it is over a cap (then nothing counted)."""
        if self._cap_total and self.total >= self._cap_total:
            return "connection limit reached"
        held = self._by_address.get(address, 0)
        if (
            self._cap_address
            and held >= self._cap_address
            and not (self._exempt and address_in(address, self._exempt))
        ):
            return "per-address connection limit reached"
        self.total += 1
        self._by_address[address] = held + 1
        return None

    def release(self, address: str) -> None:
        held = self._by_address.get(address, 0)
        if held <= 1:
            self._by_address.pop(address, None)
        else:
            self._by_address[address] = held - 1
        self.total = max(0, self.total - 1)

    def held(self, address: str) -> int:
        return self._by_address.get(address, 0)


def _response(status: int, phrase: bytes, text: bytes) -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status, phrase, len(text), text)
    )


class LimitedRequest(server.Request):
    """A request whose body the channel has already bounded: kept in memory, counted."""

    def gotLength(self, length):  # noqa: N802 (Twisted's name)
        # Never a temporary file: the channel refused anything over the cap.
        self.content = io.BytesIO()

    def handleContentChunk(self, data):  # noqa: N802
        channel = self.channel
        if channel is not None and channel.body_received(len(data)):
            self.content.write(data)


class LimitedChannel(http.HTTPChannel):
    """``HTTPChannel`` with the body limit, the request deadline and the connection caps
    of its :class:`LimitedSite` (see the module docstring)."""

    site: "LimitedSite"

    def __init__(self) -> None:
        super().__init__()
        self._transport: Any = None
        self._deadline: Any = None
        self._address: str | None = None  # set while counted by the site
        self._body = 0
        self._refused = False
        self._started = False  # bytes of the next request have arrived

    # The WebSocket upgrade (Autobahn's WebSocketResource) takes the transport away by
    # setting ``channel.transport = None``; from then on the connection is not HTTP's.
    @property
    def transport(self):  # type: ignore[override]
        return self._transport

    @transport.setter
    def transport(self, value) -> None:
        if value is None and self._transport is not None:
            self._http_phase_over()
            self.setTimeout(None)  # Twisted's idle timer is not ours to fire any more
        self._transport = value

    def connectionMade(self):  # noqa: N802
        super().connectionMade()
        address = getattr(self._transport.getPeer(), "host", "unknown")
        why = self.site.connections.admit(address)
        if why is not None:
            self.site.refused(why, address)
            self._refused = True
            self._transport.abortConnection()
            return
        self._address = address
        self._arm_deadline()

    def dataReceived(self, data):  # noqa: N802
        if self._refused:
            return  # refused: what is still in flight is dropped unread
        self._started = True
        super().dataReceived(data)

    def allHeadersReceived(self):  # noqa: N802
        limit = self.site.limits.max_body
        if self.length is None and limit == 0:
            self._refuse_body("a chunked body where none is accepted")
        elif self.length is not None and self.length > limit:
            self._refuse_body(f"Content-Length {self.length} over the limit of {limit}")
        else:
            super().allHeadersReceived()

    def body_received(self, n: int) -> bool:
        """Count ``n`` body bytes; ``False`` (and the request refused) past the cap."""
        if self._refused:
            return False
        self._body += n
        limit = self.site.limits.max_body
        if self._body > limit:
            self._refuse_body(f"body over the limit of {limit} bytes")
            return False
        return True

    def allContentReceived(self):  # noqa: N802
        if self._refused:
            return
        self._body = 0
        self._started = False
        self._cancel_deadline()
        super().allContentReceived()

    def requestDone(self, request):  # noqa: N802
        # The next request on a kept-alive connection gets a fresh deadline, armed first:
        # a pipelined request parsed inside requestDone cancels it again.
        if self.persistent and self._transport is not None:
            self._arm_deadline()
        super().requestDone(request)

    def connectionLost(self, reason):  # noqa: N802
        self._http_phase_over()
        super().connectionLost(reason)

    # -- the limits ----------------------------------------------------------------------

    def _refuse_body(self, why: str) -> None:
        self._refused = True
        self.site.refused("request body too large", self._address or "unknown", why)
        self._close_with(_response(413, b"Content Too Large", b"request body too large\n"))

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self._transport is None or self._refused:
            return
        self._refused = True
        if not self._started and not self._dataBuffer:
            # Nothing of a request yet (an idle kept-alive connection): just close.
            self.loseConnection()
            return
        self.site.refused("request not received within the deadline", self._address or "unknown")
        self._close_with(_response(408, b"Request Timeout", b"request timeout\n"))

    def _close_with(self, response: bytes) -> None:
        self._cancel_deadline()
        self._transport.write(response)
        self.loseConnection()
        # A peer that does not read its answer is cut off, as after Twisted's own timeout.
        if self._abortingCall is None and self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        seconds = self.site.limits.request_deadline
        if seconds > 0:
            self._deadline = self.callLater(seconds, self._deadline_passed)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _http_phase_over(self) -> None:
        """Upgraded or gone: stop the deadline and free the connection's slot (once)."""
        self._cancel_deadline()
        if self._address is not None:
            self.site.connections.release(self._address)
            self._address = None


class LimitedSite(server.Site):
    """A ``Site`` whose connections obey ``limits`` (see the module docstring)."""

    protocol = LimitedChannel  # type: ignore[assignment]
    requestFactory = LimitedRequest

    def __init__(self, resource, *, limits: HttpLimits, reactor=None, **kwargs):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        super().__init__(resource, reactor=reactor, **kwargs)
        self.limits = limits
        self.connections = ConnectionCounter(
            limits.max_connections, limits.max_connections_per_address, limits.per_address_exempt
        )
        self._throttle = LogThrottle(reactor)

    def refused(self, why: str, address: str, detail: str = "") -> None:
        """Log a refused connection or request, at most one line per interval per ``why``
        (``detail`` and ``address`` are those of the refusal that got the line)."""
        count = self._throttle.event(why)
        if count is not None:
            _log.warn(
                "refused HTTP connection from {client}: {why}{detail} ({count} such "
                "refusal(s) since the last line of this kind)",
                client=address,
                why=why,
                detail=f" ({detail})" if detail else "",
                count=count,
            )
