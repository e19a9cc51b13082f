"""The browser's WebSocket frames on the fast path, sans-IO.

noVNC sends one final, masked, binary frame per RFB message. Those are parsed here, in a
few integer operations per frame; anything else (control frames, text, fragments, frames
over the size limit, unmasked frames) is handed to Autobahn, which knows the whole RFC 6455.

The cost is linear in the bytes fed: unparsed bytes sit in one ``bytearray`` that grows at
its end and is consumed from its front (both amortised O(1) per byte in CPython), so a
large frame arriving in small reads is never copied again per read. The old parser
joined the whole partial frame with every new read: one 4 MiB frame in 1 KiB reads cost
~4096 copies of up to 4 MiB.
"""

from __future__ import annotations

FAST_OPCODE_BYTE = 0x82  # FIN + opcode 2 (binary)
MASK_BIT = 0x80


class FrameReader:
    """Client→server WebSocket frames on the fast path (final, masked, binary, within
    max_payload)."""

    def __init__(self, max_payload: int) -> None:
        if max_payload < 1:
            raise ValueError("max_payload must be positive")
        self._max = max_payload
        self._buf = bytearray()  # bytes of the frame(s) not yet complete
        self.handoff: bytes | None = None

    def feed(self, data: bytes) -> list[bytes]:
        """Append data; return the unmasked payloads of every complete fast-path frame.

        When a frame is not fast-path (control, text, fragment, oversize, unmasked), stop
        there: ``self.handoff`` becomes the bytes from that frame's first byte on (the
        caller gives them, and everything after, to Autobahn) and feed must not be called
        again.
        """
        if self.handoff is not None:
            raise RuntimeError("FrameReader.feed after the hand-off to Autobahn")
        buf: bytes | bytearray
        if self._buf:
            self._buf += data
            buf = self._buf
        else:
            buf = data  # the common case: parse the read itself, keep only its tail
        payloads: list[bytes] = []
        pos = self._parse(buf, payloads)
        if self.handoff is not None:
            self._buf = bytearray()
        elif buf is self._buf:
            del self._buf[:pos]  # CPython moves the start pointer: no copy of the rest
        elif pos < len(buf):
            self._buf = bytearray(memoryview(buf)[pos:])
        return payloads

    def _parse(self, buf: bytes | bytearray, payloads: list[bytes]) -> int:
        """Collect complete fast-path frames from ``buf``; return where parsing stopped."""
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 != FAST_OPCODE_BYTE or not b1 & MASK_BIT:
                self.handoff = bytes(buf[pos:])
                return end
            length = b1 & 0x7F
            head = 6
            if length == 126:
                head = 8
                if end - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
            elif length == 127:
                head = 14
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if length > self._max:
                self.handoff = bytes(buf[pos:])
                return end
            if end - pos < head + length:
                break
            start = pos + head
            pos = start + length
            payloads.append(unmask(buf[start:pos], buf[start - 4 : start]))
        return pos


def unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR a client frame's payload with its 4-byte mask, as one big-integer operation."""
    n = len(payload)
    if not n:
        return b""
    key = bytes(mask) * (n // 4 + 1)
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key[:n], "little")).to_bytes(
        n, "little"
    )


def mask_frame(payload: bytes, mask: bytes, first_byte: int = FAST_OPCODE_BYTE) -> bytes:
    """A masked client frame (for tests and fuzzing: what a browser would send)."""
    n = len(payload)
    if n < 126:
        header = bytes((first_byte, MASK_BIT | n))
    elif n < 65536:
        header = bytes((first_byte, MASK_BIT | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first_byte, MASK_BIT | 127)) + n.to_bytes(8, "big")
    return header + mask + unmask(payload, mask)
