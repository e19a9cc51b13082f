"""The FBS 001.000 format, sans-IO: what bytes a recording file holds.

An FBS file is the 12-byte header ``FBS 001.000\\n`` followed by blocks: a u32 big-endian
length, that many bytes of the server→client RFB stream, zero padding to a multiple of 4,
and a u32 big-endian timestamp in milliseconds since the recording started. Concatenated,
the blocks' data is the stream a viewer would have received from the start: so that any
FBS player can start at byte 0, the first block is a synthetic handshake — ``RFB 003.003``,
security type None (3.3 has no SecurityResult), and a ServerInit with the session's real
geometry, pixel format and desktop name — and the rest is the server's messages as relayed.

The encoder returns lists of byte pieces rather than one joined block so the relay's
chunks are never copied on the reactor thread: the writer hands the pieces to ``writev``.
"""

from __future__ import annotations

import struct
from typing import Final

from cpvm.rfb import ServerInit

FBS_HEADER: Final = b"FBS 001.000\n"
# What a viewer would have received before ServerInit from an RFB 3.3 server without
# authentication: the version, then the chosen security type as a u32 (1 = None).
SYNTHETIC_VERSION: Final = b"RFB 003.003\n"
SECURITY_NONE_33: Final = struct.pack(">I", 1)
# Timestamps are u32 milliseconds: a recording can last about 49 days.
MAX_TIMESTAMP_MS: Final = 0xFFFFFFFF

_U32: Final = struct.Struct(">I")
_PADDING: Final = (b"", b"\0\0\0", b"\0\0", b"\0")


def synthetic_handshake(server_init: ServerInit) -> bytes:
    """The server→client bytes of an RFB 3.3 handshake without security, ending in
    ``server_init``: what a player needs before the recorded messages make sense."""
    return SYNTHETIC_VERSION + SECURITY_NONE_33 + server_init.to_bytes()


def block(data: bytes | memoryview, timestamp_ms: int) -> list[bytes | memoryview]:
    """One FBS block for ``data`` as pieces: length, data, padding and timestamp."""
    if not 0 <= timestamp_ms <= MAX_TIMESTAMP_MS:
        raise ValueError(f"timestamp {timestamp_ms} ms out of the u32 range")
    n = len(data)
    return [_U32.pack(n), data, _PADDING[n % 4] + _U32.pack(timestamp_ms)]


def block_size(length: int) -> int:
    """How many file bytes a block of ``length`` data bytes takes."""
    return 8 + length + (-length) % 4


class FbsEncoder:
    """Turns a session's stream into FBS pieces with millisecond timestamps on one clock.

    ``origin`` is the clock reading (seconds) that is timestamp 0. Timestamps never go
    backwards, even if the clock does, and stop at the u32 limit. The first call of
    :meth:`start` returns the header and the synthetic handshake; later data goes through
    :meth:`data`. Empty chunks produce no block.
    """

    __slots__ = ("origin", "_last_ms", "started")

    def __init__(self, origin: float):
        #: The clock reading that is timestamp 0.
        self.origin = origin
        self._last_ms = 0
        self.started = False

    def elapsed_ms(self, now: float) -> int:
        """Milliseconds since the origin on this encoder's clock (monotonic, capped)."""
        ms = int((now - self.origin) * 1000)
        if ms > self._last_ms:
            self._last_ms = min(ms, MAX_TIMESTAMP_MS)
        return self._last_ms

    def start(self, server_init: ServerInit, now: float) -> list[bytes | memoryview]:
        """The file's header and the synthetic handshake, stamped ``now``."""
        if self.started:
            raise RuntimeError("start() called twice")
        self.started = True
        return [FBS_HEADER, *block(synthetic_handshake(server_init), self.elapsed_ms(now))]

    def header_only(self) -> list[bytes | memoryview]:
        """The file's header alone (for a side file whose stream needs no handshake)."""
        if self.started:
            raise RuntimeError("already started")
        self.started = True
        return [FBS_HEADER]

    def data(self, chunk: bytes | memoryview, now: float) -> list[bytes | memoryview]:
        """The block for one chunk of the stream, or nothing for an empty chunk."""
        if not self.started:
            raise RuntimeError("data() before start()")
        if not chunk:
            return []
        return block(chunk, self.elapsed_ms(now))
