"""A blocking, minimal WebSocket client on a plain socket, for tests that must control
exactly how fast bytes are read (the kernel's receive buffer is the only buffer)."""

from __future__ import annotations

import base64
import os
import socket
import struct


class RawWebSocket:
    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        *,
        rcvbuf: int | None = None,
        timeout: float = 10,
        headers: dict[str, str] | None = None,
    ):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
                + "\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("closed during the upgrade")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.split(b"\r\n")[0].decode())
        self.response_head = head
        self._pending = b""  # raw bytes from the socket
        self._payload = b""  # message payload bytes not yet consumed

    def send(self, payload: bytes) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x82, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", 0x82, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x82, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self._pending) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self._pending += chunk
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

    def read_message_bytes(self, n: int) -> bytes:
        """Read ``n`` payload bytes from binary frames (server frames are unmasked)."""
        out, self._payload = self._payload, b""
        while len(out) < n:
            b0, b1 = self._read(2)
            length = b1 & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read(8))
            payload = self._read(length)
            if b0 & 0x0F == 0x8:
                raise ConnectionError(f"close frame {payload[:2].hex()} {payload[2:]!r}")
            out += payload
        self._payload = out[n:]
        return out[:n]

    def rfb_handshake(self) -> None:
        assert self.read_message_bytes(12) == b"RFB 003.008\n"
        self.send(b"RFB 003.008\n")
        assert self.read_message_bytes(2) == b"\x01\x01"
        self.send(b"\x01")
        assert self.read_message_bytes(4) == b"\x00\x00\x00\x00"
        self.send(b"\x01")
        head = self.read_message_bytes(24)
        (name_len,) = struct.unpack("!I", head[20:24])
        self.read_message_bytes(name_len)

    def recv_raw(self, n: int) -> int:
        """Consume up to ``n`` raw bytes of whatever arrived; returns how many."""
        taken = min(len(self._pending), n)
        self._pending = self._pending[taken:]
        if taken < n:
            try:
                taken += len(self.sock.recv(n - taken))
            except TimeoutError:
                pass
        return taken

    def close(self) -> None:
        self.sock.close()
