"""FrameReader: the fast-path WebSocket frame parser, fed bytes in any split."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpvm.proxy.wsframes import FrameReader, mask_frame, unmask

MAX = 70_000  # above 65535, so all three length encodings appear

payloads = st.one_of(
    st.binary(max_size=130),  # 7-bit lengths and the 125/126 border
    st.binary(min_size=126, max_size=1000),  # 16-bit lengths
    st.integers(min_value=65_536, max_value=MAX).map(lambda n: os.urandom(n)),  # 64-bit
)
masks = st.binary(min_size=4, max_size=4)
frames = st.lists(st.tuples(payloads, masks), max_size=6)


def _stream(items) -> bytes:
    return b"".join(mask_frame(p, m) for p, m in items)


def _split(data: bytes, draw_cuts) -> list[bytes]:
    cuts = sorted(set(draw_cuts))
    bounds = [0, *[c for c in cuts if 0 < c < len(data)], len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _feed_all(reader: FrameReader, pieces: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Payloads until a hand-off, and the pieces that were never fed."""
    out: list[bytes] = []
    for i, piece in enumerate(pieces):
        out += reader.feed(piece)
        if reader.handoff is not None:
            return out, pieces[i + 1 :]
    return out, []


@settings(max_examples=300, deadline=None)
@given(items=frames, data=st.data())
def test_any_split_gives_the_payloads_of_one_piece(items, data):
    stream = _stream(items)
    cuts = data.draw(st.lists(st.integers(0, max(len(stream), 1)), max_size=40))
    whole = FrameReader(MAX).feed(stream)
    got, rest = _feed_all(FrameReader(MAX), _split(stream, cuts))
    assert whole == got == [p for p, _ in items]
    assert rest == []


# The first byte of frames the fast path must not take (with the mask bit on).
NOT_FAST = st.sampled_from(
    [
        0x81,  # text
        0x02,  # binary, not final: the first fragment of a message
        0x80,  # continuation
        0x88,
        0x89,
        0x8A,  # close, ping, pong
        0x92,
        0xC2,  # binary with RSV bits (an extension nobody negotiated)
    ]
)


@st.composite
def bad_frames(draw) -> bytes:
    kind = draw(st.sampled_from(["opcode", "unmasked", "oversize"]))
    body = draw(st.binary(max_size=40))
    if kind == "opcode":
        return mask_frame(body, draw(masks), draw(NOT_FAST))
    if kind == "unmasked":
        return bytes((0x82, len(body))) + body
    size = draw(st.sampled_from([MAX + 1, 2**16 + MAX, 2**63 + 5]))
    header = bytes((0x82, 0x80 | 127)) + size.to_bytes(8, "big")
    return header + draw(masks) + body


@settings(max_examples=300, deadline=None)
@given(before=frames, bad=bad_frames(), after=frames, data=st.data())
def test_handoff_at_the_first_frame_off_the_fast_path(before, bad, after, data):
    head = _stream(before)
    stream = head + bad + _stream(after)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    reader = FrameReader(MAX)
    got, rest = _feed_all(reader, _split(stream, cuts))
    assert got == [p for p, _ in before]
    assert reader.handoff is not None
    # Autobahn gets exactly the bytes from the odd frame's first byte on, none twice.
    assert reader.handoff + b"".join(rest) == stream[len(head) :]
    with pytest.raises(RuntimeError):
        reader.feed(b"\x82\x80")


def test_incomplete_frame_waits_and_keeps_its_bytes():
    frame = mask_frame(b"hello", b"\x01\x02\x03\x04")
    reader = FrameReader(100)
    assert reader.feed(frame[:-1]) == []
    assert reader.handoff is None
    assert reader.feed(frame[-1:] + frame) == [b"hello", b"hello"]


def test_a_frame_of_exactly_max_payload_is_fast_one_more_is_not():
    reader = FrameReader(300)
    assert reader.feed(mask_frame(b"x" * 300, b"abcd")) == [b"x" * 300]
    big = mask_frame(b"x" * 301, b"abcd")
    assert reader.feed(big[:4]) == []
    assert reader.handoff == big[:4]  # decided on the length, before the payload arrives


def test_cost_is_linear_in_small_reads():
    # One 4 MiB frame in 1 KiB reads: the pending bytes are never re-copied per read, so
    # the reader's buffer is one object that only grows (no new buffer per read).
    payload = os.urandom(4 * 1024 * 1024)
    frame = mask_frame(payload, b"\x11\x22\x33\x44")
    reader = FrameReader(len(payload))
    reader.feed(frame[:1024])
    buffer = reader._buf
    for i in range(1024, len(frame) - 1024, 1024):
        assert reader.feed(frame[i : i + 1024]) == []
    assert reader._buf is buffer
    assert reader.feed(frame[i + 1024 :]) == [payload]


def test_unmask_round_trip():
    data = os.urandom(1001)
    assert unmask(unmask(data, b"\xff\x00\xaa\x55"), b"\xff\x00\xaa\x55") == data
    assert unmask(b"", b"abcd") == b""


def test_max_payload_must_be_positive():
    with pytest.raises(ValueError):
        FrameReader(0)
