"""The heartbeat in memory: a ``Clock``, a real ``ManagerClient`` over ``StubTreq`` (or a
real Agent over a memory reactor), real ``SessionRegistry`` whose sessions really end.

What is checked: the interval the manager asks for is clamped; a manager that is down or
broken marks it unreachable and beats are retried at the interval; end reports ride on a
beat, come back when it fails and are not sent twice when it succeeds; the queue of end
reports is bounded.
"""

from __future__ import annotations

import json

import pytest
from treq.testing import StubTreq
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from cpvm.common.contract import Outcome
from cpvm.common.inifile import IniReader
from cpvm.proxy import end_reports, registry
from cpvm.proxy.config import parse_config
from cpvm.proxy.heartbeat import SOON, Heartbeat
from cpvm.proxy.manager_client import ManagerClient
from cpvm.proxy.metrics import ProxyMetrics
from cpvm.proxy.registry import SessionRegistry
from cpvm.proxy.tap import registry_settings

CONFIG = parse_config(
    IniReader(
        "cpvm.conf",
        text=(
            "[server]\npublic_host = console.example.com\nport = 8080\n"
            # StubTreq never leaves the process: plain HTTP to a made-up host is fine here.
            "[manager]\nurl = http://manager.invalid:8250\nallow_plaintext = true\ntimeout = 2\n"
            "heartbeat_interval = 5\n"
        ),
    )
)


def redemption(session_id: str) -> dict:
    return {
        "session_id": session_id,
        "vm": {"id": "vm-1", "name": "web-01"},
        "vnc": {"host": "127.0.0.1", "port": 5901, "password": "pw", "tls": "none"},
        "limits": {},
    }


class ManagerStub(Resource):
    """The manager's proxy API: redeems every token, answers beats from ``answers``
    (``(status, body)``, or ``"hang"`` for a beat that never gets an answer)."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.beats: list[dict] = []
        self.answers: list = []
        self.redeemed = 0

    def render_POST(self, request):  # noqa: N802
        body = json.loads(request.content.read())
        if request.path == b"/proxy/v1/redeem":
            self.redeemed += 1
            return self._json(request, 200, redemption(f"s-{self.redeemed}"))
        assert request.path == b"/proxy/v1/heartbeat"
        self.beats.append(body)
        answer = self.answers.pop(0) if self.answers else (200, {})
        if answer == "hang":
            return NOT_DONE_YET
        return self._json(request, *answer)

    @staticmethod
    def _json(request, status: int, body: dict) -> bytes:
        request.setResponseCode(status)
        return json.dumps(body).encode()

    def ended_ids(self, beat: int) -> list[str]:
        return [r["session_id"] for r in self.beats[beat]["ended"]]


class Browser:
    """The WebSocket side of a session: only what a session calls on it."""

    def __init__(self):
        self.transport = StringTransport()
        self.closed = None

    def send(self, data):
        pass

    def close(self, code, reason):
        self.closed = (code, reason)


class Proxy:
    """One cpvm process's sessions and heartbeat on a memory reactor and a stub manager."""

    def __init__(self, stub: ManagerStub | None = None, http=None):
        self.reactor = MemoryReactorClock()
        self.stub = stub or ManagerStub()
        self.http = http if http is not None else StubTreq(self.stub)
        self.manager = ManagerClient(
            self.reactor,
            CONFIG.manager.url,
            "cpvmk_p1.s3cret",
            CONFIG.manager.timeout,
            http=self.http,
        )
        self.sessions = SessionRegistry(
            self.reactor, registry_settings(CONFIG), self.manager, ProxyMetrics()
        )
        self.heartbeat = Heartbeat(
            self.reactor, self.manager, self.sessions, CONFIG.manager.heartbeat_interval
        )

    def advance(self, seconds: float = 0) -> None:
        self.reactor.advance(seconds)
        self.http.flush()

    def end_sessions(self, count: int, outcome: Outcome = Outcome.CLIENT_CLOSED) -> None:
        """Open ``count`` sessions (their tokens redeemed) and end them: end reports queue."""
        for _ in range(count):
            # A well-shaped token: cpvm refuses any other without asking the manager.
            session = self.sessions.create(Browser(), "t" * 43, None, "192.0.2.7")
            session.start()
            self.http.flush()
            assert session.session_id is not None  # redeemed, connecting upstream
            session.terminate(outcome, "test")

    def next_beat_in(self) -> float:
        calls = [c for c in self.reactor.getDelayedCalls() if c.func == self.heartbeat.beat]
        assert len(calls) == 1, calls
        return calls[0].getTime() - self.reactor.seconds()


