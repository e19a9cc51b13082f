"""What both handshakes share: reason formatting, version checks, the byte-fed machine."""

from __future__ import annotations

from collections.abc import Callable

from cpvm.rfb.events import (
    _MAX_REASON_IN_MESSAGE,
    _SECURITY_NAMES,
    _U32,
    _VERSION_LENGTH,
    _VERSION_RE,
    _VERSION_TEMPLATE,
    MAX_FAILURE_MESSAGE,
    MAX_REASON_LENGTH,
    Event,
    Failed,
    FailureKind,
)


def _security_name(code: int) -> str:
    return _SECURITY_NAMES.get(code, "unknown")


def _format_reason(raw: bytes) -> str:
    """A peer's reason string made safe and short for a log line."""
    text = raw.decode("utf-8", errors="replace")
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    if len(text) > _MAX_REASON_IN_MESSAGE:
        text = text[:_MAX_REASON_IN_MESSAGE] + "..."
    return repr(text)


def _version_prefix_ok(buf: bytearray) -> bool:
    """True while the bytes so far could still be the start of ``RFB xxx.yyy\\n``."""
    for index in range(min(len(buf), _VERSION_LENGTH)):
        if buf[index] not in _VERSION_TEMPLATE[index]:
            return False
    return True


class _Machine:
    """Input buffering and the step loop common to both handshakes.

    Each state is a method that looks at ``_buf``; it returns False when it needs more
    bytes, True when it consumed some (or changed state) and the loop should go on.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._step: Callable[[list[Event]], bool] = self._step_not_started
        self._dead = False

    @property
    def failed(self) -> bool:
        """True once a :class:`Failed` event was emitted."""
        return self._dead

    @property
    def phase(self) -> str:
        """What the machine is waiting for, e.g. to explain a connection that closed."""
        return self._step.__name__.removeprefix("_step_").replace("_", " ")

    def _step_not_started(self, events: list[Event]) -> bool:
        return False

    def _run(self, events: list[Event]) -> list[Event]:
        while not self._dead and self._step(events):
            pass
        return events

    def _fail(self, events: list[Event], kind: FailureKind, message: str) -> bool:
        self._dead = True
        self._buf.clear()
        if len(message) > MAX_FAILURE_MESSAGE:
            message = message[: MAX_FAILURE_MESSAGE - 3] + "..."
        events.append(Failed(kind, message))
        return False

    def _take_version(self, events: list[Event], peer: str) -> tuple[bytes, int, int] | None:
        """The peer's ``RFB xxx.yyy\\n`` once complete; None while waiting or after failing."""
        if not _version_prefix_ok(self._buf):
            self._fail(
                events,
                "protocol",
                f"{peer} did not send an RFB version: {bytes(self._buf[:_VERSION_LENGTH])!r}",
            )
            return None
        if len(self._buf) < _VERSION_LENGTH:
            return None
        raw = self._take(_VERSION_LENGTH)
        match = _VERSION_RE.match(raw)
        assert match is not None  # guaranteed by the template check
        return raw, int(match[1]), int(match[2])

    def _take(self, count: int) -> bytes:
        data = bytes(self._buf[:count])
        del self._buf[:count]
        return data

    def _take_u32(self) -> int:
        value: int = _U32.unpack_from(self._buf)[0]
        del self._buf[:4]
        return value

    def _take_reason(self, events: list[Event]) -> bytes | None:
        """Take a u32-length-prefixed reason string, or None if incomplete or too long.

        On a too-long length the machine has failed (check ``_dead``).
        """
        if len(self._buf) < 4:
            return None
        length: int = _U32.unpack_from(self._buf)[0]
        if length > MAX_REASON_LENGTH:
            self._fail(
                events,
                "protocol",
                f"peer sent a {length}-byte reason string (limit {MAX_REASON_LENGTH})",
            )
            return None
        if len(self._buf) < 4 + length:
            return None
        reason = bytes(self._buf[4 : 4 + length])
        del self._buf[: 4 + length]
        return reason
