"""A hostile VNC server's input the fuzzer (tests/fuzz, target rfb_client) found: a
VeNCrypt server listing 255 unknown subtypes made cpvm log a ~5 KB failure line per
connection. Against a real cpvm process: the refusal still happens, every log line is short.
"""

from __future__ import annotations

import struct

import pytest_twisted
from twisted.internet import protocol

from tests.integration import scripted_vnc
from tests.integration.test_console_path import refused

# cpvm's log prefix and fields, plus a failure message of at most cpvm.rfb.MAX_FAILURE_MESSAGE.
MAX_LINE = 1500


class ManySubtypes(protocol.Protocol):
    """RFB 3.8 offering VeNCrypt, then 255 VeNCrypt subtypes nobody knows."""

    def connectionMade(self):  # noqa: N802
        self.factory.connections.append(self)
        self.received = b""
        self.transport.write(b"RFB 003.008\n")

    def dataReceived(self, data):  # noqa: N802
        before = len(self.received)
        self.received += data
        for at, answer in ((12, b"\x01\x13"), (13, b"\x00\x02")):
            if before < at <= len(self.received):
                self.transport.write(answer)
        if before < 15 <= len(self.received):  # the client's VeNCrypt version 0.2
            subtypes = b"".join(struct.pack(">I", 1_000_000_000 + i) for i in range(255))
            self.transport.write(b"\x00\xff" + subtypes)


@pytest_twisted.ensureDeferred
async def test_many_unknown_subtypes_make_a_short_log_line(cpvm, manager):
    port, factory, listening = scripted_vnc.listen(ManySubtypes)
    try:
        token, _ = manager.issue({"host": "127.0.0.1", "port": port})
        closed, reason = await refused(cpvm, token)
        assert closed.code >= 4000, closed
        assert factory.connections, "cpvm never reached the scripted server"
    finally:
        await listening.stopListening()
    lines = cpvm.log_text().splitlines()
    assert any("1000000000 (unknown)" in line for line in lines), "failure not logged"
    longest = max(lines, key=len)
    assert len(longest) <= MAX_LINE, f"{len(longest)} characters: {longest[:300]}"
