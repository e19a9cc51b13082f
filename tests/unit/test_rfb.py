"""Byte-vector and property tests for the RFB state machines in cpvm.rfb."""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpvm.rfb import (
    MAX_NAME_LENGTH,
    MAX_REASON_LENGTH,
    ClientInitReceived,
    ClientInputScanner,
    ClientVersionReceived,
    Failed,
    RfbClientHandshake,
    RfbServerHandshake,
    SecurityComplete,
    Send,
    ServerInit,
    ServerInitReceived,
    StartTLS,
)
from cpvm.rfb.vncauth import vnc_auth_response

PASSWORD = b"hunter2!"
CHALLENGE = bytes(range(0x10, 0x20))
RESPONSE = vnc_auth_response(PASSWORD, CHALLENGE)

# 32 bpp, depth 24, little endian, true colour, max 255 each, shifts 16/8/0: what QEMU sends.
PIXEL_FORMAT = bytes([32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0])
SERVER_INIT = ServerInit(720, 400, PIXEL_FORMAT, b"QEMU (vm-1)")
# Written out by hand so that parsing and to_bytes() are checked against the wire format.
SERVER_INIT_BYTES = b"\x02\xd0\x01\x90" + PIXEL_FORMAT + b"\x00\x00\x00\x0bQEMU (vm-1)"
# A FramebufferUpdate header the server might send right behind ServerInit.
LEFTOVER = b"\x00\x00\x00\x01"


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def reason(text: bytes) -> bytes:
    return u32(len(text)) + text


# --------------------------------------------------------------------------------------
# Driving the client machine


@dataclass
class Outcome:
    """What a client handshake did: the bytes it sent and its non-Send events, in order."""

    sent: bytes = b""
    events: list = field(default_factory=list)

    @property
    def last(self):
        return self.events[-1] if self.events else None


def drive_client(machine: RfbClientHandshake, segments: list[bytes], chunks=None) -> Outcome:
    """Feed the server's bytes to ``machine`` and react to its events like the adapter would.

    ``segments`` are separated by the TLS start: the bytes of segment n+1 only arrive
    after StartTLS was acted on. ``chunks`` (a callable) splits each segment.
    """
    outcome = Outcome()

    def handle(events):
        for event in events:
            if isinstance(event, Send):
                outcome.sent += event.data
                continue
            outcome.events.append(event)
            if isinstance(event, SecurityComplete):
                handle(machine.send_client_init(shared=True))
            elif isinstance(event, StartTLS):
                handle(machine.tls_started())

    relayed = b""
    for segment in segments:
        for chunk in chunks(segment) if chunks else [segment]:
            if isinstance(outcome.last, Failed):
                break
            if isinstance(outcome.last, ServerInitReceived):
                relayed += chunk  # the relay's business now, not the machine's
                continue
            handle(machine.receive(chunk))
    if isinstance(outcome.last, ServerInitReceived):
        # Where ServerInit ends within a chunk depends on the chunking; what the relay gets
        # in all must not.
        outcome.events[-1] = ServerInitReceived(
            outcome.last.server_init, outcome.last.leftover + relayed
        )
    return outcome


def byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@dataclass
class Scenario:
    """A whole client handshake: what the server sends and what cpvm must answer."""

    name: str
    server: list[bytes]  # split at the TLS start
    client: bytes
    events: list
    kwargs: dict = field(default_factory=dict)
    password: bytes | None = PASSWORD


def _success(tls: StartTLS | None = None) -> list:
    events = [] if tls is None else [tls]
    return events + [SecurityComplete(), ServerInitReceived(SERVER_INIT, LEFTOVER)]


SI = SERVER_INIT_BYTES + LEFTOVER

