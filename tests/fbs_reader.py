"""An FBS 001.000 reader written from the format's description, not from cpvm's writer.

The format (as vncproxy, rfbproxy and TightVNC's player read it): the 12 bytes
``FBS 001.000\\n``; then, until the end of the file, blocks of a big-endian u32 length L,
L bytes of the server→client RFB stream padded with zeros to the next multiple of 4, and a
big-endian u32 timestamp in milliseconds. The stream starts at a viewer's byte 0: the
server's version, the security handshake, ServerInit.
"""

from __future__ import annotations

from dataclasses import dataclass


class FbsError(ValueError):
    """The bytes are not an FBS 001.000 file."""


@dataclass
class FbsBlock:
    timestamp_ms: int
    data: bytes


@dataclass
class FbsFile:
    blocks: list[FbsBlock]
    truncated: bool  # the file ends inside a block

    def stream(self) -> bytes:
        return b"".join(b.data for b in self.blocks)


def read_fbs(raw: bytes) -> FbsFile:
    if raw[:12] != b"FBS 001.000\n":
        raise FbsError(f"bad header {raw[:12]!r}")
    blocks = []
    i = 12
    while i < len(raw):
        if i + 4 > len(raw):
            return FbsFile(blocks, True)
        length = int.from_bytes(raw[i : i + 4], "big")
        padded = (length + 3) // 4 * 4
        end = i + 4 + padded + 4
        if end > len(raw):
            return FbsFile(blocks, True)
        data = raw[i + 4 : i + 4 + length]
        if any(raw[i + 4 + length : i + 4 + padded]):
            raise FbsError(f"non-zero padding in the block at {i}")
        timestamp = int.from_bytes(raw[end - 4 : end], "big")
        blocks.append(FbsBlock(timestamp, data))
        i = end
    return FbsFile(blocks, False)


@dataclass
class Handshake:
    version: bytes
    security: int
    width: int
    height: int
    pixel_format: bytes
    name: bytes
    rest: bytes  # the server's messages after ServerInit


def parse_handshake(stream: bytes) -> Handshake:
    """An RFB 3.3 server handshake (security chosen by the server, u32) and ServerInit."""
    version = stream[:12]
    if version[:4] != b"RFB " or version[11:12] != b"\n":
        raise FbsError(f"bad version {version!r}")
    security = int.from_bytes(stream[12:16], "big")
    if security != 1:
        raise FbsError(f"security type {security} (a player can only replay None)")
    width = int.from_bytes(stream[16:18], "big")
    height = int.from_bytes(stream[18:20], "big")
    pixel_format = stream[20:36]
    name_length = int.from_bytes(stream[36:40], "big")
    name = stream[40 : 40 + name_length]
    if len(name) != name_length:
        raise FbsError("ServerInit cut short")
    return Handshake(
        version, security, width, height, pixel_format, name, stream[40 + name_length :]
    )