@pytest.fixture
def log_events():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_first_beat_at_start_then_at_the_interval():
    p = Proxy()
    p.heartbeat.startService()
    assert p.next_beat_in() == 0
    p.advance(0)
    assert len(p.stub.beats) == 1
    beat = p.stub.beats[0]
    assert (beat["public_host"], beat["public_port"], beat["tls"]) == (
        "console.example.com",
        8080,
        False,
    )
    assert beat["ended"] == [] and beat["active_sessions"] == [] and beat["worker"] == 0
    assert p.heartbeat.manager_reachable
    assert p.next_beat_in() == 5
    p.advance(5)
    assert len(p.stub.beats) == 2
    p.heartbeat.stopService()
    assert p.reactor.getDelayedCalls() == []


def test_soon_beats_within_soon_and_never_overlaps_a_beat_in_flight():
    p = Proxy()
    p.stub.answers = [(200, {}), "hang"]
    p.heartbeat.soon()  # not running: nothing scheduled
    assert p.reactor.getDelayedCalls() == []
    p.heartbeat.startService()
    p.advance(0)
    assert p.next_beat_in() == 5
    p.heartbeat.soon()
    assert p.next_beat_in() == pytest.approx(SOON)
    p.heartbeat.soon()  # a burst of ends shares that one beat
    assert len(p.reactor.getDelayedCalls()) == 1
    p.advance(SOON)
    assert len(p.stub.beats) == 2  # the second beat hangs: in flight
    p.heartbeat.soon()
    p.heartbeat.soon()
    p.advance(1)
    assert len(p.stub.beats) == 2  # no second beat beside the one in flight
    # It times out; the beat asked for follows SOON after, not an interval later.
    p.advance(CONFIG.manager.timeout - 1)
    assert len(p.stub.beats) == 2 and p.next_beat_in() == pytest.approx(SOON)
    p.advance(SOON)
    assert len(p.stub.beats) == 3 and p.next_beat_in() == 5
    p.heartbeat.stopService()


@pytest.mark.parametrize(
    "asked, interval",
    [
        (0.01, 0.5),
        (0, 0.5),
        (-3, 0.5),  # a manager cannot make cpvm beat in a loop
        (10_000, 300.0),  # nor fall silent for hours
        (12, 12.0),
        (2.5, 2.5),
        ("1", 5.0),
        (True, 5.0),
        (None, 5.0),  # not a number: the configured interval stays
    ],
)
def test_interval_the_manager_asks_for_is_clamped(asked, interval):
    p = Proxy()
    answer = {} if asked is None else {"heartbeat_interval": asked}
    p.stub.answers = [(200, answer)]
    p.heartbeat.startService()
    p.advance(0)
    assert p.heartbeat.interval == interval
    assert p.next_beat_in() == interval


def test_manager_errors_mark_it_unreachable_and_beats_are_retried(log_events):
    p = Proxy()
    p.stub.answers = [(200, {}), (503, {"error": "busy"}), (500, {}), (200, {})]
    p.heartbeat.startService()
    p.advance(0)
    assert p.heartbeat.manager_reachable
    p.advance(5)
    assert not p.heartbeat.manager_reachable
    assert p.next_beat_in() == 5  # retried at the interval, not given up
    p.advance(5)
    assert not p.heartbeat.manager_reachable and len(p.stub.beats) == 3
    assert (
        p.sessions.metrics.registry.get_sample_value(
            "cpvm_manager_failures_total", {"call": "heartbeat"}
        )
        == 2
    )
    # One warning when it goes away, not one per failed beat; one line when it is back.
    warnings = [
        e for e in log_events if e.get("log_format", "").startswith("manager heartbeat failed")
    ]
    assert len(warnings) == 1 and "503" in warnings[0]["why"]
    p.advance(5)
    assert p.heartbeat.manager_reachable
    assert [e["log_format"] for e in log_events].count("manager reachable") == 2


