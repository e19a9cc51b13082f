"""Fuzz targets for cpvm.rfb: both handshakes, the browser input scanner, the view-only filter.

Each target takes the raw fuzz input; its first byte chooses options and how the rest is
chunked, the rest is what the peer sends. A target raises AssertionError when an invariant
breaks; any other exception escaping it is a crash too (the machines document none for
well-behaved callers: RuntimeError only flags misuse by the caller, which the drivers avoid).
"""

from __future__ import annotations

import random

from cpvm import rfb

PASSWORD = b"pw-Fz9!"


def chunks(data: bytes, seed: int) -> list[bytes]:
    """``data`` cut in pieces of 1 to 16 bytes, the cuts chosen by ``seed``."""
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(data):
        step = rng.randint(1, 16)
        out.append(data[i : i + step])
        i += step
    return out


def _summary(events: list[rfb.Event]) -> list[object]:
    """Events in a form comparable across chunkings (a failure's text quotes partial input)."""
    out: list[object] = []
    for e in events:
        if isinstance(e, rfb.Failed):
            # Failure messages go to logs: bounded whatever the peer sent.
            assert len(e.message) <= rfb.MAX_FAILURE_MESSAGE, len(e.message)
            out.append(("Failed", e.kind))
        elif isinstance(e, rfb.Send):
            out.append(("Send", e.data))
        else:
            out.append(type(e).__name__)
    return out


# -- browser -> cpvm handshake ---------------------------------------------------------


def _drive_server(pieces: list[bytes], accept: bool) -> tuple[list[object], bytes]:
    """Run RfbServerHandshake over ``pieces``; return its events and the bytes after it."""
    machine = rfb.RfbServerHandshake()
    events = list(machine.start())
    rest = b""
    for index, piece in enumerate(pieces):
        new = machine.receive(piece)
        events += new
        if any(isinstance(e, rfb.ClientVersionReceived) for e in new):
            new = machine.accept() if accept else machine.reject("no console for you")
            events += new
        done = [e for e in new if isinstance(e, rfb.ClientInitReceived)]
        if done:
            init = rfb.ServerInit(640, 480, bytes(16), b"vm")
            events += machine.send_server_init(init, b"web-01")
            rest = done[0].leftover + b"".join(pieces[index + 1 :])
            break
        if machine.failed:  # a failure, or reject() was sent
            break
    return _summary(events), rest


def rfb_server(data: bytes) -> None:
    """The browser-side handshake: any browser bytes, any chunking, same outcome."""
    if not data:
        return
    accept = bool(data[0] & 1)
    stream = data[1:]
    whole = _drive_server([stream] if stream else [], accept)
    split = _drive_server(chunks(stream, data[0]), accept)
    assert whole == split, (whole, split)
    events, rest = whole
    # Reference: a well-formed 3.8 handshake leaves exactly the bytes after ClientInit.
    if accept and stream[:12] == b"RFB 003.008\n" and len(stream) >= 14 and stream[12] == 1:
        assert "ClientInitReceived" in events and rest == stream[14:], events
    if "ClientInitReceived" in events:
        assert accept and ("Failed", "protocol") not in events


# -- browser input after the handshake -------------------------------------------------


def reference_messages(stream: bytes) -> tuple[list[tuple[int, int, bool, bool]], int | None]:
    """The client messages in ``stream`` decoded whole, and the type that stopped decoding.

    An independent reading of the RFB client messages (RFC 6143 section 7.5 and the
    community extensions cpvm knows): each message as ``(start, end, user input, viewer
    may send it)``; ``end`` may pass the stream's end for a message cut short. Input is
    counted once a message's header is complete, as cpvm.rfb's framer does.
    """
    fixed = {0: 20, 3: 10, 4: 8, 150: 10, 250: 4}
    audio = {0: 4, 1: 4, 2: 10}
    view = {0, 2, 3, 150, 248}
    pos, n, out = 0, len(stream), []
    extended_pointer = False
    while pos < n:
        kind = stream[pos]
        have = n - pos
        user, may_view = kind in (4, 5), kind in view
        if kind in fixed:
            size = fixed[kind]
        elif kind == 5:
            if extended_pointer and have < 2:
                break
            size = 7 if extended_pointer and stream[pos + 1] & 0x80 else 6
        elif kind == 2:
            if have < 4:
                break
            count = int.from_bytes(stream[pos + 2 : pos + 4], "big")
            size = 4 + 4 * count
            encodings = stream[pos + 4 : pos + size]
            whole = len(encodings) - len(encodings) % 4
            if b"\xff\xff\xfe\xc4" in [encodings[i : i + 4] for i in range(0, whole, 4)]:
                extended_pointer = True
        elif kind == 6:
            if have < 8:
                break
            length = int.from_bytes(stream[pos + 4 : pos + 8], "big", signed=True)
            if length >= 0:
                user, size = True, 8 + length
            else:
                if have < 9:
                    break
                user, size = not stream[pos + 8] & 1, 8 - length
        elif kind == 248:
            if have < 9:
                break
            size = 9 + stream[pos + 8]
        elif kind == 251:
            if have < 8:
                break
            size = 8 + 16 * stream[pos + 6]
        elif kind == 253:
            if have < 4:
                break
            order = "big" if stream[pos + 1] & 0x80 else "little"
            user = stream[pos + 1] & 0x7F == 0
            size = 4 + int.from_bytes(stream[pos + 2 : pos + 4], order)
        elif kind == 255:
            if have < 2:
                break
            sub = stream[pos + 1]
            if sub == 0:
                user, size = True, 12
            elif sub == 1:
                if have < 4:
                    break
                total = audio.get(int.from_bytes(stream[pos + 2 : pos + 4], "big"))
                if total is None:
                    return out, kind
                may_view, size = True, total
            else:
                return out, kind
        else:
            return out, kind
        out.append((pos, pos + size, user, may_view))
        pos += size
    return out, None


