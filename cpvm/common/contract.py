"""The wire contract of cpvm and its manager, written once for both daemons.

How a console session ends (WebSocket close code, the text the person sees, the report
reason), the redemption errors, the end reasons a proxy may report, the VNC TLS modes, the
WebSocket path and the limits of ``token``/``extra``. ``docs/management-api.md`` documents
it; ``tests/unit/test_contract.py`` checks that both daemons keep to it. Reason texts are
fixed strings so no secret (token, password) can ever reach a close frame or a log line
through them. The token's own shape is in :mod:`cpvm.common.tokens`.
"""

from __future__ import annotations

import re
from enum import Enum


class Outcome(Enum):
    """Why a session ended: ``(close code, reason shown to the person, report reason)``."""

    SERVER_CLOSED = (1000, "session ended (VNC server closed)", "server_closed")
    CLIENT_CLOSED = (1000, "session ended (browser closed)", "client_closed")
    # The browser's connection went away without a WebSocket closing handshake (a network
    # blip, a dead peer found by the auto-ping): nothing is sent, the code is never on the
    # wire (1006 is reserved for exactly this).
    CLIENT_LOST = (1006, "connection to the browser lost", "client_lost")
    SHUTDOWN = (1001, "cpvm is shutting down", "shutdown")
    TEXT_FRAME = (1003, "text frames are not accepted (binary RFB only)", "client_protocol_error")
    INVALID_TOKEN = (4001, "invalid token", "invalid_token")
    EXPIRED_TOKEN = (4002, "token expired", "expired_token")
    TOKEN_USED = (4003, "token already used", "token_used")
    EXTRA_MISMATCH = (4004, "extra token mismatch", "extra_mismatch")
    ADDRESS_MISMATCH = (4005, "client address mismatch", "address_mismatch")
    WRONG_PROXY = (4006, "token issued for another console proxy", "wrong_proxy")
    VM_UNAVAILABLE = (4007, "VM not available", "vm_unavailable")
    INSTANCE_CONFLICT = (4008, "console proxy identity conflict", "instance_conflict")
    ACCOUNT_UNAVAILABLE = (4009, "account disabled or no longer owns the VM", "account_unavailable")
    MANAGER_UNREACHABLE = (4010, "management server unreachable", "manager_unreachable")
    VNC_UNREACHABLE = (4011, "VNC server unreachable", "vnc_unreachable")
    VNC_AUTH_FAILED = (4012, "VNC authentication failed", "vnc_auth_failed")
    VNC_PROTOCOL_ERROR = (4013, "VNC protocol error", "vnc_protocol_error")
    VNC_HANDSHAKE_TIMEOUT = (4014, "VNC handshake timed out", "vnc_handshake_timeout")
    CLIENT_PROTOCOL_ERROR = (4015, "browser RFB protocol error", "client_protocol_error")
    # Viewer policy "exclusive": a second full console while one is live (view-only may join).
    CONSOLE_IN_USE = (
        4016,
        "console in use by another person (view-only may join)",
        "console_in_use",
    )
    # A view-only console's browser sent a message cpvm cannot size: nothing after it can
    # be checked, so the console ends rather than pass bytes it cannot judge.
    VIEW_ONLY_UNCHECKABLE = (
        4017,
        "view-only console: the browser sent a message cpvm cannot check",
        "view_only_uncheckable",
    )
    IDLE_TIMEOUT = (4020, "idle timeout (no input from the browser)", "idle_timeout")
    MAX_DURATION = (4021, "session time limit reached", "max_duration")
    TERMINATED = (4022, "session terminated by administrator", "terminated")
    # Viewer policy "takeover": a newer full console for the same VM ended this one.
    TAKEN_OVER = (4023, "another console for this VM took over", "taken_over")
    # The session had to be recorded and its recording could not be written (disk full or
    # too slow) with [recording] on_failure = end: it does not go on unrecorded.
    RECORDING_FAILED = (4024, "session recording failed", "recording_failed")
    BAD_REQUEST = (4400, "bad request (missing token)", "bad_request")
    ERROR = (1011, "internal error", "error")
    # Refused by cpvm itself, without asking the manager (docs/management-api.md).
    RATE_LIMITED = (4029, "too many failed console attempts from this address", "rate_limited")
    AT_CAPACITY = (4503, "console proxy at capacity: try again in a moment", "at_capacity")

    @property
    def code(self) -> int:
        return self.value[0]

    @property
    def text(self) -> str:
        return self.value[1]

    @property
    def report(self) -> str:
        return self.value[2]


