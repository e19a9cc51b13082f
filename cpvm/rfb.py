"""RFB (VNC) protocol logic as sans-IO state machines.

cpvm sits between a browser (noVNC) and a hypervisor's VNC server. It performs the RFB
handshake on both sides itself, so that the VNC password and any TLS towards the hypervisor
stay inside cpvm, and then relays the message streams unchanged:

- :class:`RfbClientHandshake` talks to the real VNC server (QEMU, TigerVNC) as a client.
- :class:`RfbServerHandshake` talks to the browser as a server offering security type None.
- :class:`ClientInputScanner` watches the browser's messages after the handshake to tell user
  input (keys, pointer, clipboard) from automatic traffic, for idle timeouts.

The machines do no I/O: they are fed the bytes that arrived and return events telling the
caller what to send or do. Bytes may arrive in any chunking, down to one byte at a time.
Nothing here imports Twisted; the protocols in other modules are thin adapters.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from cpvm.vncauth import CHALLENGE_LENGTH, vnc_auth_response

__all__ = [
    "MAX_FAILURE_MESSAGE",
    "MAX_NAME_LENGTH",
    "MAX_REASON_LENGTH",
    "ClientInitReceived",
    "ClientInputScanner",
    "Event",
    "Failed",
    "FailureKind",
    "RfbClientHandshake",
    "RfbServerHandshake",
    "SecurityComplete",
    "Send",
    "ServerInit",
    "ServerInitReceived",
    "StartTLS",
]

#: Longest failure reason string accepted from a peer; anything longer is a protocol error.
MAX_REASON_LENGTH: Final = 64 * 1024
#: Longest desktop name accepted in a ServerInit; anything longer is a protocol error.
MAX_NAME_LENGTH: Final = 64 * 1024

# Reasons go into log lines and error pages: keep the message short whatever the peer sent.
_MAX_REASON_IN_MESSAGE = 200
#: Longest :class:`Failed` message: a server listing 255 unknown VeNCrypt subtypes made
#: one of about 5 KB (found by tests/fuzz, target rfb_client).
MAX_FAILURE_MESSAGE: Final = 500

# Security types (RFC 6143 section 7.2 and the IANA registry).
SEC_INVALID: Final = 0
SEC_NONE: Final = 1
SEC_VNC_AUTH: Final = 2
SEC_VENCRYPT: Final = 19

# VeNCrypt subtypes that cpvm can use.
VENCRYPT_TLS_NONE: Final = 257
VENCRYPT_TLS_VNC: Final = 258
VENCRYPT_X509_NONE: Final = 260
VENCRYPT_X509_VNC: Final = 261

_SECURITY_NAMES: Final = {
    SEC_NONE: "None",
    SEC_VNC_AUTH: "VNC Authentication",
    SEC_VENCRYPT: "VeNCrypt",
    256: "Plain",
    VENCRYPT_TLS_NONE: "TLSNone",
    VENCRYPT_TLS_VNC: "TLSVnc",
    259: "TLSPlain",
    VENCRYPT_X509_NONE: "X509None",
    VENCRYPT_X509_VNC: "X509Vnc",
    262: "X509Plain",
}

_VENCRYPT_TLS_SUBTYPES: Final = frozenset(
    {VENCRYPT_TLS_NONE, VENCRYPT_TLS_VNC, VENCRYPT_X509_NONE, VENCRYPT_X509_VNC}
)
_VENCRYPT_ANONYMOUS_SUBTYPES: Final = frozenset({VENCRYPT_TLS_NONE, VENCRYPT_TLS_VNC})
# Types whose inner authentication is VNC Authentication, so they need the password.
_NEEDS_PASSWORD: Final = frozenset({SEC_VNC_AUTH, VENCRYPT_TLS_VNC, VENCRYPT_X509_VNC})

# Strongest first. X509 checks the server's certificate chain (by the caller's TLS
# context); anonymous TLS only encrypts; VNC Authentication alone sends everything in clear.
_PREFERENCE: Final = (
    VENCRYPT_X509_VNC,
    VENCRYPT_X509_NONE,
    VENCRYPT_TLS_VNC,
    VENCRYPT_TLS_NONE,
    SEC_VNC_AUTH,
    SEC_NONE,
)

_VERSION_LENGTH: Final = 12
_VERSION_RE: Final = re.compile(rb"RFB (\d{3})\.(\d{3})\n\Z")
# What each byte of a version message may be, checked as bytes arrive so that a non-RFB
# peer (an SSH or HTTP banner shorter than 12 bytes) fails at once instead of hanging.
_VERSION_TEMPLATE: Final = tuple(
    frozenset(b"0123456789") if c == "d" else frozenset(c.encode()) for c in "RFB ddd.ddd\n"
)

_U32: Final = struct.Struct(">I")
_SERVER_INIT_HEADER: Final = struct.Struct(">HH16sI")
_PIXEL_FORMAT_LENGTH: Final = 16


# --------------------------------------------------------------------------------------
# Events


FailureKind = Literal["protocol", "auth", "unsupported-security"]


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``data`` to the peer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Start TLS as a client on the connection to the VNC server, then call ``tls_started``.

    ``anonymous`` is true for VeNCrypt TLSNone/TLSVnc (anonymous Diffie-Hellman, no
    certificate to check) and false for the X509 subtypes (verify the server certificate).
    """

    anonymous: bool


