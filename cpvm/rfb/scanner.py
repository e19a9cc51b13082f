"""The browser's messages after the handshake: input events, for idle timeouts."""

from __future__ import annotations

from cpvm.rfb.messages import ClientMessageFramer


class ClientInputScanner:
    """Counts user input events in the browser's message stream after the handshake.

    Feed every chunk the browser sends to :meth:`feed`; it returns how many input events
    (KeyEvent, PointerEvent, QEMU extended KeyEvent, ClientCutText, gii events) started in
    it, so the idle timeout can ignore automatic traffic such as FramebufferUpdateRequest.
    Message boundaries come from :class:`~cpvm.rfb.messages.ClientMessageFramer`, the same
    framing the view-only filter uses. On a message type it cannot size it cannot find the
    next boundary: it stops and sets :attr:`desynchronised`, after which the caller should
    count any bytes as activity.

    Work is O(bytes) with no buffering of message bodies: payloads (notably clipboard text)
    are skipped by counting.
    """

    __slots__ = ("_framer",)

    def __init__(self) -> None:
        self._framer = ClientMessageFramer()

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
            if fragment.start and fragment.head.user_input:
                inputs += 1
        return inputs
