"""The browser's messages after the handshake: input events, for idle timeouts, and the
pixel format the browser asked for, for recordings."""

from __future__ import annotations

from typing import Final

# Client-to-server messages of a fixed total length, by message type.
_FIXED_LENGTH: Final = {
    3: 10,  # FramebufferUpdateRequest
    4: 8,  # KeyEvent
    5: 6,  # PointerEvent
    150: 10,  # EnableContinuousUpdates
    250: 4,  # xvp
}
# Fixed-length messages that are user input.
_FIXED_INPUT: Final = frozenset({4, 5})
# Messages whose length depends on their header: type -> bytes of header needed first.
_HEADER_LENGTH: Final = {
    0: 20,  # SetPixelFormat: type, 3 pad, the 16-byte pixel format (kept: pixel_format)
    2: 4,  # SetEncodings: type, pad, u16 count; then 4 bytes per encoding
    6: 8,  # ClientCutText: type, 3 pad, s32 length; then the text
    248: 9,  # ClientFence: type, 3 pad, u32 flags, u8 length; then the payload
    251: 8,  # SetDesktopSize: type, pad, u16 w, u16 h, u8 screens, pad; then 16 per screen
    255: 2,  # QEMU: type, submessage type; the rest depends on the submessage
}
_QEMU_EXTENDED_KEY_EVENT_LENGTH: Final = 12
_QEMU_AUDIO_HEADER_LENGTH: Final = 4
_QEMU_AUDIO_LENGTH: Final = {0: 4, 1: 4, 2: 10}  # enable, disable, set format
# Extended clipboard: a negative ClientCutText length; the flags' top byte says what it is.
_CLIPBOARD_CAPS_FLAG: Final = 0x01  # bit 24 of the flags, in their first byte


class ClientInputScanner:
    """Counts user input events in the browser's message stream after the handshake.

    Feed every chunk the browser sends to :meth:`feed`; it returns how many input events
    (KeyEvent, PointerEvent, QEMU extended KeyEvent, ClientCutText) started in it, so the
    idle timeout can ignore automatic traffic such as FramebufferUpdateRequest. On a
    message type it does not know it cannot find the next message boundary: it stops and
    sets :attr:`desynchronised`, after which the caller should count any bytes as activity.
    It also keeps the browser's latest SetPixelFormat in :attr:`pixel_format`.

    Work is O(bytes) with no buffering of message bodies: payloads (notably clipboard text)
    are skipped by counting.
    """

    __slots__ = (
        "_header",
        "_header_length",
        "_skip",
        "desynchronised",
        "pixel_format",
        "unknown_type",
    )

    def __init__(self) -> None:
        #: True once an unknown message type was seen; :meth:`feed` then returns 0.
        self.desynchronised = False
        #: The unknown message type that desynchronised the scanner, for logs.
        self.unknown_type: int | None = None
        #: The pixel format of the browser's latest SetPixelFormat (16 bytes), if any: the
        #: format the server encodes its updates in from then on.
        self.pixel_format: bytes | None = None
        self._skip = 0  # bytes of the current message still to pass over
        self._header: bytearray | None = None  # header bytes of a variable-length message
        self._header_length = 0  # how many header bytes that message needs in all

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Scan the next chunk of the browser's stream; return the number of input events."""
        if self.desynchronised:
            return 0
        end = len(data)
        position = 0
        inputs = 0
        while position < end:
            if self._skip:
                step = min(self._skip, end - position)
                self._skip -= step
                position += step
                continue
            header = self._header
            if header is None:
                message_type = data[position]
                fixed = _FIXED_LENGTH.get(message_type)
                if fixed is not None:
                    if message_type in _FIXED_INPUT:
                        inputs += 1
                    self._skip = fixed - 1
                    position += 1
                    continue
                header_length = _HEADER_LENGTH.get(message_type)
                if header_length is None:
                    self.desynchronised = True
                    self.unknown_type = message_type
                    return inputs
                header = self._header = bytearray()
                self._header_length = header_length
            step = min(self._header_length - len(header), end - position)
            header += data[position : position + step]
            position += step
            if len(header) == self._header_length:
                counted = self._header_complete(header)
                if counted is None:
                    return inputs
                inputs += counted
        return inputs

    def _header_complete(self, header: bytearray) -> int | None:
        """Work out the rest of the message from its header.

        Returns the input events it counts for, or None when the scanner desynchronised.
        Sets either ``_skip`` (and clears the header) or a longer ``_header_length``.
        """
        message_type = header[0]
        inputs = 0
        if message_type == 0:
            self.pixel_format = bytes(header[4:20])
        elif message_type == 2:
            self._skip = 4 * int.from_bytes(header[2:4], "big")
        elif message_type == 6:
            length = int.from_bytes(header[4:8], "big", signed=True)
            if length >= 0:
                inputs = 1
                self._skip = length
            elif len(header) == 8:
                # Extended clipboard: peek at the flags to leave out the automatic caps.
                self._header_length = 9
                return 0
            else:
                inputs = 0 if header[8] & _CLIPBOARD_CAPS_FLAG else 1
                self._skip = -length - 1
        elif message_type == 248:
            self._skip = header[8]
        elif message_type == 251:
            self._skip = 16 * header[6]
        else:  # 255, QEMU
            submessage = header[1]
            if submessage == 0:
                inputs = 1
                self._skip = _QEMU_EXTENDED_KEY_EVENT_LENGTH - 2
            elif submessage == 1 and len(header) == 2:
                self._header_length = _QEMU_AUDIO_HEADER_LENGTH
                return 0
            elif submessage == 1:
                total = _QEMU_AUDIO_LENGTH.get(int.from_bytes(header[2:4], "big"))
                if total is None:
                    self._desynchronise(message_type)
                    return None
                self._skip = total - _QEMU_AUDIO_HEADER_LENGTH
            else:
                self._desynchronise(message_type)
                return None
        self._header = None
        return inputs

    def _desynchronise(self, message_type: int) -> None:
        self.desynchronised = True
        self.unknown_type = message_type
        self._header = None
