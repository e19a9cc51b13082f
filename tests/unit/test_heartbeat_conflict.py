"""cpvm's heartbeat when the manager says another instance holds our proxy key."""

from __future__ import annotations

from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher

from cpvm.proxy.heartbeat import Heartbeat
from cpvm.proxy.manager_client import InstanceConflict, ManagerUnavailable
from cpvm.proxy.metrics import ProxyMetrics


class Sessions:
    """What Heartbeat uses of SessionRegistry."""

    def __init__(self):
        self.metrics = ProxyMetrics()
        self.given_back: list[list[dict]] = []
        self.ended = [{"session_id": "s-1", "reason": "client_closed"}]

    def count_relayed(self):
        pass

    def take_ended(self):
        taken, self.ended = self.ended, []
        return taken

    def give_back_ended(self, reports):
        self.given_back.append(reports)
        self.ended = reports + self.ended

    def heartbeat_payload(self):
        return {}

    def terminate(self, ids):
        return 0

    @property
    def ended_waiting(self):
        return len(self.ended)


class Manager:
    key_id = "0a1b2c3d"

    def __init__(self):
        self.answers = []

    def heartbeat(self, payload):
        return self.answers.pop(0)


def test_conflict_is_an_error_once_and_clears_when_accepted():
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        clock, manager, sessions = Clock(), Manager(), Sessions()
        hb = Heartbeat(clock, manager, sessions, 1.0)
        conflict = InstanceConflict("proxy key 0a1b2c3d is in use")
        manager.answers = [
            fail(conflict),
            fail(conflict),
            succeed({"terminate": []}),
            fail(ManagerUnavailable("down")),
        ]
        hb.beat()
        assert hb.conflict and not hb.manager_reachable
        assert sessions.given_back  # end reports wait for an accepted beat
        hb.beat()
        errors = [e for e in events if e.get("log_level") == LogLevel.error]
        assert len(errors) == 1 and errors[0]["key_id"] == "0a1b2c3d"
        hb.beat()
        assert not hb.conflict and hb.manager_reachable
        hb.beat()  # a plain failure is not a conflict
        assert not hb.conflict and not hb.manager_reachable
    finally:
        globalLogPublisher.removeObserver(events.append)
