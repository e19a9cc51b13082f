"""Fuzz target for the WebSocket fast-path frame reader (``cpvm/proxy/wsframes.py``).

Written against its interface: ``FrameReader(max_payload)``, ``feed(data) -> list[bytes]``
(payloads of complete, final, masked binary frames), and ``handoff`` (None, or the bytes
from the first frame the fast path does not take, after which it is not fed again).

The reference decoder here reads RFC 6455 frames whole. Where the fast path may reasonably
go either way (an empty or over-long payload, a non-minimal length encoding) either answer
is accepted, but a payload it returns must be the right one and a handoff must start at a
frame boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from tests.fuzz.rfb_targets import chunks


@dataclass(frozen=True)
class Frame:
    """One frame of the input as the reference decoder reads it."""

    start: int
    end: int | None  # None: incomplete at the end of the input
    fast: bool | None  # True: must be taken; False: must be handed off; None: either
    payload: bytes | None


def _header(data: bytes, pos: int) -> tuple[int, int, bool, bool] | None:
    """(header length, payload length, minimal encoding, masked), or None if incomplete."""
    if len(data) - pos < 2:
        return None
    masked = bool(data[pos + 1] & 0x80)
    length = data[pos + 1] & 0x7F
    size = 2
    minimal = True
    if length == 126:
        if len(data) - pos < 4:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        size, minimal = 4, length >= 126
    elif length == 127:
        if len(data) - pos < 10:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 10], "big")
        size, minimal = 10, length > 0xFFFF and length < 2**63
    return size + (4 if masked else 0), length, minimal, masked


def reference_frames(data: bytes, max_payload: int) -> list[Frame]:
    """The frames at the start of ``data``, up to the first one the fast path must refuse."""
    frames, pos = [], 0
    while pos < len(data):
        first = data[pos]
        # FIN set, no RSV bits, opcode 2 (binary): anything else is not for the fast path.
        plain_binary = first == 0x82
        head = _header(data, pos)
        if not plain_binary and len(data) - pos < 2:
            frames.append(Frame(pos, None, None, None))  # may wait for the second byte
            break
        if not plain_binary or (head is not None and not head[3]):
            frames.append(Frame(pos, None, False, None))
            break
        if head is None:
            frames.append(Frame(pos, None, None, None))
            break
        size, length, minimal, _ = head
        if len(data) - pos < size:
            frames.append(Frame(pos, None, None, None))
            break
        if pos + size + length > len(data):
            frames.append(Frame(pos, None, None, None))  # when to hand off is the reader's call
            break
        mask = data[pos + size - 4 : pos + size]
        body = data[pos + size : pos + size + length]
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(body))
        # Over max_payload: never a fast-path payload. Empty or non-minimal: either way.
        fast = False if length > max_payload else None if (not minimal or not length) else True
        frames.append(Frame(pos, pos + size + length, fast, payload))
        pos += size + length
    return frames


def _run(pieces: list[bytes], max_payload: int, reader_class) -> tuple[list[bytes], bytes | None]:
    reader = reader_class(max_payload)
    payloads: list[bytes] = []
    for index, piece in enumerate(pieces):
        got = reader.feed(piece)
        assert isinstance(got, list) and all(isinstance(p, bytes) for p in got)
        payloads += got
        if reader.handoff is not None:
            return payloads, bytes(reader.handoff) + b"".join(pieces[index + 1 :])
    return payloads, reader.handoff


def ws_frames(data: bytes) -> None:
    """Any bytes from a browser, any chunking: the same payloads and handoff as the reference."""
    from cpvm.proxy.wsframes import FrameReader  # the fuzz runner skips this target without it

    if len(data) < 2:
        return
    max_payload = 1 + data[0] * 64
    stream = data[2:]
    whole = _run([stream], max_payload, FrameReader)
    split = _run(chunks(stream, data[1]), max_payload, FrameReader)
    assert whole == split, "the result depends on how the bytes arrived"
    payloads, handoff = whole
    frames = reference_frames(stream, max_payload)
    for index, frame in enumerate(frames):
        if index < len(payloads):
            assert frame.fast is not False, f"frame {index} should have been handed off"
            assert payloads[index] == frame.payload, f"frame {index}: wrong payload"
            continue
        # Not returned: either still incomplete at the end, or handed off from its start.
        assert len(payloads) == index, "payloads past a frame that was not returned"
        if handoff is not None:
            assert handoff == stream[frame.start :], "handoff not at a frame boundary"
        else:
            assert frame.end is None and frame.fast is not False, (
                f"frame {index} neither returned nor handed off"
            )
        break
    else:
        assert len(payloads) == len(frames) and handoff is None