SUCCESS_SCENARIOS = [
    Scenario(
        "3.8 None",
        [b"RFB 003.008\n" + b"\x01\x01" + u32(0) + SI],
        b"RFB 003.008\n" + b"\x01" + b"\x01",
        _success(),
    ),
    Scenario(
        "3.7 None has no SecurityResult",
        [b"RFB 003.007\n" + b"\x01\x01" + SI],
        b"RFB 003.007\n" + b"\x01" + b"\x01",
        _success(),
    ),
    Scenario(
        "3.3 None",
        [b"RFB 003.003\n" + u32(1) + SI],
        b"RFB 003.003\n" + b"\x01",
        _success(),
    ),
    Scenario(
        "3.3 VncAuth",
        [b"RFB 003.003\n" + u32(2) + CHALLENGE + u32(0) + SI],
        b"RFB 003.003\n" + RESPONSE + b"\x01",
        _success(),
    ),
    Scenario(
        "3.7 VncAuth",
        [b"RFB 003.007\n" + b"\x01\x02" + CHALLENGE + u32(0) + SI],
        b"RFB 003.007\n" + b"\x02" + RESPONSE + b"\x01",
        _success(),
    ),
    Scenario(
        "3.8 VncAuth (QEMU with a password)",
        [b"RFB 003.008\n" + b"\x01\x02" + CHALLENGE + u32(0) + SI],
        b"RFB 003.008\n" + b"\x02" + RESPONSE + b"\x01",
        _success(),
    ),
    Scenario(
        "3.4 (UltraVNC) is treated as 3.3",
        [b"RFB 003.004\n" + u32(2) + CHALLENGE + u32(0) + SI],
        b"RFB 003.003\n" + RESPONSE + b"\x01",
        _success(),
    ),
    Scenario(
        "3.6 is treated as 3.3",
        [b"RFB 003.006\n" + u32(1) + SI],
        b"RFB 003.003\n" + b"\x01",
        _success(),
    ),
    Scenario(
        "3.889 (Apple) is answered with 3.8",
        [b"RFB 003.889\n" + b"\x02\x1e\x02" + CHALLENGE + u32(0) + SI],
        b"RFB 003.008\n" + b"\x02" + RESPONSE + b"\x01",
        _success(),
    ),
    Scenario(
        "RealVNC 5.0 is answered with 3.8",
        [b"RFB 005.000\n" + b"\x01\x01" + u32(0) + SI],
        b"RFB 003.008\n" + b"\x01" + b"\x01",
        _success(),
    ),
    Scenario(
        "VncAuth preferred over None",
        [b"RFB 003.008\n" + b"\x02\x01\x02" + CHALLENGE + u32(0) + SI],
        b"RFB 003.008\n" + b"\x02" + RESPONSE + b"\x01",
        _success(),
    ),
    Scenario(
        "None when there is no password",
        [b"RFB 003.008\n" + b"\x02\x02\x01" + u32(0) + SI],
        b"RFB 003.008\n" + b"\x01" + b"\x01",
        _success(),
        password=None,
    ),
    Scenario(
        "VeNCrypt X509Vnc (QEMU with tls-creds)",
        [
            b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x02" + b"\x00" + b"\x01" + u32(261) + b"\x01",
            CHALLENGE + u32(0) + SI,
        ],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02" + u32(261) + RESPONSE + b"\x01",
        _success(StartTLS(anonymous=False)),
    ),
    Scenario(
        "VeNCrypt X509None",
        [
            b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x02" + b"\x00" + b"\x01" + u32(260) + b"\x01",
            u32(0) + SI,
        ],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02" + u32(260) + b"\x01",
        _success(StartTLS(anonymous=False)),
    ),
    Scenario(
        "VeNCrypt TLSVnc when anonymous TLS is allowed",
        [
            b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x02" + b"\x00" + b"\x01" + u32(258) + b"\x01",
            CHALLENGE + u32(0) + SI,
        ],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02" + u32(258) + RESPONSE + b"\x01",
        _success(StartTLS(anonymous=True)),
        kwargs={"allow_anonymous_tls": True},
    ),
    Scenario(
        "VeNCrypt TLSNone when anonymous TLS is allowed",
        [
            b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x02" + b"\x00" + b"\x01" + u32(257) + b"\x01",
            u32(0) + SI,
        ],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02" + u32(257) + b"\x01",
        _success(StartTLS(anonymous=True)),
        kwargs={"allow_anonymous_tls": True},
    ),
    Scenario(
        "TigerVNC [19, 19, 2] with subtypes [261, 258, 2]: X509Vnc wins",
        [
            b"RFB 003.008\n"
            + b"\x03\x13\x13\x02"
            + b"\x00\x02"
            + b"\x00"
            + b"\x03"
            + u32(261)
            + u32(258)
            + u32(2)
            + b"\x01",
            CHALLENGE + u32(0) + SI,
        ],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02" + u32(261) + RESPONSE + b"\x01",
        _success(StartTLS(anonymous=False)),
        kwargs={"allow_anonymous_tls": True},
    ),
    Scenario(
        "TigerVNC subtypes [258, 2] without anonymous TLS: VncAuth inside VeNCrypt, no accept",
        [
            b"RFB 003.008\n"
            + b"\x02\x13\x02"
            + b"\x00\x02"
            + b"\x00"
            + b"\x02"
            + u32(258)
            + u32(2)
            + CHALLENGE
            + u32(0)
            + SI
        ],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02" + u32(2) + RESPONSE + b"\x01",
        _success(),
    ),
    Scenario(
        "VeNCrypt subtype None still gets a SecurityResult",
        [b"RFB 003.007\n" + b"\x01\x13" + b"\x00\x02" + b"\x00" + b"\x01" + u32(1) + u32(0) + SI],
        b"RFB 003.007\n" + b"\x13" + b"\x00\x02" + u32(1) + b"\x01",
        _success(),
    ),
    Scenario(
        "A server speaking a newer VeNCrypt gets 0.2",
        [
            b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x03" + b"\x00" + b"\x01" + u32(260) + b"\x01",
            u32(0) + SI,
        ],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02" + u32(260) + b"\x01",
        _success(StartTLS(anonymous=False)),
    ),
]


def _failure(kind: str, message: str) -> list:
    return [Failed(kind, message)]