def reference_scan(stream: bytes) -> tuple[int, int | None]:
    """Input events in ``stream`` and the type that desynchronised it, decoded whole."""
    messages, unknown = reference_messages(stream)
    return sum(user for _, _, user, _ in messages), unknown


def rfb_input(data: bytes) -> None:
    """The idle timer's input scanner agrees with the reference decoder, in any chunking."""
    if not data:
        return
    stream = data[1:]
    scanner = rfb.ClientInputScanner()
    counted = sum(scanner.feed(piece) for piece in chunks(stream, data[0]))
    inputs, unknown = reference_scan(stream)
    assert counted == inputs, (counted, inputs)
    assert scanner.desynchronised == (unknown is not None)
    assert scanner.unknown_type == unknown
    # memoryview and bytearray chunks (what the relay hands it) count the same.
    again = rfb.ClientInputScanner()
    assert again.feed(memoryview(bytearray(stream))) == inputs


def rfb_viewonly(data: bytes) -> None:
    """The view-only filter passes exactly the reference's screen messages, in any chunking,
    and a server reading its output finds only screen messages."""
    if not data:
        return
    stream = data[1:]
    viewer = rfb.ViewOnlyFilter()
    passed = b"".join(viewer.feed(piece) for piece in chunks(stream, data[0]))
    messages, unknown = reference_messages(stream)
    expected = b"".join(stream[a:b] for a, b, _, may_view in messages if may_view)
    assert passed == expected, (passed, expected)
    assert viewer.failed == (unknown is not None)
    # The VNC server frames what it gets as the reference does: only screen messages.
    seen, stopped = reference_messages(passed)
    assert stopped is None and all(may_view for _, _, _, may_view in seen), seen


# -- cpvm -> VNC server handshake (hostile server) ------------------------------------


def _client_options(flags: int) -> dict[str, object]:
    return {
        "password": PASSWORD if flags & 1 else None,
        "allow_anonymous_tls": bool(flags & 2),
        "allow_none": bool(flags & 4),
        "require_tls": bool(flags & 8),
        "allow_x509": bool(flags & 16),
    }


def _drive_client(pieces: list[bytes], options: dict) -> tuple[list[object], bytes, object]:
    machine = rfb.RfbClientHandshake(**options)
    events: list[rfb.Event] = []
    rest = b""
    for index, piece in enumerate(pieces):
        if machine.failed:
            break
        new = machine.receive(piece)
        while True:
            events += new
            if any(isinstance(e, rfb.StartTLS) for e in new):
                new = machine.tls_started()  # as if the TLS layer came up at once
            elif any(isinstance(e, rfb.SecurityComplete) for e in new):
                new = machine.send_client_init(shared=True)
            else:
                break
        done = [e for e in events if isinstance(e, rfb.ServerInitReceived)]
        if done:
            rest = done[0].leftover + b"".join(pieces[index + 1 :])
            break
    return _summary(events), rest, machine.security_type


def rfb_client(data: bytes) -> None:
    """Bytes from a hostile VNC server: no crash, no password leak, no silent downgrade."""
    if not data:
        return
    options = _client_options(data[0])
    stream = data[1:]
    whole = _drive_client([stream] if stream else [], options)
    split = _drive_client(chunks(stream, data[0] >> 5), options)
    for events, _, security in (whole, split):
        tls = "StartTLS" in events
        if "ServerInitReceived" in events:
            assert "SecurityComplete" in events
            if options["require_tls"]:
                assert tls, "handshake completed without TLS although TLS is required"
            if not options["allow_none"]:
                assert security != rfb.SEC_NONE
            if options["password"] is None:
                assert security not in (
                    rfb.SEC_VNC_AUTH,
                    rfb.VENCRYPT_TLS_VNC,
                    rfb.VENCRYPT_X509_VNC,
                )
        for e in events:
            if isinstance(e, tuple) and e[0] == "Send":
                assert PASSWORD not in e[1]
    # Where TLS starts depends on how bytes arrive (clear text after the accept byte is an
    # error): compare chunkings only for handshakes without TLS.
    if "StartTLS" not in whole[0] and "StartTLS" not in split[0]:
        assert whole == split, (whole, split)
