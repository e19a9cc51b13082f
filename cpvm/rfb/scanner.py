"""The browser's messages after the handshake: input events, for idle timeouts, and the
pixel format the browser asked for, for recordings."""

from __future__ import annotations

from cpvm.rfb.messages import SET_PIXEL_FORMAT, ClientMessageFramer

_SET_PIXEL_FORMAT_LENGTH = 20  # type, 3 padding, the 16-byte pixel format


class ClientInputScanner:
    """Counts user input events in the browser's message stream after the handshake.

    Feed every chunk the browser sends to :meth:`feed`; it returns how many input events
    (KeyEvent, PointerEvent, QEMU extended KeyEvent, ClientCutText, gii events) started in
    it, so the idle timeout can ignore automatic traffic such as FramebufferUpdateRequest.
    Message boundaries come from :class:`~cpvm.rfb.messages.ClientMessageFramer`, the same
    framing the view-only filter uses. On a message type it cannot size it cannot find the
    next boundary: it stops and sets :attr:`desynchronised`, after which the caller should
    count any bytes as activity. It also keeps the browser's latest SetPixelFormat in
    :attr:`pixel_format`.

    Work is O(bytes) with no buffering of message bodies: payloads (notably clipboard text)
    are skipped by counting.
    """

    __slots__ = ("_framer", "_pixel_message", "pixel_format")

    def __init__(self) -> None:
        self._framer = ClientMessageFramer()
        #: The pixel format of the browser's latest SetPixelFormat (16 bytes), if any: the
        #: format the server encodes its updates in from then on.
        self.pixel_format: bytes | None = None
        self._pixel_message: bytearray | None = None  # a SetPixelFormat coming in

    @property
    def desynchronised(self) -> bool:
        """True once an unknown message type was seen; :meth:`feed` then returns 0."""
        return self._framer.failed

    @property
    def unknown_type(self) -> int | None:
        """The unknown message type that desynchronised the scanner, for logs."""
        return self._framer.unknown_type

    @property
    def at_boundary(self) -> bool:
        """True when everything fed so far ends exactly at a message boundary."""
        return self._framer.at_boundary

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Scan the next chunk of the browser's stream; return the number of input events."""
        inputs = 0
        for fragment in self._framer.feed(data):
            if fragment.head is SET_PIXEL_FORMAT:
                self._pixel_format_part(fragment.data, fragment.start)
            elif fragment.start and fragment.head.user_input:
                inputs += 1
        return inputs

    def _pixel_format_part(self, data: bytes | bytearray | memoryview, start: bool) -> None:
        message = self._pixel_message = (
            bytearray(data) if start else (self._pixel_message or bytearray()) + data
        )
        if len(message) >= _SET_PIXEL_FORMAT_LENGTH:
            self.pixel_format = bytes(message[4:_SET_PIXEL_FORMAT_LENGTH])
            self._pixel_message = None
