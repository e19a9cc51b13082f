"""The browser's RFB messages after the handshake: where each ends and what it does.

One sizing table for every reader of the browser's stream: the idle timer's input scanner
(:mod:`cpvm.rfb.scanner`) and the view-only filter (:mod:`cpvm.rfb.viewonly`) both frame the
stream with :class:`ClientMessageFramer`, so they cannot disagree on a message boundary.

The lengths follow RFC 6143 and the community extensions (rfbproto): SetPixelFormat,
SetEncodings, FramebufferUpdateRequest, KeyEvent, PointerEvent (one byte longer when
ExtendedMouseButtons is in use), ClientCutText (with the Extended Clipboard's negative
length), EnableContinuousUpdates, ClientFence, xvp, SetDesktopSize, gii and QEMU's client
message (extended key event, audio). Any other type cannot be sized, so the stream's next
boundary is unknown: the framer stops there and says so (:attr:`ClientMessageFramer.failed`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from typing import Final, NamedTuple

# The ExtendedMouseButtons pseudo-encoding (rfbproto): once the client lists it in
# SetEncodings, a PointerEvent whose button-mask has bit 7 set carries one more byte.
EXTENDED_MOUSE_BUTTONS: Final = -316
_EXTENDED_MOUSE_BUTTONS_BYTES: Final = struct.pack(">i", EXTENDED_MOUSE_BUTTONS)


class Role(Enum):
    """What a client message does to the VM, which decides whether a viewer may send it."""

    VIEW = "view"  # asks for or shapes the screen (or audio) this client receives
    INPUT = "input"  # a person acting on the VM: keys, pointer, clipboard, desktop size
    POWER = "power"  # xvp: shut down, reboot or reset the VM


@dataclass(frozen=True)
class MessageHead:
    """A client message's kind, known once enough of its header has arrived."""

    message_type: int
    name: str
    role: Role
    #: The person did something (for the idle timer); automatic traffic is False.
    user_input: bool


SET_PIXEL_FORMAT: Final = MessageHead(0, "SetPixelFormat", Role.VIEW, False)
SET_ENCODINGS: Final = MessageHead(2, "SetEncodings", Role.VIEW, False)
FRAMEBUFFER_UPDATE_REQUEST: Final = MessageHead(3, "FramebufferUpdateRequest", Role.VIEW, False)
KEY_EVENT: Final = MessageHead(4, "KeyEvent", Role.INPUT, True)
POINTER_EVENT: Final = MessageHead(5, "PointerEvent", Role.INPUT, True)
CLIENT_CUT_TEXT: Final = MessageHead(6, "ClientCutText", Role.INPUT, True)
# The Extended Clipboard's capabilities: sent by the browser on its own, not a copy.
CLIPBOARD_CAPS: Final = MessageHead(6, "ClientCutText (clipboard caps)", Role.INPUT, False)
ENABLE_CONTINUOUS_UPDATES: Final = MessageHead(150, "EnableContinuousUpdates", Role.VIEW, False)
CLIENT_FENCE: Final = MessageHead(248, "ClientFence", Role.VIEW, False)
XVP: Final = MessageHead(250, "xvp", Role.POWER, False)
SET_DESKTOP_SIZE: Final = MessageHead(251, "SetDesktopSize", Role.INPUT, False)
GII_EVENTS: Final = MessageHead(253, "gii (events)", Role.INPUT, True)
GII_SETUP: Final = MessageHead(253, "gii (version, devices)", Role.INPUT, False)
QEMU_EXTENDED_KEY_EVENT: Final = MessageHead(255, "QEMU extended key event", Role.INPUT, True)
QEMU_AUDIO: Final = MessageHead(255, "QEMU audio", Role.VIEW, False)

# Messages whose type alone gives their total length.
_FIXED: Final[dict[int, tuple[int, MessageHead]]] = {
    0: (20, SET_PIXEL_FORMAT),
    3: (10, FRAMEBUFFER_UPDATE_REQUEST),
    4: (8, KEY_EVENT),
    150: (10, ENABLE_CONTINUOUS_UPDATES),
    250: (4, XVP),
}
_QEMU_AUDIO_LENGTH: Final = {0: 4, 1: 4, 2: 10}  # by operation: enable, disable, set format
_CLIPBOARD_CAPS_FLAG: Final = 0x01  # bit 24 of the Extended Clipboard flags, in their first byte
_POINTER_EXTENDED_MARKER: Final = 0x80


def measure(
    header: bytes | bytearray, extended_pointer: bool = False
) -> tuple[int, MessageHead | None]:
    """Size the client message that starts with ``header`` (at least its type byte).

    Returns ``(total length, head)`` once ``header`` says enough; ``(n, None)`` when the
    first ``n`` bytes (more than ``header`` holds) are needed first; ``(0, None)`` when the
    message cannot be sized at all. ``extended_pointer`` says whether the browser has
    listed ExtendedMouseButtons in a SetEncodings.
    """
    kind = header[0]
    have = len(header)
    fixed = _FIXED.get(kind)
    if fixed is not None:
        return fixed
    if kind == 5:
        if not extended_pointer:
            return 6, POINTER_EVENT
        if have < 2:
            return 2, None
        return (7 if header[1] & _POINTER_EXTENDED_MARKER else 6), POINTER_EVENT
    if kind == 2:
        if have < 4:
            return 4, None
        return 4 + 4 * int.from_bytes(header[2:4], "big"), SET_ENCODINGS
    if kind == 6:
        return _measure_cut_text(header)
    if kind == 248:
        return (9, None) if have < 9 else (9 + header[8], CLIENT_FENCE)
    if kind == 251:
        return (8, None) if have < 8 else (8 + 16 * header[6], SET_DESKTOP_SIZE)
    if kind == 253:
        if have < 4:
            return 4, None
        # The subtype's top bit says the message's byte order.
        length = header[2:4]
        size = (
            int.from_bytes(length, "big") if header[1] & 0x80 else int.from_bytes(length, "little")
        )
        head = GII_EVENTS if header[1] & 0x7F == 0 else GII_SETUP
        return 4 + size, head
    if kind == 255:
        return _measure_qemu(header)
    return 0, None


