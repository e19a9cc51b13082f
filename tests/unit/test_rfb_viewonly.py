"""The browser's messages after the handshake: one framing (cpvm.rfb.messages) for the idle
timer's scanner and the view-only filter; byte vectors and property tests."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpvm.rfb import ClientInputScanner, ViewOnlyFilter
from cpvm.rfb.messages import ClientMessageFramer, Role, measure
from tests.fuzz.rfb_targets import chunks, reference_messages


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


PIXEL_FORMAT = bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])
SET_PIXEL_FORMAT = b"\x00\x00\x00\x00" + PIXEL_FORMAT
SET_ENCODINGS = b"\x02\x00\x00\x03" + struct.pack(">iii", 7, 0, -223)
# noVNC's list with ExtendedMouseButtons (-316) and QEMU extended keys (-258).
SET_ENCODINGS_EMB = b"\x02\x00\x00\x04" + struct.pack(">iiii", 7, -258, -316, 0)
FB_UPDATE_REQUEST = b"\x03\x01\x00\x00\x00\x00\x02\xd0\x01\x90"
KEY_EVENT = b"\x04\x01\x00\x00" + u32(0x61)
POINTER_EVENT = b"\x05\x01\x00\x10\x00\x20"
# Bit 7 set: the back button in a plain PointerEvent, the marker of an extended one.
POINTER_BIT7 = b"\x05\x81\x00\x10\x00\x20"
EXTENDED_POINTER = POINTER_BIT7 + b"\x02"
CUT_TEXT = b"\x06\x00\x00\x00" + u32(5) + b"hello"
EXT_CLIPBOARD_CAPS = b"\x06\x00\x00\x00" + struct.pack(">i", -8) + u32(0x0100_0001) + u32(1024)
EXT_CLIPBOARD_PROVIDE = b"\x06\x00\x00\x00" + struct.pack(">i", -7) + u32(0x1000_0001) + b"z\x00q"
CONTINUOUS_UPDATES = b"\x96\x01\x00\x00\x00\x00\x02\xd0\x01\x90"
FENCE = b"\xf8\x00\x00\x00" + u32(0x80000002) + b"\x03" + b"abc"
XVP_REBOOT = b"\xfa\x00\x01\x03"
SET_DESKTOP_SIZE = b"\xfb\x00\x04\x00\x03\x00\x01\x00" + u32(1) + b"\x00" * 8 + u32(0)
GII_VERSION_BIG = b"\xfd\x81\x00\x02\x00\x01"
GII_VERSION_LITTLE = b"\xfd\x01\x02\x00\x01\x00"
GII_EVENTS = b"\xfd\x00\x0c\x00" + b"\x0c\x0a\x00\x00" + bytes(8)  # a button press
QEMU_KEY = b"\xff\x00\x00\x01" + u32(0x22) + u32(0x28)  # '"' with the scancode of its key
QEMU_AUDIO_ENABLE = b"\xff\x01\x00\x00"
QEMU_AUDIO_FORMAT = b"\xff\x01\x00\x02" + b"\x03\x02" + u32(44100)

# name: (bytes, input for the idle timer, a viewer may send it)
MESSAGES = {
    "SetPixelFormat": (SET_PIXEL_FORMAT, False, True),
    "SetEncodings": (SET_ENCODINGS, False, True),
    "FramebufferUpdateRequest": (FB_UPDATE_REQUEST, False, True),
    "KeyEvent": (KEY_EVENT, True, False),
    "PointerEvent": (POINTER_EVENT, True, False),
    "PointerEvent back button": (POINTER_BIT7, True, False),
    "ClientCutText": (CUT_TEXT, True, False),
    "clipboard caps": (EXT_CLIPBOARD_CAPS, False, False),
    "clipboard provide": (EXT_CLIPBOARD_PROVIDE, True, False),
    "EnableContinuousUpdates": (CONTINUOUS_UPDATES, False, True),
    "ClientFence": (FENCE, False, True),
    "xvp": (XVP_REBOOT, False, False),
    "SetDesktopSize": (SET_DESKTOP_SIZE, False, False),
    "gii version big endian": (GII_VERSION_BIG, False, False),
    "gii version little endian": (GII_VERSION_LITTLE, False, False),
    "gii events": (GII_EVENTS, True, False),
    "QEMU extended key event": (QEMU_KEY, True, False),
    "QEMU audio enable": (QEMU_AUDIO_ENABLE, False, True),
    "QEMU audio format": (QEMU_AUDIO_FORMAT, False, True),
}
# Messages after which the browser may send extended PointerEvents.
AFTER_EMB = {
    "SetEncodings with ExtendedMouseButtons": (SET_ENCODINGS_EMB, False, True),
    "extended PointerEvent": (EXTENDED_POINTER, True, False),
    "PointerEvent": (POINTER_EVENT, True, False),
}


def frame(stream: bytes, framer: ClientMessageFramer | None = None) -> list[tuple[str, bytes]]:
    """Each message's name and bytes, reassembled from the framer's fragments."""
    framer = framer or ClientMessageFramer()
    out: list[tuple[str, bytes]] = []
    for fragment in framer.feed(stream):
        if fragment.start:
            out.append((fragment.head.name, bytes(fragment.data)))
        else:
            name, data = out[-1]
            out[-1] = (name, data + bytes(fragment.data))
    return out


@pytest.mark.parametrize("name", MESSAGES)
def test_each_message_is_framed_exactly(name):
    message = MESSAGES[name][0]
    framer = ClientMessageFramer()
    framed = frame(message + KEY_EVENT, framer)
    assert [data for _, data in framed] == [message, KEY_EVENT]
    assert framer.at_boundary and not framer.failed


@pytest.mark.parametrize("name", MESSAGES)
def test_each_message_byte_at_a_time(name):
    message = MESSAGES[name][0]
    framer = ClientMessageFramer()
    heads = [
        f.head for b in range(len(message)) for f in framer.feed(message[b : b + 1]) if f.start
    ]
    assert len(heads) == 1 and framer.at_boundary


def test_a_header_split_across_chunks_is_held_back_until_complete():
    framer = ClientMessageFramer()
    assert framer.feed(SET_ENCODINGS[:3]) == []  # the count is not in yet
    fragments = framer.feed(SET_ENCODINGS[3:])
    assert fragments[0].start and bytes(fragments[0].data) == SET_ENCODINGS[:4]
    assert b"".join(bytes(f.data) for f in fragments) == SET_ENCODINGS


def test_measure_says_how_much_header_it_needs():
    assert measure(b"\x02") == (4, None)
    assert measure(b"\x06\x00\x00\x00" + struct.pack(">i", -8)) == (9, None)
    assert measure(b"\xff") == (2, None)
    assert measure(b"\xff\x01") == (4, None)
    assert measure(b"\x05") == (6, measure(b"\x05")[1])
    assert measure(b"\x05", extended_pointer=True) == (2, None)
    assert measure(b"\x07") == (0, None)  # UltraVNC FileTransfer: not sizable


# -- ExtendedMouseButtons: the scanner's old blind spot --------------------------------


def test_extended_pointer_event_is_seven_bytes_once_the_browser_asked_for_it():
    stream = SET_ENCODINGS_EMB + EXTENDED_POINTER + POINTER_EVENT + KEY_EVENT
    framed = frame(stream)
    assert [data for _, data in framed] == [
        SET_ENCODINGS_EMB,
        EXTENDED_POINTER,
        POINTER_EVENT,
        KEY_EVENT,
    ]


def test_bit7_is_the_back_button_until_the_browser_asked_for_extended_buttons():
    assert [d for _, d in frame(POINTER_BIT7 + KEY_EVENT)] == [POINTER_BIT7, KEY_EVENT]


def test_extended_mouse_buttons_split_inside_the_encoding_list_is_still_seen():
    framer = ClientMessageFramer()
    for piece in chunks(SET_ENCODINGS_EMB, 3):
        framer.feed(piece)
    assert framer.extended_pointer
    assert [d for _, d in frame(EXTENDED_POINTER + KEY_EVENT, framer)] == [
        EXTENDED_POINTER,
        KEY_EVENT,
    ]


def test_scanner_counts_extended_pointer_events_without_losing_the_boundary():
    scanner = ClientInputScanner()
    stream = SET_ENCODINGS_EMB + (EXTENDED_POINTER + FB_UPDATE_REQUEST) * 3 + KEY_EVENT
    assert scanner.feed(stream) == 4
    assert not scanner.desynchronised and scanner.at_boundary


# -- the view-only filter --------------------------------------------------------------


@pytest.mark.parametrize("name", MESSAGES)
def test_view_only_passes_screen_traffic_and_drops_input(name):
    message, _, may_view = MESSAGES[name]
    viewer = ViewOnlyFilter()
    out = viewer.feed(FB_UPDATE_REQUEST + message + FB_UPDATE_REQUEST)
    assert out == FB_UPDATE_REQUEST + (message if may_view else b"") + FB_UPDATE_REQUEST
    assert not viewer.failed


def test_view_only_counts_what_it_dropped():
    viewer = ViewOnlyFilter()
    viewer.feed(KEY_EVENT * 3 + POINTER_EVENT + XVP_REBOOT + QEMU_KEY)
    assert viewer.dropped == {
        "KeyEvent": 3,
        "PointerEvent": 1,
        "xvp": 1,
        "QEMU extended key event": 1,
    }


def test_view_only_drops_a_big_paste_without_buffering_it():
    viewer = ViewOnlyFilter()
    size = 4 * 1024 * 1024
    assert viewer.feed(b"\x06\x00\x00\x00" + u32(size)) == b""
    for _ in range(size // 65536):
        # Clipboard text that looks like key events is still clipboard text.
        assert viewer.feed(KEY_EVENT * 8192) == b""
    assert viewer.feed(FB_UPDATE_REQUEST) == FB_UPDATE_REQUEST
    assert not viewer._framer._header


@pytest.mark.parametrize(
    "unknown",
    [b"\x07\x00\x00\x00", b"\xff\x02\x00\x00", b"\xff\x01\x00\x07", b"\x7f" + KEY_EVENT],
    ids=["UltraVNC FileTransfer", "unknown QEMU submessage", "unknown audio op", "VMware"],
)
def test_view_only_fails_closed_on_a_message_it_cannot_size(unknown):
    viewer = ViewOnlyFilter()
    out = viewer.feed(FB_UPDATE_REQUEST + KEY_EVENT + unknown + FB_UPDATE_REQUEST)
    assert out == FB_UPDATE_REQUEST  # what came before, nothing after
    assert viewer.failed and viewer.unknown_type == unknown[0]
    assert viewer.feed(FB_UPDATE_REQUEST) == b""


# -- properties ------------------------------------------------------------------------

# After ExtendedMouseButtons, bit 7 marks the longer PointerEvent: no plain back button.
ALL = {**{n: m for n, m in MESSAGES.items() if m[0] != POINTER_BIT7}, **AFTER_EMB}


def _stream(names: list[str], with_emb: bool) -> bytes:
    prefix = SET_ENCODINGS_EMB if with_emb else b""
    pool = ALL if with_emb else MESSAGES
    return prefix + b"".join(pool[n][0] for n in names)


@st.composite
def message_streams(draw):
    with_emb = draw(st.booleans())
    pool = ALL if with_emb else MESSAGES
    names = draw(st.lists(st.sampled_from(sorted(pool)), max_size=30))
    return names, with_emb, _stream(names, with_emb)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


@settings(max_examples=300, deadline=None)
@given(case=message_streams(), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_view_only_split_anywhere_equals_whole_and_passes_exactly_the_screen_messages(case, cuts):
    names, with_emb, stream = case
    pool = ALL if with_emb else MESSAGES
    whole = ViewOnlyFilter().feed(stream)
    viewer = ViewOnlyFilter()
    split = b"".join(viewer.feed(piece) for piece in _split(stream, cuts))
    assert split == whole
    expected = (SET_ENCODINGS_EMB if with_emb else b"") + b"".join(
        pool[n][0] for n in names if pool[n][2]
    )
    assert whole == expected  # whole messages only, in order: a subsequence of the stream
    assert not viewer.failed and viewer._framer.at_boundary


@settings(max_examples=300, deadline=None)
@given(case=message_streams(), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_scanner_split_anywhere_counts_every_input(case, cuts):
    names, with_emb, stream = case
    pool = ALL if with_emb else MESSAGES
    scanner = ClientInputScanner()
    counted = sum(scanner.feed(piece) for piece in _split(stream, cuts))
    assert counted == sum(pool[n][1] for n in names)
    assert scanner.at_boundary and not scanner.desynchronised


@settings(max_examples=300, deadline=None)
@given(
    prefix=message_streams(),
    garbage=st.binary(max_size=64),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
)
def test_view_only_output_of_any_bytes_is_screen_messages_only(prefix, garbage, cuts):
    # Whatever a viewer sends, the VNC server, framing what cpvm passes, finds only
    # messages a viewer may send: no key, pointer, clipboard or power control.
    stream = prefix[2] + garbage
    viewer = ViewOnlyFilter()
    out = b"".join(viewer.feed(piece) for piece in _split(stream, cuts))
    assert out == ViewOnlyFilter().feed(stream)
    seen, stopped = reference_messages(out)
    assert stopped is None
    assert all(may_view for _, _, _, may_view in seen)
    heads = [f.head for f in ClientMessageFramer().feed(out) if f.start]
    assert all(h.role is Role.VIEW for h in heads)
