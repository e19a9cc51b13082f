"""cpvm.proxy.fastwrite on a real Twisted TCP transport whose socket takes only part of
what it is given: the rest is queued behind it, in order, nothing lost or sent twice."""

from __future__ import annotations

import errno

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import main, tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport

from cpvm.proxy import fastwrite


class StingySocket:
    """A non-blocking socket whose kernel buffer takes ``budgets[i]`` bytes at call i
    (``0``: EAGAIN), then everything; it records what it accepted, in order."""

    def __init__(self, budgets=()):
        self.budgets = list(budgets)
        self.accepted = bytearray()
        self.calls: list[tuple[str, int]] = []  # (method, number of buffers)
        self.error: OSError | None = None

    def fileno(self) -> int:
        return 99

    def setblocking(self, flag) -> None:
        pass

    def _take(self, data: bytes) -> int:
        if self.error is not None:
            raise self.error
        budget = self.budgets.pop(0) if self.budgets else len(data)
        if budget == 0:
            raise BlockingIOError(errno.EAGAIN, "would block")
        taken = bytes(data[:budget])
        self.accepted += taken
        return len(taken)

    def send(self, data) -> int:
        self.calls.append(("send", 1))
        return self._take(bytes(data))

    def sendmsg(self, buffers) -> int:
        buffers = tuple(buffers)
        self.calls.append(("sendmsg", len(buffers)))
        return self._take(b"".join(buffers))


def tcp_transport(sock: StingySocket) -> tuple[tcp.Server, MemoryReactor]:
    """A real ``tcp.Server`` (what cpvm's relay writes to) over the stingy socket."""
    reactor = MemoryReactor()
    transport = tcp.Server(sock, Protocol(), ("192.0.2.7", 50000), None, 1, reactor)
    return transport, reactor


def drain(transport: tcp.Server, reactor: MemoryReactor) -> None:
    """What the reactor does while the socket is writable: write out the queue."""
    for _ in range(10_000):
        if transport not in reactor.getWriters():
            return
        transport.doWrite()
    raise AssertionError("the transport never finished writing")


@pytest.mark.parametrize("budget", [0, 1, 5, 9, 10])
def test_write_partial_send_queues_the_rest(budget):
    sock = StingySocket([budget, 3])
    transport, reactor = tcp_transport(sock)
    fastwrite.write(transport, b"0123456789")
    assert bytes(sock.accepted) == b"0123456789"[:budget]
    # Whatever the kernel did not take waits for writability, not lost.
    assert (transport in reactor.getWriters()) == (budget < 10)
    drain(transport, reactor)
    assert bytes(sock.accepted) == b"0123456789"


def test_nothing_overtakes_queued_bytes():
    sock = StingySocket([4])
    transport, reactor = tcp_transport(sock)
    fastwrite.write(transport, b"first-")
    calls = len(sock.calls)
    fastwrite.write(transport, b"second-")
    fastwrite.write_frame(transport, b"H", b"third")
    # Bytes are queued ahead: the later writes must not go to the socket directly.
    assert len(sock.calls) == calls
    drain(transport, reactor)
    assert bytes(sock.accepted) == b"first-second-Hthird"


@pytest.mark.parametrize("budget", range(0, 9))
def test_write_frame_gathers_header_and_payload(budget):
    header, payload = b"\x82\x03", b"abcdef"
    sock = StingySocket([budget])
    transport, reactor = tcp_transport(sock)
    fastwrite.write_frame(transport, header, payload)
    assert sock.calls[0] == ("sendmsg", 2)  # one system call, the two parts not joined
    drain(transport, reactor)
    assert bytes(sock.accepted) == header + payload


def test_socket_error_leaves_the_bytes_to_twisted():
    sock = StingySocket()
    sock.error = ConnectionResetError(errno.ECONNRESET, "reset")
    transport, reactor = tcp_transport(sock)
    fastwrite.write(transport, b"data")
    fastwrite.write_frame(transport, b"H", b"payload")
    # Queued on Twisted's own path, which meets the error when writing and tells the
    # reactor to close the connection.
    assert transport in reactor.getWriters()
    assert transport.doWrite() is main.CONNECTION_LOST
    sock.error = None  # (had the error been passing, nothing was lost)
    drain(transport, reactor)
    assert bytes(sock.accepted) == b"dataHpayload"


def test_other_transports_take_the_ordinary_path():
    plain = StringTransport()
    fastwrite.write(plain, b"abc")
    fastwrite.write_frame(plain, b"H", b"xyz")
    assert plain.value() == b"abcHxyz"


class TlsLayer(Protocol):
    """Stands for the TLS protocol that sits on a transport after ``startTLS``."""

    def __init__(self):
        self.plaintext = b""

    def write(self, data):
        self.plaintext += data


def test_tls_or_closing_tcp_transports_are_not_bypassed():
    sock = StingySocket()
    transport, reactor = tcp_transport(sock)
    layer = TlsLayer()
    transport.protocol = layer
    transport.TLS = True  # after startTLS (VeNCrypt) the transport encrypts in write()
    fastwrite.write(transport, b"secret")
    assert sock.calls == [] and layer.plaintext == b"secret"
    transport.TLS = False
    transport.disconnecting = True
    fastwrite.write_frame(transport, b"H", b"late")
    assert sock.calls == []


writes = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.binary(max_size=40)),
        st.tuples(st.just("frame"), st.binary(min_size=1, max_size=10), st.binary(max_size=40)),
        st.tuples(st.just("drain")),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(writes, st.lists(st.integers(0, 50), max_size=40))
def test_any_mix_of_writes_arrives_whole_and_in_order(ops, budgets):
    sock = StingySocket(budgets)
    transport, reactor = tcp_transport(sock)
    expected = b""
    for op in ops:
        if op[0] == "write":
            fastwrite.write(transport, op[1])
            expected += op[1]
        elif op[0] == "frame":
            fastwrite.write_frame(transport, op[1], op[2])
            expected += op[1] + op[2]
        else:
            drain(transport, reactor)
    drain(transport, reactor)
    assert bytes(sock.accepted) == expected
