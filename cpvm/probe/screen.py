"""Sans-IO: the probe's requests after ServerInit and the reading of the first screen update.

The probe asks for raw encoding only, so the size of every rectangle follows from the
ServerInit's pixel format and nothing a server may send is of unknown length. Pixel data
is counted, never kept: a 4K screen is 33 MB of raw pixels.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cpvm.rfb.events import ServerInit

_RAW = 0
_UPDATE_HEADER = struct.Struct("!xH")  # after the type byte: padding, rectangle count
_RECT_HEADER = struct.Struct("!HHHHi")
_COLOUR_MAP_HEADER = struct.Struct("!xHH")
_CUT_TEXT_HEADER = struct.Struct("!xxxI")
#: A ServerCutText longer than this is not a screen update and not worth reading.
MAX_CUT_TEXT = 1 << 20


def requests(server_init: ServerInit) -> bytes:
    """SetEncodings (raw only) and a FramebufferUpdateRequest for the whole screen."""
    set_encodings = struct.pack("!BxHi", 2, 1, _RAW)
    full = struct.pack("!BBHHHH", 3, 0, 0, 0, server_init.width, server_init.height)
    return set_encodings + full


@dataclass(frozen=True)
class UpdateRead:
    """The first FramebufferUpdate is complete: ``rectangles`` of ``pixels`` in all."""

    rectangles: int
    pixels: int


class ScreenError(Exception):
    """The server's messages after ServerInit are not what RFB allows here."""


class FirstUpdateReader:
    """Feed the server's bytes after ServerInit; :meth:`receive` answers :class:`UpdateRead`
    once the first FramebufferUpdate is complete (None until then) and raises
    :class:`ScreenError` on a message the probe cannot read."""

    def __init__(self, server_init: ServerInit):
        bits = server_init.pixel_format[0]
        if bits not in (8, 16, 32):
            raise ScreenError(f"ServerInit pixel format has {bits} bits per pixel")
        self._bytes_per_pixel = bits // 8
        self._buf = bytearray()
        self._skip = 0  # pixel or text bytes still to pass over
        self._rects_left: int | None = None  # inside a FramebufferUpdate when not None
        self._rectangles = 0
        self._pixels = 0
        self._done = False

    def receive(self, data: bytes) -> UpdateRead | None:
        """Consume ``data``; the answer once the first update has been read whole."""
        if self._done:
            return None
        self._buf += data
        while self._step():
            if self._done:
                return UpdateRead(self._rectangles, self._pixels)
        return None

    def _step(self) -> bool:
        if self._skip:
            taken = min(self._skip, len(self._buf))
            del self._buf[:taken]
            self._skip -= taken
            if self._skip:
                return False
            if self._rects_left == 0:
                self._done = True
            return True
        if self._rects_left is not None:
            return self._rectangle()
        return self._message()

    def _message(self) -> bool:
        if not self._buf:
            return False
        kind = self._buf[0]
        if kind == 0:
            return self._update_header()
        if kind == 1:  # SetColourMapEntries
            return self._fixed(_COLOUR_MAP_HEADER, lambda _first, n: 6 * n)
        if kind == 2:  # Bell
            del self._buf[:1]
            return True
        if kind == 3:  # ServerCutText
            return self._fixed(_CUT_TEXT_HEADER, self._cut_text_length)
        raise ScreenError(f"server sent message type {kind} before the first screen update")

    def _fixed(self, header: struct.Struct, body_length) -> bool:
        if len(self._buf) < 1 + header.size:
            return False
        values = header.unpack_from(self._buf, 1)
        del self._buf[: 1 + header.size]
        self._skip = body_length(*values)
        return True

    @staticmethod
    def _cut_text_length(length: int) -> int:
        if length > MAX_CUT_TEXT:
            raise ScreenError(f"server sent {length} bytes of cut text")
        return length

    def _update_header(self) -> bool:
        if len(self._buf) < 1 + _UPDATE_HEADER.size:
            return False
        (count,) = _UPDATE_HEADER.unpack_from(self._buf, 1)
        del self._buf[: 1 + _UPDATE_HEADER.size]
        self._rects_left = count
        if count == 0:
            self._done = True
        return True

    def _rectangle(self) -> bool:
        if len(self._buf) < _RECT_HEADER.size:
            return False
        _x, _y, width, height, encoding = _RECT_HEADER.unpack_from(self._buf)
        del self._buf[: _RECT_HEADER.size]
        if encoding != _RAW:
            raise ScreenError(f"server used encoding {encoding}; the probe asked for raw only")
        assert self._rects_left is not None
        self._rects_left -= 1
        self._rectangles += 1
        self._pixels += width * height
        self._skip = width * height * self._bytes_per_pixel
        if not self._skip and self._rects_left == 0:
            self._done = True
        return True
