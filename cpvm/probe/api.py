"""The probe's API leg: a signed ``createConsoleEndpoint``, and the console it answers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from twisted.internet import defer, error
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from cpvm.common.signatures import signed_query
from cpvm.probe.legs import Leg, LegFailed

_RESPONSE_FAILURES = (ResponseNeverReceived, ResponseFailed)
#: The manager's answer is a few hundred bytes; anything much larger is not the manager.
MAX_ANSWER = 256 * 1024


@dataclass(frozen=True)
class ApiCredentials:
    """An API key and its secret; ``repr`` never shows the secret."""

    api_key: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class ConsoleEndpoint:
    """Where the console is: ``websocket_url`` holds the one-time token (never log it)."""

    host: str
    port: int
    secure: bool
    websocket_url: str = field(repr=False)

    @property
    def where(self) -> str:
        """``host:port`` of the console proxy, for messages."""
        return f"{self.host}:{self.port}"


def console_endpoint(answer: dict[str, Any]) -> ConsoleEndpoint:
    """The WebSocket of a successful ``consoleendpoint`` answer, as noVNC would open it."""
    ws = answer["websocket"]
    secure = urlsplit(answer["url"]).scheme == "https"
    host, port = str(ws["host"]), int(ws["port"])
    query = {"token": ws["token"]}
    if ws.get("extra"):
        query["extra"] = ws["extra"]
    scheme = "wss" if secure else "ws"
    authority = f"[{host}]" if ":" in host else host
    path = quote(str(ws.get("path") or "websockify"), safe="/")
    url = f"{scheme}://{authority}:{port}/{path}?{urlencode(query)}"
    return ConsoleEndpoint(host, port, secure, url)


def _errortext(body: bytes) -> str:
    try:
        data = json.loads(body)
        (inner,) = data.values()
        return str(inner.get("errortext") or inner)[:300]
    except Exception:
        return repr(body[:200])


async def create_console_endpoint(
    http: Any,
    clock: Any,
    manager_url: str,
    credentials: ApiCredentials,
    vm: str,
    *,
    timeout: float,
) -> ConsoleEndpoint:
    """Call ``createConsoleEndpoint`` for ``vm`` with ``http`` (a treq ``HTTPClient``),
    signed with ``credentials``, as a form POST (the signature stays out of access logs);
    raise :class:`LegFailed` (leg ``api``) with the manager's own words when it fails."""
    query = signed_query(
        {"command": "createConsoleEndpoint", "virtualmachineid": vm},
        credentials.api_key,
        credentials.secret,
        now=clock.seconds(),
    )
    url = manager_url.rstrip("/") + "/client/api"
    try:
        response = await http.post(
            url,
            data=urlencode(query).encode("ascii"),
            headers={"Content-Type": ["application/x-www-form-urlencoded"]},
            timeout=timeout,
        )
        body = await _read(response)
    except LegFailed:
        raise
    except defer.CancelledError:
        raise LegFailed(Leg.API, f"no answer from {url} within {timeout:g} s") from None
    except (error.ConnectError, error.DNSLookupError) as e:
        raise LegFailed(Leg.API, f"manager unreachable at {url}: {e}") from None
    except _RESPONSE_FAILURES as e:  # the request was sent: a timeout, TLS, a drop
        reasons = [f.value for f in e.reasons]
        if any(isinstance(r, defer.CancelledError) for r in reasons):
            raise LegFailed(Leg.API, f"no answer from {url} within {timeout:g} s") from None
        said = "; ".join(str(r) or type(r).__name__ for r in reasons)
        raise LegFailed(Leg.API, f"request to {url} failed: {said}"[:400]) from None
    except Exception as e:
        raise LegFailed(Leg.API, f"request to {url} failed: {e!r}"[:400]) from None
    if response.code != 200:
        raise LegFailed(Leg.API, f"manager answered HTTP {response.code}: {_errortext(body)}")
    try:
        answer = json.loads(body)["createconsoleendpointresponse"]["consoleendpoint"]
    except (ValueError, KeyError, TypeError):
        raise LegFailed(Leg.API, "the manager's answer is not a consoleendpoint") from None
    if not answer.get("success"):
        raise LegFailed(Leg.API, f"no console: {answer.get('details', 'no details')}")
    try:
        return console_endpoint(answer)
    except (KeyError, TypeError, ValueError):
        raise LegFailed(Leg.API, "the manager's consoleendpoint has no usable websocket") from None


async def _read(response: Any) -> bytes:
    length = response.length
    if isinstance(length, int) and length > MAX_ANSWER:
        raise LegFailed(Leg.API, f"the manager's answer is {length} bytes")
    body: bytes = await response.content()
    if len(body) > MAX_ANSWER:
        raise LegFailed(Leg.API, f"the manager's answer is {len(body)} bytes")
    return body
