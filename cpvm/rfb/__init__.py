"""RFB (VNC) protocol logic as sans-IO state machines.

cpvm sits between a browser (noVNC) and a hypervisor's VNC server. It performs the RFB
handshake on both sides itself, so that the VNC password and any TLS towards the hypervisor
stay inside cpvm, and then relays the message streams unchanged:

- :class:`RfbClientHandshake` talks to the real VNC server (QEMU, TigerVNC) as a client.
- :class:`RfbServerHandshake` talks to the browser as a server offering security type None.
- :class:`ClientInputScanner` watches the browser's messages after the handshake to tell user
  input (keys, pointer, clipboard) from automatic traffic, for idle timeouts.
- :class:`ViewOnlyFilter` passes a view-only console's screen traffic and drops its input.
  Both frame the browser's stream with one sizing table (``messages``).

The machines do no I/O: they are fed the bytes that arrived and return events telling the
caller what to send or do. Bytes may arrive in any chunking, down to one byte at a time.
Nothing here imports Twisted; the protocols in other modules are thin adapters.

Modules: ``events`` (constants, events, ServerInit), ``machine`` (what both handshakes
share), ``client`` (towards the VNC server) with ``security`` (which security type it
takes), ``server`` (towards the browser), ``messages`` (how long each browser message is,
what it does), ``scanner`` (input events for the idle timer), ``viewonly`` (the view-only
filter), ``vncauth`` (the DES response).
"""

from __future__ import annotations

from cpvm.rfb.client import RfbClientHandshake

# Security types and VeNCrypt subtypes (RFC 6143 7.2, the IANA registry).
from cpvm.rfb.events import (
    MAX_FAILURE_MESSAGE,
    MAX_NAME_LENGTH,
    MAX_REASON_LENGTH,
    SEC_INVALID,
    SEC_NONE,
    SEC_VENCRYPT,
    SEC_VNC_AUTH,
    VENCRYPT_TLS_NONE,
    VENCRYPT_TLS_VNC,
    VENCRYPT_X509_NONE,
    VENCRYPT_X509_VNC,
    ClientInitReceived,
    ClientVersionReceived,
    Event,
    Failed,
    FailureKind,
    SecurityComplete,
    Send,
    ServerInit,
    ServerInitReceived,
    StartTLS,
)
from cpvm.rfb.scanner import ClientInputScanner
from cpvm.rfb.security import SecurityPolicy
from cpvm.rfb.server import RfbServerHandshake
from cpvm.rfb.viewonly import ViewOnlyFilter

__all__ = [
    "ClientInitReceived",
    "ClientInputScanner",
    "ClientVersionReceived",
    "Event",
    "Failed",
    "FailureKind",
    "MAX_FAILURE_MESSAGE",
    "MAX_NAME_LENGTH",
    "MAX_REASON_LENGTH",
    "RfbClientHandshake",
    "RfbServerHandshake",
    "SecurityComplete",
    "SecurityPolicy",
    "Send",
    "ServerInit",
    "ServerInitReceived",
    "StartTLS",
    "SEC_INVALID",
    "SEC_NONE",
    "SEC_VENCRYPT",
    "SEC_VNC_AUTH",
    "VENCRYPT_TLS_NONE",
    "VENCRYPT_TLS_VNC",
    "VENCRYPT_X509_NONE",
    "VENCRYPT_X509_VNC",
    "ViewOnlyFilter",
]
