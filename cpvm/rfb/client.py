"""The RFB client handshake: cpvm to the VNC server (security, VNC auth, VeNCrypt).

Which security type to take is :class:`cpvm.rfb.security.SecurityPolicy`'s choice; this
module is the state machine that reads and writes the bytes around it.
"""

from __future__ import annotations

import struct

from cpvm.rfb.events import (
    _NEEDS_PASSWORD,
    _SERVER_INIT_HEADER,
    _U32,
    _VENCRYPT_ANONYMOUS_SUBTYPES,
    _VENCRYPT_TLS_SUBTYPES,
    MAX_NAME_LENGTH,
    SEC_INVALID,
    SEC_NONE,
    SEC_VNC_AUTH,
    Event,
    FailureKind,
    SecurityComplete,
    Send,
    ServerInit,
    ServerInitReceived,
    StartTLS,
)
from cpvm.rfb.machine import _format_reason, _Machine, _security_name
from cpvm.rfb.security import SecurityPolicy
from cpvm.rfb.vncauth import CHALLENGE_LENGTH, vnc_auth_response


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
        self._password = password
        # Without a CA to verify the server's certificate, X509 subtypes cannot succeed:
        # prefer whatever else the server offers. The manager may demand VeNCrypt TLS for a
        # VM: then plain VncAuth/None are refused even when offered, so a downgrade by a man
        # in the middle fails loudly.
        self._policy = SecurityPolicy(
            has_password=password is not None,
            allow_anonymous_tls=allow_anonymous_tls,
            allow_none=allow_none,
            require_tls=require_tls,
            allow_x509=allow_x509,
        )
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
        if self._policy.require_tls:
            return self._fail(
                events,
                "unsupported-security",
                f"server (RFB 3.3) imposes security type {sec_type} but TLS is required",
            )
        if sec_type == SEC_NONE and self._policy.allow_none:
            self.security_type = SEC_NONE
            # No SecurityResult after None before 3.8.
            return self._security_complete(events)
        if sec_type == SEC_VNC_AUTH and self._password is not None:
            self.security_type = SEC_VNC_AUTH
            self._step = self._step_vnc_auth_challenge
            return True
        return self._fail(
            events, *self._policy.top_level_refusal([sec_type], "server (RFB 3.3) requires")
        )

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
        choice = self._policy.choose_top_level(offered)
        if choice is None:
            return self._fail(
                events, *self._policy.top_level_refusal(offered, "server offered security types")
            )
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
        choice = self._policy.choose_subtype(offered)
        if choice is None:
            return self._fail(events, *self._policy.subtype_refusal(offered))
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