def test_manager_that_never_answers_times_out_and_the_beat_is_retried():
    p = Proxy()
    p.stub.answers = ["hang", (200, {})]
    p.heartbeat.startService()
    p.advance(0)
    assert len(p.stub.beats) == 1
    # No overlapping beats while one is outstanding, however long it takes.
    assert [c for c in p.reactor.getDelayedCalls() if c.func == p.heartbeat.beat] == []
    p.advance(CONFIG.manager.timeout)
    assert not p.heartbeat.manager_reachable
    assert p.next_beat_in() == 5
    p.advance(5)
    assert p.heartbeat.manager_reachable and len(p.stub.beats) == 2


def test_manager_up_then_down_through_a_real_agent():
    # No stub: ManagerClient's own Agent over the memory reactor, on the wire.
    reactor = MemoryReactorClock()
    manager = ManagerClient(reactor, CONFIG.manager.url, "cpvmk_p1.s3cret", CONFIG.manager.timeout)
    sessions = SessionRegistry(reactor, registry_settings(CONFIG), manager, ProxyMetrics())
    heartbeat = Heartbeat(reactor, manager, sessions, CONFIG.manager.heartbeat_interval)
    heartbeat.startService()
    reactor.advance(0)
    host, port, factory = reactor.tcpClients[0][:3]
    # (The memory reactor's resolver answers 127.0.0.1 for every name.)
    assert (host, port) == ("127.0.0.1", 8250)
    wire = StringTransport()
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(wire)
    request = wire.value()
    assert request.startswith(b"POST /proxy/v1/heartbeat HTTP/1.1\r\n")
    assert b"Authorization: Bearer cpvmk_p1.s3cret\r\n" in request
    protocol.dataReceived(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b'Content-Length: 27\r\n\r\n{"heartbeat_interval": 7.5}'
    )
    assert heartbeat.manager_reachable and heartbeat.interval == 7.5
    # The manager goes away: the persistent connection drops, the next one is refused.
    protocol.connectionLost(Failure(ConnectionRefusedError()))
    reactor.advance(7.5)
    factory = reactor.tcpClients[1][2]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    reactor.advance(0.3)  # HostnameEndpoint's next attempt finds no address left
    assert not heartbeat.manager_reachable
    assert [c.func for c in reactor.getDelayedCalls()].count(heartbeat.beat) == 1
    heartbeat.stopService()


def test_failed_beat_gives_its_end_reports_back_in_order():
    p = Proxy()
    p.stub.answers = [(503, {}), "hang", (200, {}), (200, {})]
    p.end_sessions(2)
    p.heartbeat.startService()
    p.advance(0)  # beat 0: s-1, s-2, refused
    assert p.stub.ended_ids(0) == ["s-1", "s-2"]
    assert p.sessions.ended_waiting == 2
    p.advance(5)  # beat 1: the same two, no answer yet ...
    assert p.stub.ended_ids(1) == ["s-1", "s-2"]
    assert p.sessions.ended_waiting == 0
    p.end_sessions(1)  # ... while s-3 ends
    p.advance(CONFIG.manager.timeout)  # beat 1 times out: its reports go back first
    assert p.sessions.ended_waiting == 3
    p.advance(5)
    assert p.stub.ended_ids(2) == ["s-1", "s-2", "s-3"]
    report = p.stub.beats[2]["ended"][0]
    assert report["reason"] == "client_closed" and report["client_address"] == "192.0.2.7"
    p.advance(5)  # accepted: never sent again
    assert p.stub.ended_ids(3) == []
    assert p.sessions.ended_waiting == 0


