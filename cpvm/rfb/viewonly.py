"""A view-only console: the browser's screen traffic reaches the VNC server, its input not."""

from __future__ import annotations

from cpvm.rfb.messages import ClientMessageFramer, Role


class ViewOnlyFilter:
    """Filters the browser's messages after the handshake for a view-only console.

    :meth:`feed` takes each chunk the browser sends and returns the bytes to write to the
    VNC server: whole messages that only ask for or shape the screen (SetPixelFormat,
    SetEncodings, FramebufferUpdateRequest, EnableContinuousUpdates, ClientFence, QEMU
    audio) pass unchanged; input (KeyEvent, PointerEvent, ClientCutText, SetDesktopSize,
    gii, QEMU extended key events) and power control (xvp) are dropped whole. The server
    therefore sees a stream of complete screen messages, which it frames as this filter
    does: their lengths depend on nothing a client negotiates.

    A type the framer cannot size hides the next boundary, so nothing after it can be
    judged: the filter fails closed, sets :attr:`failed` and passes nothing more; the
    caller ends the console. Bodies are never buffered (only headers split across chunks,
    at most 9 bytes).
    """

    __slots__ = ("_framer", "dropped")

    def __init__(self) -> None:
        self._framer = ClientMessageFramer()
        #: How many messages were dropped, by message name (for the end-of-session log).
        self.dropped: dict[str, int] = {}

    @property
    def failed(self) -> bool:
        """True once a message could not be sized; the console must end."""
        return self._framer.failed

    @property
    def unknown_type(self) -> int | None:
        """The message type that could not be sized, for logs."""
        return self._framer.unknown_type

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """Filter the next chunk of the browser's stream; return what the server may see."""
        passed: list[bytes | bytearray | memoryview] = []
        for fragment in self._framer.feed(data):
            head = fragment.head
            if head.role is Role.VIEW:
                passed.append(fragment.data)
            elif fragment.start:
                self.dropped[head.name] = self.dropped.get(head.name, 0) + 1
        return b"".join(passed)