# The outcomes that can end a redeemed session, i.e. the reasons a proxy may report to
# the manager; anything else it reports as "error" (and logs why).
SESSION_END_OUTCOMES = (
    Outcome.SERVER_CLOSED,
    Outcome.CLIENT_CLOSED,
    Outcome.CLIENT_LOST,
    Outcome.SHUTDOWN,
    Outcome.TEXT_FRAME,
    Outcome.VNC_UNREACHABLE,
    Outcome.VNC_AUTH_FAILED,
    Outcome.VNC_PROTOCOL_ERROR,
    Outcome.VNC_HANDSHAKE_TIMEOUT,
    Outcome.CLIENT_PROTOCOL_ERROR,
    Outcome.VIEW_ONLY_UNCHECKABLE,
    Outcome.IDLE_TIMEOUT,
    Outcome.MAX_DURATION,
    Outcome.TERMINATED,
    Outcome.TAKEN_OVER,
    Outcome.RECORDING_FAILED,
    Outcome.ERROR,
)
END_REASONS = frozenset(o.report for o in SESSION_END_OUTCOMES)


def end_reason(outcome: Outcome) -> str:
    """The reason a proxy reports for a redeemed session that ended with ``outcome``."""
    return outcome.report if outcome in SESSION_END_OUTCOMES else Outcome.ERROR.report


# The manager's own end reason for a session whose proxy process went away without
# reporting it (it crashed, or stopped heartbeating).
PROXY_LOST = "proxy_lost"

# Unclean ends: the session stopped without anyone meaning it to (the browser's connection
# was lost, the proxy restarted or crashed). Only these may be resumed within
# ``[tokens] reconnect_window`` (docs/security.md). Every other end is clean and final: the
# person closed the console, the VNC server closed it, a limit (idle, duration) or an
# administrator ended it, or set-up failed.
UNCLEAN_END_REASONS = frozenset({Outcome.CLIENT_LOST.report, Outcome.SHUTDOWN.report, PROXY_LOST})


def is_unclean_end(reason: str | None) -> bool:
    """Whether a session that ended with ``reason`` may be resumed by the same browser."""
    return reason in UNCLEAN_END_REASONS


# What cpvm sends with a redemption to prove which browser it serves: the SHA-256 (64
# lowercase hex digits) of the browser's console cookie (cpvm/proxy/browser_cookie.py). The
# manager binds the first redemption to it and stores only the hash.
BROWSER_HASH = re.compile(r"[0-9a-f]{64}")


def looks_like_browser_hash(value: object) -> bool:
    """Whether ``value`` has the shape of a browser cookie hash."""
    return isinstance(value, str) and BROWSER_HASH.fullmatch(value) is not None


