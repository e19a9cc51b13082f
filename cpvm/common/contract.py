"""How a console session ends: WebSocket close code, the text the person sees, the report.

The table is part of the contract in ``docs/management-api.md``. Reason texts are fixed
strings so no secret (token, password) can ever reach a close frame or a log line
through them.
"""

from __future__ import annotations

from enum import Enum


class Outcome(Enum):
    """Why a session ended: ``(close code, reason shown to the person, report reason)``."""

    SERVER_CLOSED = (1000, "session ended (VNC server closed)", "server_closed")
    CLIENT_CLOSED = (1000, "session ended (browser closed)", "client_closed")
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
    ACCOUNT_UNAVAILABLE = (4009, "account disabled or no longer owns the VM",
                           "account_unavailable")
    MANAGER_UNREACHABLE = (4010, "management server unreachable", "manager_unreachable")
    VNC_UNREACHABLE = (4011, "VNC server unreachable", "vnc_unreachable")
    VNC_AUTH_FAILED = (4012, "VNC authentication failed", "vnc_auth_failed")
    VNC_PROTOCOL_ERROR = (4013, "VNC protocol error", "vnc_protocol_error")
    VNC_HANDSHAKE_TIMEOUT = (4014, "VNC handshake timed out", "vnc_handshake_timeout")
    CLIENT_PROTOCOL_ERROR = (4015, "browser RFB protocol error", "client_protocol_error")
    IDLE_TIMEOUT = (4020, "idle timeout (no input from the browser)", "idle_timeout")
    MAX_DURATION = (4021, "session time limit reached", "max_duration")
    TERMINATED = (4022, "session terminated by administrator", "terminated")
    BAD_REQUEST = (4400, "bad request (missing token)", "bad_request")
    ERROR = (1011, "internal error", "error")
    # Refused by cpvm itself, without asking the manager (docs/management-api.md).
    RATE_LIMITED = (4029, "too many failed console attempts from this address",
                    "rate_limited")

    @property
    def code(self) -> int:
        return self.value[0]

    @property
    def text(self) -> str:
        return self.value[1]

    @property
    def report(self) -> str:
        return self.value[2]


# The manager's redemption errors (docs/management-api.md) and what the browser sees.
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
    "bad_request": Outcome.BAD_REQUEST,
}

# Failure kinds of the RFB client state machine and what they mean for the session.
UPSTREAM_FAILURES: dict[str, Outcome] = {
    "auth": Outcome.VNC_AUTH_FAILED,
    "unsupported-security": Outcome.VNC_AUTH_FAILED,
    "protocol": Outcome.VNC_PROTOCOL_ERROR,
}