@dataclass(frozen=True, slots=True)
class SecurityComplete:
    """The VNC server accepted us; call ``send_client_init`` to continue."""


@dataclass(frozen=True, slots=True)
class ServerInitReceived:
    """The handshake with the VNC server is over.

    ``leftover`` holds the bytes that followed the ServerInit: they are the start of the
    server's normal message stream and belong to the relay.
    """

    server_init: ServerInit
    leftover: bytes


@dataclass(frozen=True, slots=True)
class ClientInitReceived:
    """The browser finished its side of the handshake; call ``send_server_init`` next.

    ``leftover`` holds bytes that followed the ClientInit (normal client messages).
    """

    shared: bool
    leftover: bytes


@dataclass(frozen=True, slots=True)
class ClientVersionReceived:
    """The browser sent its RFB version; call ``accept`` or ``reject`` next.

    The server side waits here until the session knows whether it can go on (token
    redeemed, VNC server authenticated), so a refusal reaches the person as an RFB
    security failure with a reason, which noVNC displays.
    """

    minor_version: int


@dataclass(frozen=True, slots=True)
class Failed:
    """The handshake failed; close the connection. The machine ignores further input.

    ``kind`` is ``"protocol"`` when the peer sent something malformed or unsupported,
    ``"auth"`` when the server refused us (bad password, too many attempts, connection
    refused with a reason) or we have no password for the authentication it demands, and
    ``"unsupported-security"`` when no security type on offer is acceptable.
    ``message`` is meant for logs, never contains the VNC password and is at most
    :data:`MAX_FAILURE_MESSAGE` characters.
    """

    kind: FailureKind
    message: str


Event = (
    Send
    | StartTLS
    | SecurityComplete
    | ServerInitReceived
    | ClientVersionReceived
    | ClientInitReceived
    | Failed
)


# --------------------------------------------------------------------------------------
# ServerInit


@dataclass(frozen=True, slots=True)
class ServerInit:
    """The ServerInit message: framebuffer size, pixel format and desktop name."""

    width: int
    height: int
    pixel_format: bytes
    name: bytes

    def __post_init__(self) -> None:
        if not (0 <= self.width <= 0xFFFF and 0 <= self.height <= 0xFFFF):
            raise ValueError(f"framebuffer size {self.width}x{self.height} out of range")
        if len(self.pixel_format) != _PIXEL_FORMAT_LENGTH:
            raise ValueError(
                f"pixel format must be {_PIXEL_FORMAT_LENGTH} bytes, got {len(self.pixel_format)}"
            )
        if len(self.name) > MAX_NAME_LENGTH:
            raise ValueError(f"desktop name longer than {MAX_NAME_LENGTH} bytes")

    def to_bytes(self) -> bytes:
        """Serialise as sent on the wire."""
        return (
            _SERVER_INIT_HEADER.pack(self.width, self.height, self.pixel_format, len(self.name))
            + self.name
        )

    def with_name(self, name: bytes) -> ServerInit:
        """Return a copy with the desktop name replaced (e.g. by the VM's name)."""
        return dataclasses.replace(self, name=name)


# --------------------------------------------------------------------------------------
# Helpers shared by both handshakes


def _security_name(code: int) -> str:
    return _SECURITY_NAMES.get(code, "unknown")


def _format_reason(raw: bytes) -> str:
    """A peer's reason string made safe and short for a log line."""
    text = raw.decode("utf-8", errors="replace")
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    if len(text) > _MAX_REASON_IN_MESSAGE:
        text = text[:_MAX_REASON_IN_MESSAGE] + "..."
    return repr(text)


def _version_prefix_ok(buf: bytearray) -> bool:
    """True while the bytes so far could still be the start of ``RFB xxx.yyy\\n``."""
    for index in range(min(len(buf), _VERSION_LENGTH)):
        if buf[index] not in _VERSION_TEMPLATE[index]:
            return False
    return True