def _measure_cut_text(header: bytes | bytearray) -> tuple[int, MessageHead | None]:
    if len(header) < 8:
        return 8, None
    length = int.from_bytes(header[4:8], "big", signed=True)
    if length >= 0:
        return 8 + length, CLIENT_CUT_TEXT
    # Extended Clipboard: -length bytes follow, starting with the flags; peek at them to
    # tell the automatic capabilities from a copy.
    if len(header) < 9:
        return 9, None
    head = CLIPBOARD_CAPS if header[8] & _CLIPBOARD_CAPS_FLAG else CLIENT_CUT_TEXT
    return 8 - length, head


def _measure_qemu(header: bytes | bytearray) -> tuple[int, MessageHead | None]:
    if len(header) < 2:
        return 2, None
    submessage = header[1]
    if submessage == 0:
        return 12, QEMU_EXTENDED_KEY_EVENT
    if submessage != 1:
        return 0, None
    if len(header) < 4:
        return 4, None
    total = _QEMU_AUDIO_LENGTH.get(int.from_bytes(header[2:4], "big"))
    return (total, QEMU_AUDIO) if total is not None else (0, None)


class Fragment(NamedTuple):
    """A run of one message's bytes, as found in one chunk of the stream."""

    head: MessageHead
    data: bytes | bytearray | memoryview
    #: True for the fragment that holds the message's header (its first bytes).
    start: bool


class ClientMessageFramer:
    """Cuts the browser's message stream into messages, in any chunking.

    :meth:`feed` returns the chunk as :class:`Fragment` runs, each tagged with its message's
    :class:`MessageHead`. A header split across chunks is held back (at most 9 bytes) until
    it is complete, so a message's head is always known before any of its bytes are handed
    on; bodies (clipboard text) are never buffered. On a type it cannot size the framer
    stops for good: :attr:`failed` is set and the rest of the stream is not framed.
    """

    __slots__ = (
        "_encodings",
        "_head",
        "_header",
        "_remaining",
        "extended_pointer",
        "failed",
        "unknown_type",
    )

    def __init__(self) -> None:
        #: True once a type could not be sized; :meth:`feed` then returns nothing.
        self.failed = False
        #: The type that could not be sized, for logs.
        self.unknown_type: int | None = None
        #: True once the browser listed ExtendedMouseButtons (PointerEvent may grow a byte).
        self.extended_pointer = False
        self._header = bytearray()  # the current message's header, while incomplete
        self._head: MessageHead | None = None  # the current message, once its header is in
        self._remaining = 0  # bytes of the current message's body still to come
        self._encodings: bytearray | None = None  # a SetEncodings body's partial entry

    @property
    def at_boundary(self) -> bool:
        """True when everything fed so far ends exactly at a message boundary."""
        return not self._remaining and not self._header

    def feed(self, data: bytes | bytearray | memoryview) -> list[Fragment]:
        """Frame the next chunk of the stream."""
        out: list[Fragment] = []
        view = memoryview(data)
        end = len(view)
        position = 0
        while position < end and not self.failed:
            if self._remaining:
                step = min(self._remaining, end - position)
                body = view[position : position + step]
                if self._encodings is not None:
                    self._scan_encodings(body)
                assert self._head is not None
                out.append(Fragment(self._head, body, False))
                self._remaining -= step
                position += step
                continue
            position = self._read_header(view, position, out)
        return out

    def _read_header(self, view: memoryview, position: int, out: list[Fragment]) -> int:
        """Take header bytes from ``view`` at ``position``; return the new position."""
        header = self._header
        carried = len(header) > 0  # part of the header came in an earlier chunk
        start = position
        end = len(view)
        while True:
            if not header:
                header.append(view[position])
                position += 1
            total, head = measure(header, self.extended_pointer)
            if head is not None:
                break
            if total == 0:
                self.failed = True
                self.unknown_type = header[0]
                header.clear()
                return end
            step = min(total - len(header), end - position)
            header += view[position : position + step]
            position += step
            if len(header) < total:
                return position  # the rest of the header is in a later chunk
        data: bytes | memoryview = bytes(header) if carried else view[start:position]
        out.append(Fragment(head, data, True))
        self._head = head
        self._remaining = total - len(header)
        self._encodings = bytearray() if head is SET_ENCODINGS else None
        header.clear()
        return position

    def _scan_encodings(self, body: memoryview) -> None:
        entries = self._encodings
        assert entries is not None
        entries += body
        whole = len(entries) - len(entries) % 4
        for offset in range(0, whole, 4):
            if entries[offset : offset + 4] == _EXTENDED_MOUSE_BUTTONS_BYTES:
                # The server may confirm it from now on, and then the browser may send
                # the longer PointerEvent; servers keep it on once asked (rfbproto).
                self.extended_pointer = True
        del entries[:whole]
