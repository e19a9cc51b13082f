"""RFB constants, the events the handshakes return, and ServerInit."""

from __future__ import annotations

import dataclasses
import re
import struct
from dataclasses import dataclass
from typing import Final, Literal

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