# The manager's redemption errors (docs/management-api.md): HTTP status, the message the
# manager sends, and what the browser sees.
REDEMPTION_ERROR_STATUS: dict[str, int] = {
    "invalid_token": 404,
    "expired_token": 410,
    "token_used": 409,
    "extra_mismatch": 403,
    "address_mismatch": 403,
    "wrong_proxy": 403,
    "vm_unavailable": 409,
    "account_unavailable": 403,
    "instance_conflict": 409,
    "console_in_use": 409,
}
REDEMPTION_ERROR_MESSAGE: dict[str, str] = {
    "invalid_token": "no such token",
    "expired_token": "the token's lifetime has passed",
    "token_used": "the token was already redeemed",
    "extra_mismatch": "extra does not match the one given at creation",
    "address_mismatch": "client address does not match the token's creator",
    "wrong_proxy": "the token was issued for another console proxy",
    "vm_unavailable": "the VM was removed or stopped since the token was issued",
    "account_unavailable": "the account was disabled or no longer owns the VM",
    "instance_conflict": (
        "this proxy key is in use by another running cpvm instance: give each proxy its own "
        "key (cpvm-manager-admin proxy list shows both); another instance may take over once "
        "the running one has been silent for proxy_timeout"
    ),
    "console_in_use": (
        "the VM's viewer policy is exclusive and another full console is live; a view-only "
        "console may join"
    ),
}
REDEMPTION_ERRORS: dict[str, Outcome] = {
    "invalid_token": Outcome.INVALID_TOKEN,
    "expired_token": Outcome.EXPIRED_TOKEN,
    "token_used": Outcome.TOKEN_USED,
    "extra_mismatch": Outcome.EXTRA_MISMATCH,
    "address_mismatch": Outcome.ADDRESS_MISMATCH,
    "wrong_proxy": Outcome.WRONG_PROXY,
    "vm_unavailable": Outcome.VM_UNAVAILABLE,
    "instance_conflict": Outcome.INSTANCE_CONFLICT,
    "account_unavailable": Outcome.ACCOUNT_UNAVAILABLE,
    "console_in_use": Outcome.CONSOLE_IN_USE,
    "bad_request": Outcome.BAD_REQUEST,
}

# Failure kinds of the RFB client state machine and what they mean for the session.
UPSTREAM_FAILURES: dict[str, Outcome] = {
    "auth": Outcome.VNC_AUTH_FAILED,
    "unsupported-security": Outcome.VNC_AUTH_FAILED,
    "protocol": Outcome.VNC_PROTOCOL_ERROR,
}

# How cpvm must reach a VM's VNC server, as the manager stores it and sends it.
VNC_TLS_MODES = ("none", "x509", "anonymous")

# What the desktop name noVNC shows starts with when the session is recorded, so the
# person knows (docs/recording.md).
RECORDING_MARKER = "\u25cf REC "

# The console's WebSocket: ws[s]://<proxy>/websockify?token=T[&extra=E].
WEBSOCKET_PATH = "websockify"
# The longest ``extra`` (CloudStack's ``token`` parameter of createConsoleEndpoint) and the
# longest ``token`` query value cpvm passes on; real tokens are shorter (tokens.py).
MAX_EXTRA_LENGTH = 512
MAX_TOKEN_LENGTH = 512
# The most capacity (concurrent consoles) a proxy's heartbeat may claim, and an operator may
# set as a proxy key's ceiling.
MAX_CAPACITY = 10**7


class ViewerPolicy(Enum):
    """Who may hold a VM's console at once; set per VM, decided by the manager at redemption.

    ``shared``: any number of consoles (the default). ``exclusive``: one full console at a
    time; a second is refused (``console_in_use``) while view-only ones may join.
    ``takeover``: a new full console ends the live full one (close code 4023); view-only
    ones stay. View-only consoles never count against a policy.
    """

    SHARED = "shared"
    EXCLUSIVE = "exclusive"
    TAKEOVER = "takeover"


VIEWER_POLICIES = tuple(p.value for p in ViewerPolicy)


def vnc_shared_flag(policy: ViewerPolicy, view_only: bool, requested: bool) -> bool:
    """The shared flag cpvm sends in its ClientInit to the VNC server.

    ``requested`` is what the browser asked for combined with cpvm's ``[session] shared``.
    Under ``shared`` that request stands (today's behaviour: an unshared client makes the
    VNC server drop the others). A view-only console never drops anyone. Under
    ``exclusive`` and ``takeover`` cpvm itself decides who holds the console, so the VNC
    server must keep every connection cpvm makes: an unshared one would drop the
    view-only watchers the policy admits (QEMU also refuses shared clients while an
    exclusive one is connected), and under ``takeover`` it would cut the old console off
    before cpvm could tell it why (its close code).
    """
    if view_only or policy is not ViewerPolicy.SHARED:
        return True
    return requested
