"""``GET /client/console?cmd=access&vm=UUID``: CloudStack's console URL from before 4.18.

Tools that still use it sign it like an API call (``apiKey``, ``signature``, and here
always ``signatureVersion=3`` with ``expires``) and open it in a browser. The manager
checks it as it checks ``createConsoleEndpoint`` (same signature rules, same rate limit
per API key, same access rule for the VM), mints a fresh one-time console, and answers
the page that sends the browser on to it (:mod:`cpvm.manager.legacy_page`).

A signed URL is a credential until it expires; this one opens a console, so it works
once: its signature is recorded as spent (:mod:`cpvm.manager.store.replays`, shared by
every manager on the database) before the console is minted, and the same URL again is
refused. Hence the expiry is required here whatever ``[security] signature_expiry`` says:
a spent signature is kept until then, and a URL without one would have to be kept forever.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import cast

from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource

from cpvm.common.addresses import client_address
from cpvm.common.ratelimit import KeyedRateLimiter
from cpvm.manager import signing, store
from cpvm.manager.api_errors import ApiError
from cpvm.manager.auth import ApiAuthenticator
from cpvm.manager.config import IPNetwork
from cpvm.manager.consoles import ConsoleBroker
from cpvm.manager.json_http import STATUS_TEXT, alive
from cpvm.manager.legacy_page import PAGE_HEADERS, access_page, refusal_page
from cpvm.manager.metrics import ManagerMetrics
from cpvm.manager.params import ParamError, parse_params

ALREADY_USED = "this console link was already used: ask for a new one"
NEEDS_EXPIRY = "a console link must be signed with signatureVersion=3 and expires"
NOT_ACCESS = "only cmd=access is served here"
BAD_VM = "vm must be the UUID of a virtual machine"


class LegacyRefusal(Exception):
    """No console: answer ``status`` with a page saying ``text`` (a fixed text, or the
    manager's own words; never a key, signature or token)."""

    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status
        self.text = text


class LegacyConsoleResource(Resource):
    """``/client/console``: the page that opens a fresh console, once per signed URL.

    ``spend(signature, expires)`` records a signature as spent and answers False if it
    already was (the wiring binds it to the database).
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        *,
        authenticator: ApiAuthenticator,
        broker: ConsoleBroker,
        spend: Callable[[str, float], Awaitable[bool]],
        limiter: KeyedRateLimiter,
        trusted_proxies: tuple[IPNetwork, ...],
        metrics: ManagerMetrics,
    ):
        super().__init__()
        self._authenticator = authenticator
        self._broker = broker
        self._spend = spend
        self._limiter = limiter
        self._trusted = trusted_proxies
        self._metrics = metrics

    def render_GET(self, request: server.Request) -> int:  # noqa: N802 (Twisted's name)
        ensureDeferred(self._handle(request))
        return server.NOT_DONE_YET

    # CloudStack's servlet answered POST the same way (a form's body holds the parameters).
    render_POST = render_GET

    async def _handle(self, request: server.Request) -> None:
        account = None
        try:
            account, vm_id, url = await self._access(request)
            status, page = 200, access_page(vm_id, url)
        except LegacyRefusal as e:
            status, page = e.status, refusal_page(e.text)
        except ApiError as e:  # the API's own refusals: signature, expiry, key
            status, page = e.code, refusal_page(e.text)
        except Exception:
            self._log.failure("legacy console request failed")
            status, page = 500, refusal_page("internal error, see the manager's log")
        self._metrics.api_requests.labels("consoleAccess", str(status)).inc()
        self._log.info(
            "console access -> {status}",
            status=status,
            account=getattr(account, "name", None),
            client_address=self._creator_address(request),
        )
        if not alive(request):
            return
        request.setResponseCode(status, STATUS_TEXT.get(status))
        for name, value in PAGE_HEADERS.items():
            request.setHeader(name, value)
        request.write(page)
        request.finish()

    async def _access(self, request: server.Request) -> tuple[store.Account, str, str]:
        try:
            params = parse_params(cast("dict[bytes, list[bytes]]", request.args or {}))
        except ParamError as e:
            raise LegacyRefusal(431, e.text) from None
        lower = {k.lower(): v for k, v in params.items()}
        if lower.get("cmd", "").lower() != "access":
            raise LegacyRefusal(431, NOT_ACCESS)
        vm_id = _vm_id(lower.get("vm", ""))
        if lower.get("signatureversion") != "3" or not lower.get("expires"):
            raise LegacyRefusal(401, NEEDS_EXPIRY)
        account = await self._authenticator.authenticate(params, lower)
        wait = self._limiter.take(lower["apikey"])
        if wait > 0:
            raise LegacyRefusal(429, f"too many consoles for this API key: retry in {wait:.0f} s")
        expires = signing.parse_expires(lower["expires"])  # checked by authenticate
        if not await self._spend(lower["signature"], expires):
            raise LegacyRefusal(403, ALREADY_USED)
        endpoint = await self._broker.create_endpoint(
            account, vm_id, None, self._creator_address(request)
        )
        if not endpoint.success or endpoint.url is None:
            raise LegacyRefusal(409, endpoint.details or "no console")
        return account, vm_id, endpoint.url

    def _creator_address(self, request: server.Request) -> str:
        host = getattr(request.getClientAddress(), "host", None) or "unknown"
        headers = request.requestHeaders.getRawHeaders(b"x-forwarded-for") or []
        return client_address(host, [h.decode("latin-1") for h in headers], self._trusted)


def _vm_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise LegacyRefusal(431, BAD_VM) from None