class _Machine:
    """Input buffering and the step loop common to both handshakes.

    Each state is a method that looks at ``_buf``; it returns False when it needs more
    bytes, True when it consumed some (or changed state) and the loop should go on.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._step: Callable[[list[Event]], bool] = self._step_not_started
        self._dead = False

    @property
    def failed(self) -> bool:
        """True once a :class:`Failed` event was emitted."""
        return self._dead

    @property
    def phase(self) -> str:
        """What the machine is waiting for, e.g. to explain a connection that closed."""
        return self._step.__name__.removeprefix("_step_").replace("_", " ")

    def _step_not_started(self, events: list[Event]) -> bool:
        return False

    def _run(self, events: list[Event]) -> list[Event]:
        while not self._dead and self._step(events):
            pass
        return events

    def _fail(self, events: list[Event], kind: FailureKind, message: str) -> bool:
        self._dead = True
        self._buf.clear()
        if len(message) > MAX_FAILURE_MESSAGE:
            message = message[:MAX_FAILURE_MESSAGE - 3] + "..."
        events.append(Failed(kind, message))
        return False

    def _take_version(self, events: list[Event], peer: str) -> tuple[bytes, int, int] | None:
        """The peer's ``RFB xxx.yyy\\n`` once complete; None while waiting or after failing."""
        if not _version_prefix_ok(self._buf):
            self._fail(
                events,
                "protocol",
                f"{peer} did not send an RFB version: {bytes(self._buf[:_VERSION_LENGTH])!r}",
            )
            return None
        if len(self._buf) < _VERSION_LENGTH:
            return None
        raw = self._take(_VERSION_LENGTH)
        match = _VERSION_RE.match(raw)
        assert match is not None  # guaranteed by the template check
        return raw, int(match[1]), int(match[2])

    def _take(self, count: int) -> bytes:
        data = bytes(self._buf[:count])
        del self._buf[:count]
        return data

    def _take_u32(self) -> int:
        value: int = _U32.unpack_from(self._buf)[0]
        del self._buf[:4]
        return value

    def _take_reason(self, events: list[Event]) -> bytes | None:
        """Take a u32-length-prefixed reason string, or None if incomplete or too long.

        On a too-long length the machine has failed (check ``_dead``).
        """
        if len(self._buf) < 4:
            return None
        length: int = _U32.unpack_from(self._buf)[0]
        if length > MAX_REASON_LENGTH:
            self._fail(
                events,
                "protocol",
                f"peer sent a {length}-byte reason string (limit {MAX_REASON_LENGTH})",
            )
            return None
        if len(self._buf) < 4 + length:
            return None
        reason = bytes(self._buf[4 : 4 + length])
        del self._buf[: 4 + length]
        return reason


# --------------------------------------------------------------------------------------
# cpvm -> VNC server


