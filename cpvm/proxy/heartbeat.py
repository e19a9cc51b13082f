"""The heartbeat: registers this cpvm with the manager, carries the sessions' end reports
and learns which sessions an administrator terminated."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from cpvm.common.contract import Outcome
from cpvm.proxy.manager_client import InstanceConflict, ManagerClient
from cpvm.proxy.registry import SessionRegistry

# How soon an end report that cannot wait goes out (soon()): well before a browser's retry
# (noVNC waits seconds before it reconnects), and late enough that the ends of a burst share
# one beat instead of costing the manager and this process one beat each.
SOON = 0.25


class Heartbeat(Service):
    """Registers this cpvm with the manager and learns which sessions to terminate.

    Beats never overlap: the next one is scheduled when the previous one has answered
    (or failed), at the interval the manager asks for.
    """

    _log = Logger()

    def __init__(self, reactor, manager: ManagerClient, sessions: SessionRegistry, interval: float):
        self._reactor = reactor
        self._manager = manager
        self._sessions = sessions
        self.interval = interval
        self.manager_reachable = False
        # The manager refuses us: our proxy key is bound to another live cpvm instance.
        self.conflict = False
        self._next = None
        # soon() was called while a beat was in flight: the next one goes SOON after it.
        self._again = False

    def startService(self):  # noqa: N802
        super().startService()
        self._next = self._reactor.callLater(0, self.beat)

    def stopService(self):  # noqa: N802
        super().stopService()
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None

    def beat(self) -> Deferred:
        self._next = None
        # Other workers' scrapes see this process's live byte counts as of its last beat.
        self._sessions.count_relayed()
        ended = self._sessions.take_ended()
        payload = {**self._sessions.heartbeat_payload(), "ended": ended}
        recordings = getattr(self._sessions, "recordings", None)
        deleted = recordings.take_deleted() if recordings is not None else []
        if deleted:  # the retention removed these recordings (docs/recording.md)
            payload["recordings_deleted"] = deleted
        d = self._manager.heartbeat(payload)
        d.addCallbacks(self._answered, self._failed, errbackArgs=(ended, deleted))
        d.addBoth(self._schedule)
        return d

    def soon(self) -> None:
        """Beat within :data:`SOON` rather than at the interval: an end report is waiting
        that the manager needs promptly (an unclean end, which the same browser may resume
        only once the manager has recorded it). Beats still never overlap: with one in
        flight, the next follows :data:`SOON` after it answers."""
        if not self.running:
            return
        if self._next is None:  # a beat is in flight
            self._again = True
            return
        if self._next.active() and self._next.getTime() > self._reactor.seconds() + SOON:
            self._next.reset(SOON)

    def flush(self, grace: float) -> Deferred:
        """At shutdown: one last beat carrying the remaining end reports, within ``grace``
        (recorded sessions' reports wait for their files to be on disk)."""
        recordings = getattr(self._sessions, "recordings", None)
        d = recordings.settled() if recordings is not None else succeed(None)
        d.addCallback(lambda _: self.beat() if self._sessions.ended_waiting else None)
        d.addTimeout(max(grace, 0.1), self._reactor)
        d.addErrback(lambda _: None)
        return d

    def _answered(self, answer: dict) -> None:
        if not self.manager_reachable:
            self._log.info("manager reachable")
        if self.conflict:
            self._log.info(
                "manager accepts this instance for proxy key {key_id} again",
                key_id=self._manager.key_id,
            )
        self.manager_reachable = True
        self.conflict = False
        interval = answer.get("heartbeat_interval")
        if isinstance(interval, (int, float)) and not isinstance(interval, bool):
            self.interval = min(max(float(interval), 0.5), 300.0)
        # Taken over first: they are in "terminate" too (for older proxies), and each
        # should close with its own code, 4023.
        taken = answer.get("taken_over") or []
        if isinstance(taken, list) and taken:
            n = self._sessions.terminate(taken, Outcome.TAKEN_OVER, "taken over (heartbeat)")
            if n:
                self._log.info("{count} session(s) here were taken over", count=n)
        terminate = answer.get("terminate") or []
        if isinstance(terminate, list) and terminate:
            n = self._sessions.terminate(terminate)
            if n:
                self._log.info("manager asked to terminate {count} session(s) here", count=n)

    def _failed(self, failure: Failure, ended: list[dict], deleted: list[str]) -> None:
        self._sessions.give_back_ended(ended)
        recordings = getattr(self._sessions, "recordings", None)
        if deleted and recordings is not None:
            recordings.give_back_deleted(deleted)
        if failure.check(InstanceConflict):
            if not self.conflict:
                # An operator's mistake (one key on two running proxies), not a network
                # blip: an error, once per episode; /readyz says so meanwhile.
                self._log.error(
                    "manager refused the heartbeat: proxy key {key_id} is in use by another "
                    "running cpvm instance; give each proxy its own key "
                    "(cpvm-manager-admin proxy list shows both)",
                    key_id=self._manager.key_id,
                )
            self.conflict = True
        else:
            self.conflict = False  # unknown now; "manager not reachable" says the rest
            if self.manager_reachable:
                self._log.warn("manager heartbeat failed: {why}", why=str(failure.value))
        self.manager_reachable = False
        self._sessions.metrics.manager_failures.labels(call="heartbeat").inc()

    def _schedule(self, _) -> None:
        if self.running:
            delay = min(SOON, self.interval) if self._again else self.interval
            self._again = False
            self._next = self._reactor.callLater(delay, self.beat)
