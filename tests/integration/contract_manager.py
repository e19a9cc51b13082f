"""A management endpoint that speaks ``docs/management-api.md``, with knobs for faults.

The real manager (``cpvm-manager``) is exercised end to end in ``tests/system``; this
one lets cpvm's tests make the manager slow, broken or hostile on purpose, and see
exactly what cpvm asked.
"""

from __future__ import annotations

import hmac
import json
import secrets
import uuid
from dataclasses import dataclass, field

from twisted.internet import reactor
from twisted.web import resource, server


@dataclass
class Issued:
    vnc: dict
    vm_name: str = "test-vm"
    extra: str | None = None
    limits: dict = field(default_factory=dict)
    used: bool = False
    # view_only, viewer_policy, taken_over: as the manager puts them in the redemption.
    console: dict = field(default_factory=dict)
    recording: bool = False  # the redemption tells cpvm to record the session
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))


class ContractManager(resource.Resource):
    """Proxy API only: redeem, heartbeat, session end."""

    isLeaf = True

    def __init__(self, credential: str):
        super().__init__()
        self.credential = credential
        self.tokens: dict[str, Issued] = {}
        self.redeem_requests: list[dict] = []
        self.heartbeats: list[dict] = []
        self.ends: list[tuple[str, dict]] = []
        self.terminate: list[str] = []
        self.taken_over: list[str] = []
        # One-time playback tickets: ticket -> session id (docs/recording.md).
        self.playback_tickets: dict[str, str] = {}
        self.playback_requests: list[dict] = []
        self.recordings_deleted: list[str] = []
        self.delay = 0.0
        self.override: tuple[int, bytes] | None = None
        self.down = False  # drop every request's connection, like a dead manager
        self.port = None

    def issue(
        self,
        vnc: dict,
        *,
        extra: str | None = None,
        vm_name: str = "test-vm",
        limits: dict | None = None,
        console: dict | None = None,
        recording: bool = False,
    ) -> tuple[str, Issued]:
        token = secrets.token_urlsafe(32)
        issued = Issued(
            vnc=vnc,
            vm_name=vm_name,
            extra=extra,
            limits=limits or {},
            console=console or {},
            recording=recording,
        )
        self.tokens[token] = issued
        return token, issued

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"

    def render_POST(self, request):  # noqa: N802
        if self.down:
            request.transport.abortConnection()
            return server.NOT_DONE_YET
        auth = request.getHeader(b"authorization") or b""
        if not hmac.compare_digest(auth, b"Bearer " + self.credential.encode()):
            return self._answer(request, 401, {"error": "unauthorized", "message": "bad key"})
        try:
            body = json.loads(request.content.read())
        except ValueError:
            return self._answer(request, 400, {"error": "bad_request", "message": "not JSON"})
        path = request.path.decode()
        if path == "/proxy/v1/redeem":
            self.redeem_requests.append(body)
            answer = self._redeem(body)
        elif path == "/proxy/v1/heartbeat":
            self.heartbeats.append(body)
            self.recordings_deleted += body.get("recordings_deleted", [])
            for report in body.get("ended", []):
                report = dict(report)
                self.ends.append((report.pop("session_id"), report))
            answer = (
                200,
                {
                    "heartbeat_interval": 1,
                    # Like the manager: a taken-over session is in both lists, so a proxy
                    # that predates takeover still ends it.
                    "terminate": self.terminate + self.taken_over,
                    "taken_over": self.taken_over,
                },
            )
            self.terminate, self.taken_over = [], []
        elif path == "/proxy/v1/playback":
            self.playback_requests.append(body)
            session_id = self.playback_tickets.pop(body.get("ticket"), None)
            if session_id is None:
                answer = (
                    409,
                    {"error": "ticket_used", "message": "this playback link was already used"},
                )
            else:
                answer = (200, {"session_id": session_id})
        elif path.startswith("/proxy/v1/sessions/") and path.endswith("/end"):
            self.ends.append((path.split("/")[4], body))
            answer = (204, None)
        else:
            answer = (404, {"error": "not_found", "message": path})
        if self.override is not None and path == "/proxy/v1/redeem":
            status, raw = self.override
            request.setResponseCode(status)
            return raw
        if self.delay:
            reactor.callLater(self.delay, self._late, request, *answer)
            return server.NOT_DONE_YET
        return self._answer(request, *answer)

    def _late(self, request, status, body):
        if not request._disconnected:
            request.write(self._answer(request, status, body))
            request.finish()

    def _redeem(self, body: dict):
        issued = self.tokens.get(body.get("token"))
        if issued is None:
            return 404, {"error": "invalid_token", "message": "no such token"}
        if issued.used:
            return 409, {"error": "token_used", "message": "already used"}
        if (issued.extra or None) != (body.get("extra") or None):
            return 403, {"error": "extra_mismatch", "message": "extra differs"}
        issued.used = True
        extra = {"recording": True} if issued.recording else {}
        return 200, {
            **extra,
            "session_id": issued.session_id,
            "vm": {"id": "vm-" + issued.session_id[:8], "name": issued.vm_name},
            "vnc": {"tls": "none", "ca_pem": None, "server_name": None, **issued.vnc},
            "limits": issued.limits,
            "account": "tester",
            **issued.console,
        }

    @staticmethod
    def _answer(request, status, body):
        request.setResponseCode(status)
        if body is None:
            return b""
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(body).encode()


def start_contract_manager(credential: str) -> ContractManager:
    manager = ContractManager(credential)
    site = server.Site(manager)
    site.noisy = False
    manager.port = reactor.listenTCP(0, site, interface="127.0.0.1")
    return manager