@pytest.mark.parametrize(
    "outcome, at_once",
    [
        (Outcome.CLIENT_LOST, True),
        (Outcome.SHUTDOWN, True),
        (Outcome.CLIENT_CLOSED, False),
        (Outcome.IDLE_TIMEOUT, False),
    ],
)
def test_an_unclean_end_is_reported_at_once(outcome, at_once):
    p = Proxy()
    p.sessions.ends.on_unclean = p.heartbeat.soon  # as the wiring does
    p.heartbeat.startService()
    p.advance(0)
    p.end_sessions(1, outcome)
    assert p.next_beat_in() == pytest.approx(SOON if at_once else 5)
    p.advance(SOON if at_once else 5)
    (report,) = p.stub.beats[1]["ended"]
    assert report["reason"] == outcome.report and report["reconnects"] == 0
    p.heartbeat.stopService()


def test_end_reports_ride_in_batches():
    p = Proxy()
    p.end_sessions(registry.ENDS_PER_HEARTBEAT + 2)
    p.heartbeat.startService()
    p.advance(0)
    assert len(p.stub.beats[0]["ended"]) == registry.ENDS_PER_HEARTBEAT
    assert p.sessions.ended_waiting == 2
    p.advance(5)
    assert p.stub.ended_ids(1) == [f"s-{registry.ENDS_PER_HEARTBEAT + i}" for i in (1, 2)]


def test_queue_of_end_reports_is_bounded(monkeypatch, log_events):
    # A manager away for long: the oldest reports are dropped, with a line each.
    monkeypatch.setattr(end_reports, "MAX_QUEUED_ENDS", 3)
    p = Proxy()
    p.stub.answers = [(503, {}), (200, {})]
    p.end_sessions(2)
    p.heartbeat.startService()
    p.advance(0)  # refused: s-1 and s-2 are queued again
    p.end_sessions(3)  # s-3 .. s-5: s-1 and s-2 make way
    assert p.sessions.ended_waiting == 3
    dropped = [
        e["session"] for e in log_events if "dropped the end report" in e.get("log_format", "")
    ]
    assert dropped == ["s-1", "s-2"]
    p.advance(5)
    assert p.stub.ended_ids(1) == ["s-3", "s-4", "s-5"]


def test_flush_at_shutdown_sends_what_is_waiting_within_the_grace():
    p = Proxy()
    p.stub.answers = ["hang"]
    p.end_sessions(1)
    d = p.heartbeat.flush(grace=1.0)
    p.http.flush()
    assert p.stub.ended_ids(0) == ["s-1"]
    fired = []
    d.addBoth(fired.append)
    p.advance(1.0)  # the grace period ends before the manager's timeout
    assert fired == [None]
    assert p.sessions.ended_waiting == 1  # given back: still queued, not lost
    # Nothing waiting: no beat at all.
    p.sessions.take_ended()
    assert p.heartbeat.flush(grace=1.0).called and len(p.stub.beats) == 1


def test_terminate_answer_ends_the_named_sessions_here():
    p = Proxy()
    session = p.sessions.create(Browser(), "t" * 43, None, "192.0.2.7")
    session.start()
    p.http.flush()
    p.stub.answers = [(200, {"terminate": [session.session_id, "s-elsewhere", 7]})]
    p.heartbeat.startService()
    p.advance(0)
    assert p.stub.beats[0]["active_sessions"] == ["s-1"]
    assert session.outcome is Outcome.TERMINATED
    assert p.sessions.ended_waiting == 1


def test_taken_over_sessions_close_with_their_own_code():
    p = Proxy()
    session = p.sessions.create(Browser(), "t" * 43, None, "192.0.2.7")
    session.start()
    p.http.flush()
    # In both lists, as the manager sends them (an older cpvm reads only "terminate").
    sid = session.session_id
    p.stub.answers = [(200, {"terminate": [sid], "taken_over": [sid, "s-elsewhere"]})]
    p.heartbeat.startService()
    p.advance(0)
    assert session.outcome is Outcome.TAKEN_OVER