FAILURE_SCENARIOS = [
    Scenario(
        "3.8 VncAuth wrong password, with the server's reason",
        [b"RFB 003.008\n" + b"\x01\x02" + CHALLENGE + u32(1) + reason(b"Authentication failed")],
        b"RFB 003.008\n" + b"\x02" + RESPONSE,
        _failure("auth", "authentication failed: 'Authentication failed'"),
    ),
    Scenario(
        "3.7 VncAuth wrong password has no reason",
        [b"RFB 003.007\n" + b"\x01\x02" + CHALLENGE + u32(1)],
        b"RFB 003.007\n" + b"\x02" + RESPONSE,
        _failure("auth", "authentication failed (SecurityResult 1)"),
    ),
    Scenario(
        "3.3 VncAuth wrong password",
        [b"RFB 003.003\n" + u32(2) + CHALLENGE + u32(1)],
        b"RFB 003.003\n" + RESPONSE,
        _failure("auth", "authentication failed (SecurityResult 1)"),
    ),
    Scenario(
        "3.3 connection refused with a reason",
        [b"RFB 003.003\n" + u32(0) + reason(b"Too many security failures")],
        b"RFB 003.003\n",
        _failure("auth", "server refused the connection: 'Too many security failures'"),
    ),
    Scenario(
        "3.8 empty security list with a reason",
        [b"RFB 003.008\n" + b"\x00" + reason(b"No supported security types")],
        b"RFB 003.008\n",
        _failure("auth", "server refused the connection: 'No supported security types'"),
    ),
    Scenario(
        "3.3 VncAuth without a password",
        [b"RFB 003.003\n" + u32(2)],
        b"RFB 003.003\n",
        _failure(
            "auth",
            "server (RFB 3.3) requires security type 2 but it is not allowed: "
            "type 2 (VNC Authentication) needs a VNC password",
        ),
        password=None,
    ),
    Scenario(
        "3.8 VncAuth only without a password",
        [b"RFB 003.008\n" + b"\x01\x02"],
        b"RFB 003.008\n",
        _failure(
            "auth",
            "server offered security types [2] but none is allowed: "
            "type 2 (VNC Authentication) needs a VNC password",
        ),
        password=None,
    ),
    Scenario(
        "None refused by allow_none=False",
        [b"RFB 003.008\n" + b"\x01\x01"],
        b"RFB 003.008\n",
        _failure(
            "unsupported-security",
            "server offered security types [1] but none is allowed: "
            "type 1 (None) is refused by allow_none=False",
        ),
        kwargs={"allow_none": False},
    ),
    Scenario(
        "3.3 None refused by allow_none=False",
        [b"RFB 003.003\n" + u32(1)],
        b"RFB 003.003\n",
        _failure(
            "unsupported-security",
            "server (RFB 3.3) requires security type 1 but it is not allowed: "
            "type 1 (None) is refused by allow_none=False",
        ),
        kwargs={"allow_none": False},
    ),
    Scenario(
        "Only unknown types",
        [b"RFB 003.008\n" + b"\x02\x10\x05"],
        b"RFB 003.008\n",
        _failure(
            "unsupported-security",
            "server offered security types [16, 5] but none is allowed: "
            "unsupported: 5 (unknown), 16 (unknown)",
        ),
    ),
    Scenario(
        "TLSVnc refused without allow_anonymous_tls",
        [b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x02" + b"\x00" + b"\x01" + u32(258)],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02",
        _failure(
            "unsupported-security",
            "server offered security types [19] but none is allowed: "
            "VeNCrypt subtypes [258] need allow_anonymous_tls",
        ),
    ),
    Scenario(
        "X509Vnc without a password",
        [b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x02" + b"\x00" + b"\x01" + u32(261)],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02",
        _failure(
            "auth",
            "server offered security types [19] but none is allowed: "
            "VeNCrypt subtypes [261] need a VNC password",
        ),
        password=None,
    ),
    Scenario(
        "VeNCrypt Plain subtypes only",
        [b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x02" + b"\x00" + b"\x02" + u32(262) + u32(256)],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02",
        _failure(
            "unsupported-security",
            "server offered security types [19] but none is allowed: "
            "unsupported VeNCrypt subtypes: 256 (Plain), 262 (X509Plain)",
        ),
    ),
    Scenario(
        "VeNCrypt 0.1 is not supported",
        [b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x01"],
        b"RFB 003.008\n" + b"\x13",
        _failure("unsupported-security", "server speaks VeNCrypt 0.1; only 0.2 is supported"),
    ),
    Scenario(
        "VeNCrypt version refused",
        [b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x02" + b"\xff"],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02",
        _failure("unsupported-security", "server refused VeNCrypt version 0.2"),
    ),
    Scenario(
        "VeNCrypt subtype rejected",
        [b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x02" + b"\x00" + b"\x01" + u32(261) + b"\x00"],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02" + u32(261),
        _failure("unsupported-security", "server rejected VeNCrypt subtype 261 (X509Vnc)"),
    ),
    Scenario(
        "VeNCrypt with no subtypes",
        [b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x02" + b"\x00" + b"\x00"],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02",
        _failure("protocol", "server offered no VeNCrypt subtypes"),
    ),
    Scenario(
        "X509Vnc refused after TLS with the server's reason",
        [
            b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x02" + b"\x00" + b"\x01" + u32(261) + b"\x01",
            CHALLENGE + u32(1) + reason(b"Authentication failed"),
        ],
        b"RFB 003.008\n" + b"\x13" + b"\x00\x02" + u32(261) + RESPONSE,
        [
            StartTLS(anonymous=False),
            Failed("auth", "authentication failed: 'Authentication failed'"),
        ],
    ),
    Scenario(
        "Desktop name over the limit",
        [
            b"RFB 003.008\n"
            + b"\x01\x01"
            + u32(0)
            + SERVER_INIT_BYTES[:20]
            + u32(MAX_NAME_LENGTH + 1)
        ],
        b"RFB 003.008\n" + b"\x01" + b"\x01",
        [
            SecurityComplete(),
            Failed(
                "protocol", f"server sent a {MAX_NAME_LENGTH + 1}-byte desktop name (limit 65536)"
            ),
        ],
    ),
    Scenario(
        "Reason string over the limit",
        [b"RFB 003.008\n" + b"\x00" + u32(MAX_REASON_LENGTH + 1)],
        b"RFB 003.008\n",
        _failure("protocol", "peer sent a 65537-byte reason string (limit 65536)"),
    ),
    Scenario(
        "RFB version 2",
        [b"RFB 002.000\n"],
        b"",
        _failure("protocol", "unsupported RFB version b'RFB 002.000\\n'"),
    ),
]

ALL_SCENARIOS = SUCCESS_SCENARIOS + FAILURE_SCENARIOS


def _machine(scenario: Scenario) -> RfbClientHandshake:
    return RfbClientHandshake(scenario.password, **scenario.kwargs)


@pytest.mark.parametrize("scenario", ALL_SCENARIOS, ids=lambda s: s.name)
def test_client_scenario_in_one_chunk(scenario: Scenario):
    outcome = drive_client(_machine(scenario), scenario.server)
    assert outcome.events == scenario.events
    assert outcome.sent == scenario.client


@pytest.mark.parametrize("scenario", ALL_SCENARIOS, ids=lambda s: s.name)
def test_client_scenario_byte_at_a_time(scenario: Scenario):
    outcome = drive_client(_machine(scenario), scenario.server, byte_at_a_time)
    assert outcome.events == scenario.events
    assert outcome.sent == scenario.client


def _random_splitter(data_strategy):
    def chunks(segment: bytes) -> list[bytes]:
        cuts = sorted(
            data_strategy.draw(st.lists(st.integers(0, len(segment)), max_size=8), label="cuts")
        )
        bounds = [0, *cuts, len(segment)]
        return [segment[a:b] for a, b in itertools.pairwise(bounds)]

    return chunks


# Not @pytest.mark.parametrize with @given: pytest-twisted 1.14 wraps the shared hypothesis
# inner test once per parametrized item, and the nested wrappers fail ("blockon cannot be
# called from the twisted greenlet"). Sampling the scenario inside hypothesis avoids that.
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=st.sampled_from(ALL_SCENARIOS), data=st.data())
def test_client_scenario_in_random_chunks(scenario: Scenario, data):
    outcome = drive_client(_machine(scenario), scenario.server, _random_splitter(data))
    assert outcome.events == scenario.events
    assert outcome.sent == scenario.client


@pytest.mark.parametrize("scenario", ALL_SCENARIOS, ids=lambda s: s.name)
def test_client_truncated_input_waits(scenario: Scenario):
    # Everything but the last byte the final event needs: no final event yet, nothing lost.
    *head, tail = scenario.server
    cut = len(tail) - 1
    if isinstance(scenario.events[-1], ServerInitReceived):
        cut -= len(LEFTOVER)
    machine = _machine(scenario)
    outcome = drive_client(machine, [*head, tail[:cut]])
    assert outcome.events == scenario.events[:-1]
    rest = drive_client(machine, [tail[cut:]])
    assert rest.events == scenario.events[-1:]
    assert outcome.sent + rest.sent == scenario.client


@pytest.mark.parametrize("scenario", ALL_SCENARIOS, ids=lambda s: s.name)
def test_client_messages_never_contain_the_password(scenario: Scenario):
    outcome = drive_client(_machine(scenario), scenario.server, byte_at_a_time)
    for event in outcome.events:
        assert PASSWORD.decode() not in repr(event)
    assert PASSWORD.decode() not in repr(_machine(scenario))


def test_client_leftover_is_empty_when_server_init_ends_the_chunk():
    machine = RfbClientHandshake(None)
    outcome = drive_client(machine, [b"RFB 003.008\n\x01\x01" + u32(0) + SERVER_INIT_BYTES])
    assert outcome.last == ServerInitReceived(SERVER_INIT, b"")


def test_client_keeps_bytes_that_arrive_before_client_init():
    # A chunk that carries SecurityResult and (already) ServerInit: nothing is lost while
    # the caller has not called send_client_init yet.
    machine = RfbClientHandshake(None)
    events = machine.receive(b"RFB 003.008\n\x01\x01")
    assert events == [Send(b"RFB 003.008\n"), Send(b"\x01")]
    assert machine.receive(u32(0) + SI) == [SecurityComplete()]
    assert machine.send_client_init(shared=False) == [
        Send(b"\x00"),
        ServerInitReceived(SERVER_INIT, LEFTOVER),
    ]


def test_client_records_what_was_negotiated():
    machine = RfbClientHandshake(PASSWORD)
    drive_client(machine, SUCCESS_SCENARIOS[12].server)  # X509Vnc
    assert machine.minor_version == 8
    assert machine.security_type == 261


@pytest.mark.parametrize(
    "garbage",
    [
        b"SSH-2.0-OpenSSH_9.2p1\r\n",
        b"HTTP/1.1 400 Bad Request\r\n",
        b"RFB 003.00x\n",
        b"RFB 003.008\r\n",
        b"RFB 3.8\n    ",
        b"rfb 003.008\n",
        b"\x16\x03\x01\x00\xa5",  # a TLS ClientHello
    ],
)
def test_client_garbage_version_fails_as_soon_as_it_is_wrong(garbage: bytes):
    machine = RfbClientHandshake(PASSWORD)
    outcome = drive_client(machine, [garbage], byte_at_a_time)
    assert len(outcome.events) == 1
    failed = outcome.events[0]
    assert isinstance(failed, Failed) and failed.kind == "protocol"
    assert failed.message.startswith("server did not send an RFB version: ")
    assert outcome.sent == b""
    # Dead machines ignore further input.
    assert machine.receive(b"RFB 003.008\n") == []
    assert machine.failed


def test_client_short_ssh_banner_fails_without_waiting_for_12_bytes():
    machine = RfbClientHandshake(PASSWORD)
    assert machine.receive(b"SSH") == [
        Failed("protocol", "server did not send an RFB version: b'SSH'")
    ]


def test_client_clear_text_after_tls_accept_fails():
    machine = RfbClientHandshake(PASSWORD)
    events = machine.receive(
        b"RFB 003.008\n\x01\x13\x00\x02\x00\x01" + u32(261) + b"\x01" + CHALLENGE
    )
    assert events[-1] == Failed(
        "protocol", "server sent 16 bytes in clear text after accepting TLS"
    )
    assert not any(isinstance(e, StartTLS) for e in events)


def test_client_bytes_before_tls_started_fail():
    machine = RfbClientHandshake(PASSWORD)
    events = machine.receive(b"RFB 003.008\n\x01\x13\x00\x02\x00\x01" + u32(261) + b"\x01")
    assert events[-1] == StartTLS(anonymous=False)
    assert machine.phase == "wait for tls"
    assert machine.receive(b"") == []
    assert machine.receive(b"xx") == [
        Failed("protocol", "server sent 2 bytes in clear text where a TLS handshake was expected")
    ]


def test_client_reason_is_sanitised_and_shortened():
    machine = RfbClientHandshake(PASSWORD)
    long_reason = b"bad\x1b[31m\nthing " + b"x" * 1000
    outcome = drive_client(
        machine, [b"RFB 003.008\n\x01\x02" + CHALLENGE + u32(1) + reason(long_reason)]
    )
    message = outcome.last.message
    assert "\x1b" not in message and "\n" not in message
    assert len(message) < 300
    assert message.startswith("authentication failed: 'bad [31m thing xxx")


def test_client_api_misuse_raises():
    machine = RfbClientHandshake(None)
    with pytest.raises(RuntimeError):
        machine.send_client_init(True)
    with pytest.raises(RuntimeError):
        machine.tls_started()
    drive_client(machine, [b"RFB 003.008\n\x01\x01" + u32(0) + SI])
    with pytest.raises(RuntimeError):
        machine.receive(b"\x00")


def test_client_api_after_failure_returns_nothing():
    machine = RfbClientHandshake(None)
    machine.receive(b"XYZ")
    assert machine.receive(b"more") == []
    assert machine.tls_started() == []
    assert machine.send_client_init(True) == []


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from(
        [b"", b"RFB 003.003\n", b"RFB 003.007\n", b"RFB 003.008\n", b"RFB 003.008\n\x01\x13"]
    ),
    body=st.binary(max_size=200),
    allow_anonymous_tls=st.booleans(),
    password=st.sampled_from([None, PASSWORD]),
    data=st.data(),
)
def test_client_never_raises_on_arbitrary_input(prefix, body, allow_anonymous_tls, password, data):
    machine = RfbClientHandshake(password, allow_anonymous_tls=allow_anonymous_tls)
    outcome = drive_client(machine, [prefix + body], _random_splitter(data))
    failures = [e for e in outcome.events if isinstance(e, Failed)]
    assert len(failures) <= 1
    if failures:
        assert outcome.last is failures[0]
        assert failures[0].kind in ("protocol", "auth", "unsupported-security")
        assert PASSWORD.decode() not in failures[0].message


# --------------------------------------------------------------------------------------
# ServerInit


def test_server_init_serialises_to_the_wire_format():
    assert SERVER_INIT.to_bytes() == SERVER_INIT_BYTES


def test_server_init_with_name():
    renamed = SERVER_INIT.with_name(b"web-01")
    assert renamed.name == b"web-01"
    assert renamed.width == 720 and renamed.pixel_format == PIXEL_FORMAT
    assert renamed.to_bytes().endswith(b"\x00\x00\x00\x06web-01")
    assert SERVER_INIT.name == b"QEMU (vm-1)"  # frozen: the original is unchanged


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 70000},
        {"height": -1},
        {"pixel_format": b"\x00" * 15},
        {"name": b"x" * (MAX_NAME_LENGTH + 1)},
    ],
)
def test_server_init_rejects_impossible_values(kwargs):
    values = {"width": 1, "height": 1, "pixel_format": PIXEL_FORMAT, "name": b""} | kwargs
    with pytest.raises(ValueError):
        ServerInit(**values)


# --------------------------------------------------------------------------------------
# RfbServerHandshake (towards the browser)


def drive_server(machine: RfbServerHandshake, data: bytes, chunks=None, decide=None):
    """Feed ``data``; on ClientVersionReceived answer with ``decide(machine)`` (accept)."""
    sent = b""
    events = []
    decide = decide or (lambda m: m.accept())

    def handle(new):
        nonlocal sent
        for event in new:
            if isinstance(event, Send):
                sent += event.data
            elif isinstance(event, ClientVersionReceived):
                handle(decide(machine))
            else:
                events.append(event)

    handle(machine.start())
    for chunk in chunks(data) if chunks else [data]:
        if events and isinstance(events[-1], (Failed, ClientInitReceived)) or machine.failed:
            break
        handle(machine.receive(chunk))
    return sent, events


SERVER_SCENARIOS = [
    # (name, client bytes, expected server bytes, expected events)
    (
        "3.8 client",
        b"RFB 003.008\n" + b"\x01" + b"\x01",
        b"RFB 003.008\n" + b"\x01\x01" + u32(0),
        [ClientInitReceived(True, b"")],
    ),
    (
        "3.7 client: no SecurityResult",
        b"RFB 003.007\n" + b"\x01" + b"\x00",
        b"RFB 003.008\n" + b"\x01\x01",
        [ClientInitReceived(False, b"")],
    ),
    (
        "3.3 client: the server imposes None",
        b"RFB 003.003\n" + b"\x01",
        b"RFB 003.008\n" + u32(1),
        [ClientInitReceived(True, b"")],
    ),
    (
        "3.5 client is treated as 3.3",
        b"RFB 003.005\n" + b"\x01",
        b"RFB 003.008\n" + u32(1),
        [ClientInitReceived(True, b"")],
    ),
    (
        "3.889 client is treated as 3.8",
        b"RFB 003.889\n" + b"\x01" + b"\x01",
        b"RFB 003.008\n" + b"\x01\x01" + u32(0),
        [ClientInitReceived(True, b"")],
    ),
    (
        "leftover after ClientInit",
        b"RFB 003.008\n" + b"\x01" + b"\x01" + b"\x02\x00\x00\x01" + u32(7),
        b"RFB 003.008\n" + b"\x01\x01" + u32(0),
        [ClientInitReceived(True, b"\x02\x00\x00\x01" + u32(7))],
    ),
    (
        "3.8 client choosing VncAuth",
        b"RFB 003.008\n" + b"\x02",
        b"RFB 003.008\n" + b"\x01\x01" + u32(1) + reason(b"security type not offered"),
        [Failed("protocol", "client chose security type 2 but only 1 (None) is offered")],
    ),
    (
        "3.7 client choosing VncAuth",
        b"RFB 003.007\n" + b"\x02",
        b"RFB 003.008\n" + b"\x01\x01",
        [Failed("protocol", "client chose security type 2 but only 1 (None) is offered")],
    ),
    (
        "an HTTP request instead of RFB",
        b"GET / HTTP/1.1\r\n",
        b"RFB 003.008\n",
        [Failed("protocol", "client did not send an RFB version: b'G'")],
    ),
    (
        "RFB 4.0 client",
        b"RFB 004.000\n",
        b"RFB 003.008\n",
        [Failed("protocol", "unsupported RFB version b'RFB 004.000\\n'")],
    ),
]


@pytest.mark.parametrize(
    "client, server, events",
    [s[1:] for s in SERVER_SCENARIOS],
    ids=[s[0] for s in SERVER_SCENARIOS],
)
def test_server_scenario(client, server, events):
    for chunks in (None, byte_at_a_time):
        sent, got = drive_server(RfbServerHandshake(), client, chunks)
        if events[-1] == ClientInitReceived(True, b"\x02\x00\x00\x01" + u32(7)) and chunks:
            # Fed byte by byte, the ClientInit byte arrives alone: no leftover yet.
            assert got == [ClientInitReceived(True, b"")]
        elif isinstance(events[-1], Failed) and events[-1].message.endswith("b'G'") and not chunks:
            assert got == [
                Failed("protocol", "client did not send an RFB version: b'GET / HTTP/1'")
            ]
        else:
            assert got == events
        assert sent == server


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=st.sampled_from(SERVER_SCENARIOS), data=st.data())
def test_server_scenario_in_random_chunks(scenario, data):
    _, client, server, events = scenario
    sent, got = drive_server(RfbServerHandshake(), client, _random_splitter(data))
    assert sent == server
    assert type(got[-1]) is type(events[-1])
    if isinstance(events[-1], ClientInitReceived):
        assert got[-1].shared == events[-1].shared
        assert events[-1].leftover.startswith(got[-1].leftover)


def test_server_waits_for_a_decision_after_the_version():
    machine = RfbServerHandshake()
    machine.start()
    # The whole handshake arrives at once: nothing is answered before accept().
    assert machine.receive(b"RFB 003.008\n\x01\x01") == [ClientVersionReceived(8)]
    assert machine.accept() == [Send(b"\x01\x01"), Send(u32(0)), ClientInitReceived(True, b"")]


@pytest.mark.parametrize(
    "version, head",
    [
        (b"RFB 003.008\n", b"\x00"),
        (b"RFB 003.007\n", b"\x00"),
        (b"RFB 003.003\n", u32(0)),
    ],
)
def test_server_rejects_with_a_reason_novnc_shows(version, head):
    machine = RfbServerHandshake()
    sent, events = drive_server(machine, version, decide=lambda m: m.reject("token already used"))
    assert sent == b"RFB 003.008\n" + head + reason(b"token already used")
    assert events == []
    assert machine.receive(b"\x01") == []
    with pytest.raises(RuntimeError):
        RfbServerHandshake().accept()


def test_server_sends_server_init_with_the_vm_name():
    machine = RfbServerHandshake()
    drive_server(machine, b"RFB 003.008\n\x01\x01")
    assert machine.send_server_init(SERVER_INIT, name=b"web-01") == [
        Send(SERVER_INIT.with_name(b"web-01").to_bytes())
    ]


def test_server_sends_server_init_unchanged_without_a_name():
    machine = RfbServerHandshake()
    drive_server(machine, b"RFB 003.003\n\x00")
    assert machine.send_server_init(SERVER_INIT) == [Send(SERVER_INIT_BYTES)]


def test_server_api_misuse_raises():
    machine = RfbServerHandshake()
    with pytest.raises(RuntimeError):
        machine.receive(b"RFB 003.008\n")
    machine.start()
    with pytest.raises(RuntimeError):
        machine.start()
    with pytest.raises(RuntimeError):
        machine.send_server_init(SERVER_INIT)
    machine.receive(b"RFB 003.008\n\x01\x01")
    with pytest.raises(RuntimeError):
        machine.send_server_init(SERVER_INIT)  # still waiting for accept()
    machine.accept()
    with pytest.raises(RuntimeError):
        machine.accept()
    with pytest.raises(RuntimeError):
        machine.receive(b"\x03")
    machine.send_server_init(SERVER_INIT)
    with pytest.raises(RuntimeError):
        machine.send_server_init(SERVER_INIT)


def test_server_after_failure_returns_nothing():
    machine = RfbServerHandshake()
    machine.start()
    assert machine.receive(b"X")[0].kind == "protocol"
    assert machine.failed
    assert machine.receive(b"RFB 003.008\n") == []
    assert machine.send_server_init(SERVER_INIT) == []


@pytest.mark.parametrize("password", [None, PASSWORD])
@pytest.mark.parametrize("shared", [True, False])
def test_our_client_and_our_server_agree(password, shared):
    # cpvm's two halves speak the same protocol: wire them to each other.
    server = RfbServerHandshake()
    client = RfbClientHandshake(password)
    to_client = [e.data for e in server.start()]

    def server_events(new):
        for event in new:
            if isinstance(event, ClientVersionReceived):
                yield from server.accept()
            else:
                yield event

    result = None
    server_done = None
    for _ in range(20):
        to_server = []
        for data in to_client:
            for event in client.receive(data):
                if isinstance(event, Send):
                    to_server.append(event.data)
                elif isinstance(event, SecurityComplete):
                    to_server += [e.data for e in client.send_client_init(shared)]
                elif isinstance(event, ServerInitReceived):
                    result = event
        to_client = []
        for data in to_server:
            for event in server_events(server.receive(data)):
                if isinstance(event, Send):
                    to_client.append(event.data)
                elif isinstance(event, ClientInitReceived):
                    server_done = event
                    to_client += [e.data for e in server.send_server_init(SERVER_INIT, b"vm")]
        if result:
            break
    assert server_done == ClientInitReceived(shared, b"")
    assert result == ServerInitReceived(SERVER_INIT.with_name(b"vm"), b"")
    assert client.minor_version == server.minor_version == 8


# --------------------------------------------------------------------------------------
# ClientInputScanner

SET_PIXEL_FORMAT = b"\x00\x00\x00\x00" + PIXEL_FORMAT
SET_ENCODINGS = b"\x02\x00\x00\x03" + struct.pack(">iii", 7, 0, -223)
FB_UPDATE_REQUEST = b"\x03\x01\x00\x00\x00\x00\x02\xd0\x01\x90"
KEY_EVENT = b"\x04\x01\x00\x00" + u32(0x61)
POINTER_EVENT = b"\x05\x01\x00\x10\x00\x20"
CUT_TEXT = b"\x06\x00\x00\x00" + u32(5) + b"hello"
CONTINUOUS_UPDATES = b"\x96\x01\x00\x00\x00\x00\x02\xd0\x01\x90"
FENCE = b"\xf8\x00\x00\x00" + u32(0x80000002) + b"\x03" + b"abc"
SET_DESKTOP_SIZE = (
    b"\xfb\x00\x04\x00\x03\x00\x02\x00" + (u32(1) + b"\x00" * 8 + u32(0)) + b"\x00" * 16
)
QEMU_KEY = b"\xff\x00\x00\x01" + u32(0x61) + u32(0x1E)
QEMU_AUDIO_ENABLE = b"\xff\x01\x00\x00"
QEMU_AUDIO_DISABLE = b"\xff\x01\x00\x01"
QEMU_AUDIO_FORMAT = b"\xff\x01\x00\x02" + b"\x03\x02" + u32(44100)
XVP = b"\xfa\x00\x01\x02"
# Extended clipboard (negative length): caps is automatic, notify is a user copy.
EXT_CLIPBOARD_CAPS = b"\x06\x00\x00\x00" + struct.pack(">i", -8) + u32(0x0100_0001) + u32(1024)
EXT_CLIPBOARD_NOTIFY = b"\x06\x00\x00\x00" + struct.pack(">i", -4) + u32(0x0800_0001)

SCANNER_MESSAGES = {
    "SetPixelFormat": (SET_PIXEL_FORMAT, 0),
    "SetEncodings": (SET_ENCODINGS, 0),
    "FramebufferUpdateRequest": (FB_UPDATE_REQUEST, 0),
    "KeyEvent": (KEY_EVENT, 1),
    "PointerEvent": (POINTER_EVENT, 1),
    "ClientCutText": (CUT_TEXT, 1),
    "EnableContinuousUpdates": (CONTINUOUS_UPDATES, 0),
    "ClientFence": (FENCE, 0),
    "SetDesktopSize": (SET_DESKTOP_SIZE, 0),
    "QEMU extended key event": (QEMU_KEY, 1),
    "QEMU audio enable": (QEMU_AUDIO_ENABLE, 0),
    "QEMU audio disable": (QEMU_AUDIO_DISABLE, 0),
    "QEMU audio set format": (QEMU_AUDIO_FORMAT, 0),
    "xvp": (XVP, 0),
    "extended clipboard caps": (EXT_CLIPBOARD_CAPS, 0),
    "extended clipboard notify": (EXT_CLIPBOARD_NOTIFY, 1),
}

# A message that follows every test message, to prove the boundary was found exactly.
SENTINEL = KEY_EVENT


@pytest.mark.parametrize("name", SCANNER_MESSAGES)
def test_scanner_counts_each_message_type(name):
    message, inputs = SCANNER_MESSAGES[name]
    scanner = ClientInputScanner()
    assert scanner.feed(message) == inputs
    assert scanner.feed(SENTINEL) == 1
    assert not scanner.desynchronised


@pytest.mark.parametrize("name", SCANNER_MESSAGES)
def test_scanner_counts_each_message_type_byte_at_a_time(name):
    message, inputs = SCANNER_MESSAGES[name]
    scanner = ClientInputScanner()
    assert sum(scanner.feed(b) for b in byte_at_a_time(message + SENTINEL)) == inputs + 1
    assert not scanner.desynchronised


def test_scanner_accepts_memoryview_and_bytearray():
    scanner = ClientInputScanner()
    assert scanner.feed(memoryview(KEY_EVENT + CUT_TEXT)) == 2
    assert scanner.feed(bytearray(POINTER_EVENT)) == 1


def test_scanner_typical_novnc_start_is_not_input():
    scanner = ClientInputScanner()
    stream = SET_PIXEL_FORMAT + SET_ENCODINGS + FB_UPDATE_REQUEST + FENCE + CONTINUOUS_UPDATES
    assert scanner.feed(stream * 50) == 0


def test_scanner_big_cut_text_is_skipped_without_buffering():
    size = 20 * 1024 * 1024
    scanner = ClientInputScanner()
    assert scanner.feed(b"\x06\x00\x00\x00" + u32(size)) == 1
    chunk = b"x" * 65536
    for _ in range(size // len(chunk)):
        assert scanner.feed(chunk) == 0
    assert not scanner._framer._header  # nothing kept from the payload
    assert scanner.feed(FB_UPDATE_REQUEST + KEY_EVENT) == 1
    assert not scanner.desynchronised


def test_scanner_cut_text_with_the_payload_in_the_same_chunk():
    scanner = ClientInputScanner()
    text = b"\x04\x05" * 1000  # bytes that look like KeyEvent/PointerEvent types
    assert scanner.feed(b"\x06\x00\x00\x00" + u32(len(text)) + text + POINTER_EVENT) == 2


def test_scanner_unknown_type_desynchronises_for_good():
    scanner = ClientInputScanner()
    assert scanner.feed(KEY_EVENT + b"\x07" + KEY_EVENT) == 1
    assert scanner.desynchronised
    assert scanner.unknown_type == 7
    assert scanner.feed(KEY_EVENT) == 0


@pytest.mark.parametrize(
    "message, unknown",
    [(b"\xff\x02\x00\x00", 255), (b"\xff\x01\x00\x07", 255)],
    ids=["unknown QEMU submessage", "unknown QEMU audio operation"],
)
def test_scanner_unknown_qemu_messages_desynchronise(message, unknown):
    scanner = ClientInputScanner()
    assert scanner.feed(POINTER_EVENT + message + KEY_EVENT) == 1
    assert scanner.desynchronised
    assert scanner.unknown_type == unknown


def test_scanner_empty_feed():
    scanner = ClientInputScanner()
    assert scanner.feed(b"") == 0
    assert scanner.feed(KEY_EVENT[:3]) == 1  # counted as soon as the type is seen
    assert scanner.feed(b"") == 0
    assert scanner.feed(KEY_EVENT[3:]) == 0


@settings(max_examples=200, deadline=None)
@given(
    names=st.lists(st.sampled_from(sorted(SCANNER_MESSAGES)), max_size=40),
    data=st.data(),
)
def test_scanner_counts_any_stream_in_any_chunks(names, data):
    stream = b"".join(SCANNER_MESSAGES[n][0] for n in names)
    expected = sum(SCANNER_MESSAGES[n][1] for n in names)
    scanner = ClientInputScanner()
    total = sum(scanner.feed(chunk) for chunk in _random_splitter(data)(stream))
    assert total == expected
    assert not scanner.desynchronised
    assert scanner.at_boundary  # exactly at a message boundary


# --------------------------------------------------------------------------------------
# require_tls: the manager says this VM's VNC must be reached over VeNCrypt TLS


@pytest.mark.parametrize(
    "server_bytes, what",
    [
        (b"RFB 003.008\n" + b"\x01\x02", "plain VncAuth only"),
        (b"RFB 003.008\n" + b"\x02\x01\x02", "None and VncAuth"),
        (b"RFB 003.003\n" + u32(2), "RFB 3.3 imposing VncAuth"),
    ],
)
def test_require_tls_refuses_plain_security(server_bytes, what):
    outcome = drive_client(RfbClientHandshake(PASSWORD, require_tls=True), [server_bytes])
    assert isinstance(outcome.last, Failed), what
    assert outcome.last.kind == "unsupported-security"
    assert "TLS is required" in outcome.last.message


def test_require_tls_refuses_plain_vencrypt_subtypes():
    server = b"RFB 003.008\n" + b"\x01\x13" + b"\x00\x02" + b"\x00" + b"\x02" + u32(2) + u32(1)
    outcome = drive_client(RfbClientHandshake(PASSWORD, require_tls=True), [server])
    assert isinstance(outcome.last, Failed)
    assert "TLS is required" in outcome.last.message


def test_require_tls_takes_x509vnc():
    server = (
        b"RFB 003.008\n"
        + b"\x01\x13"
        + b"\x00\x02"
        + b"\x00"
        + b"\x02"
        + u32(2)
        + u32(261)
        + b"\x01"
    )
    outcome = drive_client(RfbClientHandshake(PASSWORD, require_tls=True), [server])
    assert StartTLS(anonymous=False) in outcome.events
    assert outcome.sent.endswith(u32(261))


def test_without_a_ca_x509_subtypes_are_skipped_for_plain_vnc_auth():
    # TigerVNC "X509Vnc,VncAuth": [19, 2] with VeNCrypt subtypes [261, 2].
    server = (
        b"RFB 003.008\n" + b"\x02\x13\x02" + b"\x00\x02" + b"\x00" + b"\x02" + u32(261) + u32(2)
    )
    outcome = drive_client(RfbClientHandshake(PASSWORD, allow_x509=False), [server])
    assert outcome.sent.endswith(u32(2))
    assert StartTLS(anonymous=False) not in outcome.events