class RfbClientHandshake(_Machine):
    """cpvm's side of the RFB handshake towards the real VNC server, as a client.

    Feed received bytes to :meth:`receive` and act on the returned events in order.
    :class:`StartTLS` pauses the machine until :meth:`tls_started`; :class:`SecurityComplete`
    pauses it until :meth:`send_client_init`; :class:`ServerInitReceived` ends it.

    ``password`` is the VNC password (only its first 8 bytes count). ``allow_anonymous_tls``
    permits VeNCrypt TLSNone/TLSVnc, which encrypt but cannot authenticate the server.
    ``allow_none`` permits servers that ask for no authentication at all.
    ``require_tls`` accepts only VeNCrypt TLS subtypes (the VM's VNC is configured for TLS).
    ``allow_x509`` is false when there is no CA to verify an X509 server certificate with.
    """

    def __init__(
        self,
        password: bytes | None,
        *,
        allow_anonymous_tls: bool = False,
        allow_none: bool = True,
        require_tls: bool = False,
        allow_x509: bool = True,
    ) -> None:
        super().__init__()
        # Without a CA to verify the server's certificate, X509 subtypes cannot succeed:
        # prefer whatever else the server offers.
        self._allow_x509 = allow_x509
        self._password = password
        self._allow_anonymous_tls = allow_anonymous_tls
        self._allow_none = allow_none
        # The manager may demand VeNCrypt TLS for a VM: then plain VncAuth/None are refused
        # even when offered, so a downgrade by a man in the middle fails loudly.
        self._require_tls = require_tls
        self._step = self._step_version
        #: Minor version agreed with the server (3, 7 or 8) once the versions are exchanged.
        self.minor_version: int | None = None
        #: The security type in use once chosen: a top-level type, or a VeNCrypt subtype.
        self.security_type: int | None = None
        self._vencrypt_subtype: int | None = None

    def __repr__(self) -> str:
        # Never show the password.
        return f"<RfbClientHandshake phase={self.phase!r} failed={self._dead}>"

    # -- public API

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes received from the VNC server; return the resulting events."""
        if self._dead:
            return []
        if self._step == self._step_done:
            raise RuntimeError("handshake is over: relay the bytes instead")
        if self._step == self._step_wait_for_tls and data:
            # The server accepted a TLS subtype and must now wait for our ClientHello.
            return self._run_fail(
                "protocol",
                f"server sent {len(data)} bytes in clear text where a TLS handshake was expected",
            )
        self._buf += data
        return self._run([])

    def tls_started(self) -> list[Event]:
        """Tell the machine that TLS is up after :class:`StartTLS`; resume the handshake."""
        if self._dead:
            return []
        if self._step != self._step_wait_for_tls:
            raise RuntimeError("tls_started() called without a StartTLS event")
        if self._vencrypt_subtype in _NEEDS_PASSWORD:
            self._step = self._step_vnc_auth_challenge
        else:
            self._step = self._step_security_result
        return self._run([])

    def send_client_init(self, shared: bool) -> list[Event]:
        """Send ClientInit (after :class:`SecurityComplete`) and go on to read ServerInit."""
        if self._dead:
            return []
        if self._step != self._step_wait_for_client_init:
            raise RuntimeError("send_client_init() called before SecurityComplete")
        self._step = self._step_server_init
        return self._run([Send(b"\x01" if shared else b"\x00")])

    # -- states

    def _run_fail(self, kind: FailureKind, message: str) -> list[Event]:
        events: list[Event] = []
        self._fail(events, kind, message)
        return events

    def _step_version(self, events: list[Event]) -> bool:
        version = self._take_version(events, "server")
        if version is None:
            return False
        raw, major, minor = version
        if major < 3:
            return self._fail(events, "protocol", f"unsupported RFB version {raw!r}")
        if major > 3 or minor >= 8:
            # 3.889 is Apple's; RealVNC announces 4.x/5.x: all of them accept a 3.8 client.
            minor = 8
        elif minor < 7:
            # RFC 6143: other versions (3.4 UltraVNC, 3.5, 3.6) must be treated as 3.3.
            minor = 3
        self.minor_version = minor
        events.append(Send(b"RFB 003.%03d\n" % minor))
        self._step = self._step_security_33 if minor == 3 else self._step_security_types
        return True

    def _step_security_33(self, events: list[Event]) -> bool:
        # RFB 3.3: the server decides, as a u32.
        if len(self._buf) < 4:
            return False
        sec_type = self._take_u32()
        if sec_type == SEC_INVALID:
            self._step = self._step_connection_refused
            return True
        if self._require_tls:
            return self._fail(
                events, "unsupported-security",
                f"server (RFB 3.3) imposes security type {sec_type} but TLS is required")
        if sec_type == SEC_NONE and self._allow_none:
            self.security_type = SEC_NONE
            # No SecurityResult after None before 3.8.
            return self._security_complete(events)
        if sec_type == SEC_VNC_AUTH and self._password is not None:
            self.security_type = SEC_VNC_AUTH
            self._step = self._step_vnc_auth_challenge
            return True
        return self._no_acceptable_type(events, [sec_type], "server (RFB 3.3) requires")

    def _step_connection_refused(self, events: list[Event]) -> bool:
        reason = self._take_reason(events)
        if reason is None:
            return False
        return self._fail(
            events, "auth", f"server refused the connection: {_format_reason(reason)}"
        )

    def _step_security_types(self, events: list[Event]) -> bool:
        if not self._buf:
            return False
        count = self._buf[0]
        if count == 0:
            del self._buf[:1]
            self._step = self._step_connection_refused
            return True
        if len(self._buf) < 1 + count:
            return False
        offered = list(self._take(1 + count)[1:])
        choice = self._choose_top_level(offered)
        if choice is None:
            return self._no_acceptable_type(events, offered, "server offered security types")
        events.append(Send(bytes([choice])))
        self.security_type = choice
        if choice == SEC_NONE:
            if self.minor_version == 8:
                self._step = self._step_security_result
                return True
            return self._security_complete(events)
        if choice == SEC_VNC_AUTH:
            self._step = self._step_vnc_auth_challenge
        else:
            self._step = self._step_vencrypt_version
        return True

    def _choose_top_level(self, offered: list[int]) -> int | None:
        if SEC_VENCRYPT in offered:
            # The subtypes are only listed after committing to VeNCrypt; take it when it is
            # on offer, as servers offering it expect to be reached that way.
            return SEC_VENCRYPT
        if self._require_tls:
            return None
        if SEC_VNC_AUTH in offered and self._password is not None:
            return SEC_VNC_AUTH
        if SEC_NONE in offered and self._allow_none:
            return SEC_NONE
        return None

    def _rejection_reasons(self, offered: list[int]) -> list[str]:
        reasons = []
        if self._require_tls:
            reasons.append("TLS is required and VeNCrypt (19) is not offered")
        unsupported = sorted({t for t in offered if t not in _PREFERENCE})
        if SEC_VNC_AUTH in offered and self._password is None:
            reasons.append(f"type {SEC_VNC_AUTH} (VNC Authentication) needs a VNC password")
        if SEC_NONE in offered and not self._allow_none:
            reasons.append(f"type {SEC_NONE} (None) is refused by allow_none=False")
        if unsupported:
            names = ", ".join(f"{t} ({_security_name(t)})" for t in unsupported)
            reasons.append(f"unsupported: {names}")
        return reasons

    def _no_acceptable_type(self, events: list[Event], offered: list[int], what: str) -> bool:
        reasons = self._rejection_reasons(offered)
        kind: FailureKind = "unsupported-security"
        if reasons and all("needs a VNC password" in r for r in reasons):
            kind = "auth"  # the server is fine; cpvm lacks the password it demands
        if len(offered) == 1 and what.endswith("requires"):
            message = f"{what} security type {offered[0]} but it is not allowed: "
        else:
            message = f"{what} {offered} but none is allowed: "
        return self._fail(events, kind, message + "; ".join(reasons))

    def _step_vnc_auth_challenge(self, events: list[Event]) -> bool:
        if len(self._buf) < CHALLENGE_LENGTH:
            return False
        challenge = self._take(CHALLENGE_LENGTH)
        if self._password is None:
            # Only reachable if a subtype needing a password was chosen by mistake.
            return self._fail(events, "auth", "server requires VNC Authentication but no password")
        events.append(Send(vnc_auth_response(self._password, challenge)))
        self._step = self._step_security_result
        return True

    def _step_security_result(self, events: list[Event]) -> bool:
        if len(self._buf) < 4:
            return False
        result = self._take_u32()
        if result == 0:
            return self._security_complete(events)
        if self.minor_version == 8:
            # RFB 3.8 follows a failed SecurityResult with a reason string.
            self._step = self._step_security_failure_reason
            return True
        return self._fail(events, "auth", f"authentication failed (SecurityResult {result})")

    def _step_security_failure_reason(self, events: list[Event]) -> bool:
        reason = self._take_reason(events)
        if reason is None:
            return False
        return self._fail(events, "auth", f"authentication failed: {_format_reason(reason)}")

    def _step_vencrypt_version(self, events: list[Event]) -> bool:
        if len(self._buf) < 2:
            return False
        major, minor = self._take(2)
        if (major, minor) < (0, 2):
            return self._fail(
                events,
                "unsupported-security",
                f"server speaks VeNCrypt {major}.{minor}; only 0.2 is supported",
            )
        events.append(Send(b"\x00\x02"))
        self._step = self._step_vencrypt_version_ack
        return True

    def _step_vencrypt_version_ack(self, events: list[Event]) -> bool:
        if not self._buf:
            return False
        status = self._take(1)[0]
        if status != 0:
            return self._fail(events, "unsupported-security", "server refused VeNCrypt version 0.2")
        self._step = self._step_vencrypt_subtypes
        return True

    def _step_vencrypt_subtypes(self, events: list[Event]) -> bool:
        if not self._buf:
            return False
        count = self._buf[0]  # a u8, so at most 255 subtypes
        if count == 0:
            return self._fail(events, "protocol", "server offered no VeNCrypt subtypes")
        if len(self._buf) < 1 + 4 * count:
            return False
        raw = self._take(1 + 4 * count)
        offered = [value for (value,) in struct.iter_unpack(">I", raw[1:])]
        choice = self._choose_vencrypt_subtype(offered)
        if choice is None:
            return self._no_acceptable_subtype(events, offered)
        events.append(Send(_U32.pack(choice)))
        self._vencrypt_subtype = choice
        self.security_type = choice
        if choice in _VENCRYPT_TLS_SUBTYPES:
            self._step = self._step_vencrypt_subtype_ack
        elif choice == SEC_VNC_AUTH:
            # Plain subtypes (TigerVNC lists 2) get no accept byte: straight to the challenge.
            self._step = self._step_vnc_auth_challenge
        else:
            # VeNCrypt always sends a SecurityResult, even for its None subtype.
            self._step = self._step_security_result
        return True

    def _subtype_allowed(self, subtype: int) -> bool:
        if subtype in (VENCRYPT_X509_NONE, VENCRYPT_X509_VNC) and not self._allow_x509:
            return False
        if self._require_tls and subtype not in _VENCRYPT_TLS_SUBTYPES:
            return False
        if subtype in _NEEDS_PASSWORD and self._password is None:
            return False
        if subtype in _VENCRYPT_ANONYMOUS_SUBTYPES and not self._allow_anonymous_tls:
            return False
        if subtype == SEC_NONE and not self._allow_none:
            return False
        return subtype in _PREFERENCE

    def _choose_vencrypt_subtype(self, offered: list[int]) -> int | None:
        for candidate in _PREFERENCE:
            if candidate in offered and self._subtype_allowed(candidate):
                return candidate
        return None

    def _no_acceptable_subtype(self, events: list[Event], offered: list[int]) -> bool:
        reasons = []
        if self._require_tls and not any(
            t in _VENCRYPT_TLS_SUBTYPES and self._subtype_allowed(t) for t in offered
        ):
            reasons.append("TLS is required and no acceptable VeNCrypt TLS subtype is offered")
        anonymous = sorted({t for t in offered if t in _VENCRYPT_ANONYMOUS_SUBTYPES})
        need_password = sorted({t for t in offered if t in _NEEDS_PASSWORD})
        if anonymous and not self._allow_anonymous_tls:
            reasons.append(f"VeNCrypt subtypes {anonymous} need allow_anonymous_tls")
        if need_password and self._password is None:
            reasons.append(f"VeNCrypt subtypes {need_password} need a VNC password")
        if SEC_NONE in offered and not self._allow_none:
            reasons.append(f"VeNCrypt subtype {SEC_NONE} (None) is refused by allow_none=False")
        unsupported = sorted({t for t in offered if t not in _PREFERENCE})
        if unsupported:
            names = ", ".join(f"{t} ({_security_name(t)})" for t in unsupported)
            reasons.append(f"unsupported VeNCrypt subtypes: {names}")
        kind: FailureKind = "unsupported-security"
        if reasons and all("need a VNC password" in r for r in reasons):
            kind = "auth"
        return self._fail(
            events,
            kind,
            f"server offered security types [{SEC_VENCRYPT}] but none is allowed: "
            + "; ".join(reasons),
        )

    def _step_vencrypt_subtype_ack(self, events: list[Event]) -> bool:
        if not self._buf:
            return False
        accepted = self._take(1)[0]
        if accepted != 1:
            return self._fail(
                events,
                "unsupported-security",
                f"server rejected VeNCrypt subtype {self._vencrypt_subtype}"
                f" ({_security_name(self._vencrypt_subtype or 0)})",
            )
        if self._buf:
            # The next bytes must be TLS, which the caller's TLS layer has to see.
            return self._fail(
                events,
                "protocol",
                f"server sent {len(self._buf)} bytes in clear text after accepting TLS",
            )
        events.append(StartTLS(anonymous=self._vencrypt_subtype in _VENCRYPT_ANONYMOUS_SUBTYPES))
        self._step = self._step_wait_for_tls
        return False

    def _step_wait_for_tls(self, events: list[Event]) -> bool:
        return False

    def _security_complete(self, events: list[Event]) -> bool:
        events.append(SecurityComplete())
        self._step = self._step_wait_for_client_init
        return False

    def _step_wait_for_client_init(self, events: list[Event]) -> bool:
        # The server speaks only after ClientInit; keep anything early for ServerInit parsing.
        return False

    def _step_server_init(self, events: list[Event]) -> bool:
        header_length = _SERVER_INIT_HEADER.size
        if len(self._buf) < header_length:
            return False
        width, height, pixel_format, name_length = _SERVER_INIT_HEADER.unpack_from(self._buf)
        if name_length > MAX_NAME_LENGTH:
            return self._fail(
                events,
                "protocol",
                f"server sent a {name_length}-byte desktop name (limit {MAX_NAME_LENGTH})",
            )
        total = header_length + name_length
        if len(self._buf) < total:
            return False
        server_init = ServerInit(width, height, pixel_format, bytes(self._buf[header_length:total]))
        leftover = bytes(self._buf[total:])
        self._buf = bytearray()
        events.append(ServerInitReceived(server_init, leftover))
        self._step = self._step_done
        return False

    def _step_done(self, events: list[Event]) -> bool:
        return False


# --------------------------------------------------------------------------------------
# browser -> cpvm


class RfbServerHandshake(_Machine):
    """cpvm's side of the RFB handshake towards the browser, as a server.

    Always announces RFB 3.8 and offers security type None only: the browser was already
    authorised by its one-time token, and the VNC password never leaves cpvm. Call
    :meth:`start`, feed received bytes to :meth:`receive`, and after
    :class:`ClientInitReceived` answer with :meth:`send_server_init`.
    """

    def __init__(self) -> None:
        super().__init__()
        #: Minor version agreed with the client (3, 7 or 8) once known.
        self.minor_version: int | None = None

    def __repr__(self) -> str:
        return f"<RfbServerHandshake phase={self.phase!r} failed={self._dead}>"

    def start(self) -> list[Event]:
        """Begin the handshake: return the server's version message."""
        if self._step != self._step_not_started:
            raise RuntimeError("start() called twice")
        self._step = self._step_version
        return [Send(b"RFB 003.008\n")]

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes received from the browser; return the resulting events."""
        if self._dead:
            return []
        if self._step == self._step_not_started:
            raise RuntimeError("receive() called before start()")
        if self._step in (self._step_wait_for_server_init, self._step_done):
            raise RuntimeError("handshake input is over: buffer or relay the bytes instead")
        self._buf += data
        return self._run([])

    def send_server_init(self, server_init: ServerInit, name: bytes | None = None) -> list[Event]:
        """Send ServerInit to the browser, with the desktop name replaced by ``name`` if given."""
        if self._dead:
            return []
        if self._step != self._step_wait_for_server_init:
            raise RuntimeError("send_server_init() called before ClientInitReceived")
        if name is not None:
            server_init = server_init.with_name(name)
        self._step = self._step_done
        return [Send(server_init.to_bytes())]

    def _step_version(self, events: list[Event]) -> bool:
        version = self._take_version(events, "client")
        if version is None:
            return False
        raw, major, minor = version
        if major != 3:
            return self._fail(events, "protocol", f"unsupported RFB version {raw!r}")
        # Versions between the official ones behave like the one below (RFC 6143), and a
        # client claiming more than our 3.8 gets 3.8.
        minor = 3 if minor < 7 else min(minor, 8)
        self.minor_version = minor
        events.append(ClientVersionReceived(minor))
        self._step = self._step_wait_for_decision
        return True

    def _step_wait_for_decision(self, events: list[Event]) -> bool:
        # Input waits in the buffer until accept() or reject().
        return False

    def accept(self) -> list[Event]:
        """Offer security type None and continue towards ClientInit."""
        if self._dead:
            return []
        if self._step != self._step_wait_for_decision:
            raise RuntimeError("accept() called before ClientVersionReceived")
        events: list[Event] = []
        if self.minor_version == 3:
            # RFB 3.3: the server imposes the type.
            events.append(Send(_U32.pack(SEC_NONE)))
            self._step = self._step_client_init
        else:
            events.append(Send(bytes([1, SEC_NONE])))
            self._step = self._step_security_choice
        return self._run(events)

    def reject(self, reason: str) -> list[Event]:
        """Refuse the connection with ``reason`` (shown to the person by noVNC)."""
        if self._dead:
            return []
        if self._step != self._step_wait_for_decision:
            raise RuntimeError("reject() called before ClientVersionReceived")
        raw = reason.encode("utf-8")[:MAX_REASON_LENGTH]
        # 3.3 signals failure with security type 0; 3.7+ with an empty type list. Both are
        # followed by the reason string.
        head = _U32.pack(SEC_INVALID) if self.minor_version == 3 else b"\x00"
        self._dead = True
        return [Send(head + _U32.pack(len(raw)) + raw)]

    def _step_security_choice(self, events: list[Event]) -> bool:
        if not self._buf:
            return False
        choice = self._take(1)[0]
        if choice != SEC_NONE:
            message = f"client chose security type {choice} but only {SEC_NONE} (None) is offered"
            if self.minor_version == 8:
                reason = b"security type not offered"
                events.append(Send(_U32.pack(1) + _U32.pack(len(reason)) + reason))
            return self._fail(events, "protocol", message)
        if self.minor_version == 8:
            # 3.8 sends a SecurityResult even for None; 3.7 does not.
            events.append(Send(_U32.pack(0)))
        self._step = self._step_client_init
        return True

    def _step_client_init(self, events: list[Event]) -> bool:
        if not self._buf:
            return False
        shared = self._buf[0] != 0
        leftover = bytes(self._buf[1:])
        self._buf = bytearray()
        events.append(ClientInitReceived(shared, leftover))
        self._step = self._step_wait_for_server_init
        return False

    def _step_wait_for_server_init(self, events: list[Event]) -> bool:
        return False

    def _step_done(self, events: list[Event]) -> bool:
        return False


# --------------------------------------------------------------------------------------
# browser messages after the handshake

# Client-to-server messages of a fixed total length, by message type.
_FIXED_LENGTH: Final = {
    0: 20,  # SetPixelFormat
    3: 10,  # FramebufferUpdateRequest
    4: 8,  # KeyEvent
    5: 6,  # PointerEvent
    150: 10,  # EnableContinuousUpdates
    250: 4,  # xvp
}
# Fixed-length messages that are user input.
_FIXED_INPUT: Final = frozenset({4, 5})
# Messages whose length depends on their header: type -> bytes of header needed first.
_HEADER_LENGTH: Final = {
    2: 4,  # SetEncodings: type, pad, u16 count; then 4 bytes per encoding
    6: 8,  # ClientCutText: type, 3 pad, s32 length; then the text
    248: 9,  # ClientFence: type, 3 pad, u32 flags, u8 length; then the payload
    251: 8,  # SetDesktopSize: type, pad, u16 w, u16 h, u8 screens, pad; then 16 per screen
    255: 2,  # QEMU: type, submessage type; the rest depends on the submessage
}
_QEMU_EXTENDED_KEY_EVENT_LENGTH: Final = 12
_QEMU_AUDIO_HEADER_LENGTH: Final = 4
_QEMU_AUDIO_LENGTH: Final = {0: 4, 1: 4, 2: 10}  # enable, disable, set format
# Extended clipboard: a negative ClientCutText length; the flags' top byte says what it is.
_CLIPBOARD_CAPS_FLAG: Final = 0x01  # bit 24 of the flags, in their first byte


class ClientInputScanner:
    """Counts user input events in the browser's message stream after the handshake.

    Feed every chunk the browser sends to :meth:`feed`; it returns how many input events
    (KeyEvent, PointerEvent, QEMU extended KeyEvent, ClientCutText) started in it, so the
    idle timeout can ignore automatic traffic such as FramebufferUpdateRequest. On a
    message type it does not know it cannot find the next message boundary: it stops and
    sets :attr:`desynchronised`, after which the caller should count any bytes as activity.

    Work is O(bytes) with no buffering of message bodies: payloads (notably clipboard text)
    are skipped by counting.
    """

    __slots__ = ("_header", "_header_length", "_skip", "desynchronised", "unknown_type")

    def __init__(self) -> None:
        #: True once an unknown message type was seen; :meth:`feed` then returns 0.
        self.desynchronised = False
        #: The unknown message type that desynchronised the scanner, for logs.
        self.unknown_type: int | None = None
        self._skip = 0  # bytes of the current message still to pass over
        self._header: bytearray | None = None  # header bytes of a variable-length message
        self._header_length = 0  # how many header bytes that message needs in all

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Scan the next chunk of the browser's stream; return the number of input events."""
        if self.desynchronised:
            return 0
        end = len(data)
        position = 0
        inputs = 0
        while position < end:
            if self._skip:
                step = min(self._skip, end - position)
                self._skip -= step
                position += step
                continue
            header = self._header
            if header is None:
                message_type = data[position]
                fixed = _FIXED_LENGTH.get(message_type)
                if fixed is not None:
                    if message_type in _FIXED_INPUT:
                        inputs += 1
                    self._skip = fixed - 1
                    position += 1
                    continue
                header_length = _HEADER_LENGTH.get(message_type)
                if header_length is None:
                    self.desynchronised = True
                    self.unknown_type = message_type
                    return inputs
                header = self._header = bytearray()
                self._header_length = header_length
            step = min(self._header_length - len(header), end - position)
            header += data[position : position + step]
            position += step
            if len(header) == self._header_length:
                counted = self._header_complete(header)
                if counted is None:
                    return inputs
                inputs += counted
        return inputs

    def _header_complete(self, header: bytearray) -> int | None:
        """Work out the rest of the message from its header.

        Returns the input events it counts for, or None when the scanner desynchronised.
        Sets either ``_skip`` (and clears the header) or a longer ``_header_length``.
        """
        message_type = header[0]
        inputs = 0
        if message_type == 2:
            self._skip = 4 * int.from_bytes(header[2:4], "big")
        elif message_type == 6:
            length = int.from_bytes(header[4:8], "big", signed=True)
            if length >= 0:
                inputs = 1
                self._skip = length
            elif len(header) == 8:
                # Extended clipboard: peek at the flags to leave out the automatic caps.
                self._header_length = 9
                return 0
            else:
                inputs = 0 if header[8] & _CLIPBOARD_CAPS_FLAG else 1
                self._skip = -length - 1
        elif message_type == 248:
            self._skip = header[8]
        elif message_type == 251:
            self._skip = 16 * header[6]
        else:  # 255, QEMU
            submessage = header[1]
            if submessage == 0:
                inputs = 1
                self._skip = _QEMU_EXTENDED_KEY_EVENT_LENGTH - 2
            elif submessage == 1 and len(header) == 2:
                self._header_length = _QEMU_AUDIO_HEADER_LENGTH
                return 0
            elif submessage == 1:
                total = _QEMU_AUDIO_LENGTH.get(int.from_bytes(header[2:4], "big"))
                if total is None:
                    self._desynchronise(message_type)
                    return None
                self._skip = total - _QEMU_AUDIO_HEADER_LENGTH
            else:
                self._desynchronise(message_type)
                return None
        self._header = None
        return inputs

    def _desynchronise(self, message_type: int) -> None:
        self.desynchronised = True
        self.unknown_type = message_type
        self._header = None
