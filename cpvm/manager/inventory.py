"""libvirt discovery: each ``[inventory.libvirt.NAME]`` host's domains kept in the registry.

Every libvirt call blocks (a remote host can hang for a TCP timeout), so each host has its
own daemon thread (:class:`BlockingWorker`) doing its calls in order, and the reactor only
waits for their answers, bounded by the source's ``timeout``. libvirt delivers lifecycle
events and keepalives through its default event loop, run by one more daemon thread.

A sync lists every domain, reads its VNC settings from the secure XML and applies the
list to the database in one transaction (:func:`cpvm.manager.inventory_sync.sync_source`).
It runs at start, every ``sync_interval`` seconds, and shortly after any lifecycle event
(started, stopped, defined, undefined, ...), so states follow within a second or so. A
host that cannot be reached, or answers slower than ``timeout``, makes its VMs
``Unknown``; the next sync tries again with a new connection.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cpvm.manager import inventory_sync, vms
from cpvm.manager.db import Database
from cpvm.manager.inventory_config import LibvirtSourceConfig
from cpvm.manager.libvirt_domains import Domain, domain_from
from cpvm.manager.secrets_box import SecretBox

EVENT_DELAY = 0.2  # coalesce a burst of events into one sync
_event_loop_lock = threading.Lock()
_event_loop_started = False


def load_libvirt() -> Any:
    """The libvirt binding (Debian: python3-libvirt; PyPI: libvirt-python), imported only
    when a source is configured."""
    import libvirt  # type: ignore[import-not-found]

    return libvirt


def ensure_event_loop(libvirt: Any) -> None:
    """libvirt's default event loop, once per process, before the first connection: it
    carries domain events and keepalives."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        # libvirt prints every error to stderr by default; the watchers log what matters.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


class BlockingWorker:
    """One daemon thread running blocking calls in order; :meth:`call` answers with a
    Deferred fired in the reactor thread. A daemon thread never holds up the manager's
    stop, even inside a call that hangs."""

    def __init__(self, reactor: Any, name: str):
        self._reactor = reactor
        self._queue: queue.Queue[Any] = queue.Queue()
        self.busy = 0  # calls submitted and not finished (the reactor thread's count)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., Any], *args: Any) -> Deferred:
        d: Deferred = Deferred()
        self.busy += 1
        self._queue.put((d, fn, args))
        return d

    def stop(self) -> None:
        self._queue.put(None)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            d, fn, args = item
            try:
                result, ok = fn(*args), True
            except BaseException as e:  # handed to the Deferred, in the reactor thread
                result, ok = e, False
            self._reactor.callFromThread(self._fire, d, ok, result)

    def _fire(self, d: Deferred, ok: bool, result: Any) -> None:
        self.busy -= 1
        if d.called:
            return  # timed out meanwhile: the answer comes too late
        if ok:
            d.callback(result)
        else:
            d.errback(result)


class LibvirtConnection:
    """The worker thread's side: one connection to a host, reopened when it died.

    Every method runs in the source's worker thread, never in the reactor's.
    """

    def __init__(self, libvirt: Any, uri: str, on_event: Callable[[], None]):
        self._libvirt = libvirt
        self._uri = uri
        self._on_event = on_event  # called from libvirt's event thread
        self._conn: Any = None
        self._callback: int | None = None

    def _open(self) -> Any:
        lv = self._libvirt
        if self._conn is not None:
            try:
                if self._conn.isAlive():
                    return self._conn
            except lv.libvirtError:
                pass
            self.close()
        ensure_event_loop(lv)
        conn = lv.open(self._uri)
        try:
            conn.setKeepAlive(5, 3)  # a silent host is noticed in ~15 s
        except lv.libvirtError:
            pass  # local drivers have no keepalive
        conn.registerCloseCallback(lambda *_: self._on_event(), None)
        self._callback = conn.domainEventRegisterAny(
            None, lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lambda *_: self._on_event(), None
        )
        self._conn = conn
        return conn

    def snapshot(self) -> tuple[str, list[Domain]]:
        """(the host's name, every domain with its state and VNC settings)."""
        lv = self._libvirt
        conn = self._open()
        try:
            hostname = conn.getHostname()
            domains = []
            for dom in conn.listAllDomains():
                try:
                    state = dom.state()[0]
                    xml = dom.XMLDesc(lv.VIR_DOMAIN_XML_SECURE)
                    domains.append(domain_from(dom.UUIDString(), dom.name(), state, xml))
                except lv.libvirtError as e:
                    if e.get_error_code() == lv.VIR_ERR_NO_DOMAIN:
                        continue  # undefined while we listed: the next sync forgets it
                    raise
            return hostname, domains
        except lv.libvirtError:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        callback, self._callback = self._callback, None
        if conn is not None:
            try:
                if callback is not None:
                    conn.domainEventDeregisterAny(callback)
                conn.unregisterCloseCallback()
            except Exception:  # a dead connection cannot deregister; closing frees it
                pass
            try:
                conn.close()
            except Exception:  # closing a dead connection can fail; it is gone either way
                pass


class LibvirtWatcher:
    """The reactor's side of one source: when to sync, and what a sync's outcome does."""

    _log = Logger()

    def __init__(
        self,
        cfg: LibvirtSourceConfig,
        db: Database,
        box: SecretBox,
        reactor: Any,
        clock: Any,
        libvirt: Any,
    ):
        self.cfg = cfg
        self._db = db
        self._box = box
        self._clock = clock
        self._worker = BlockingWorker(reactor, f"libvirt-{cfg.name}")
        self._conn = LibvirtConnection(libvirt, cfg.uri, lambda: reactor.callFromThread(self.soon))
        self._loop = LoopingCall(self.sync)
        self._loop.clock = clock
        self._syncing = False
        self._again = False
        self._pending: Any = None
        self._down = False
        self._skipped: set[str] = set()
        self._stopped = False
        self.syncs = 0  # completed syncs, good or not (tests wait on it)

    def start(self) -> None:
        self._loop.start(self.cfg.sync_interval, now=True).addErrback(
            lambda f: self._log.failure(
                "inventory {source}: sync loop failed", f, source=self.cfg.source
            )
        )

    def stop(self) -> None:
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._worker.call(self._conn.close)
        self._worker.stop()

    def soon(self) -> None:
        """A lifecycle event (or a lost connection): sync in a moment."""
        if self._stopped:
            return
        if self._pending is None or not self._pending.active():
            self._pending = self._clock.callLater(EVENT_DELAY, self.sync)

    def sync(self) -> Deferred | None:
        """Start a sync unless one runs (then one more follows it)."""
        if self._stopped:
            return None
        if self._syncing:
            self._again = True
            return None
        self._syncing = True
        d = ensureDeferred(self._sync())
        d.addErrback(
            lambda f: self._log.failure(
                "inventory {source}: sync failed", f, source=self.cfg.source
            )
        )
        d.addBoth(self._done)
        return d

    def _done(self, _: Any) -> None:
        self._syncing = False
        self.syncs += 1
        if self._again:
            self._again = False
            self.sync()

    async def _sync(self) -> None:
        now = self._clock.seconds()
        if self._worker.busy:
            # The last call still hangs in libvirt: the host stays down, nothing queues.
            await self._unreachable("the previous call has not returned")
            return
        try:
            hostname, domains = await self._worker.call(self._conn.snapshot).addTimeout(
                self.cfg.timeout, self._clock
            )
        except Exception as e:
            await self._unreachable(_reason(e))
            return
        try:
            result = await self._db.run(
                inventory_sync.sync_source, self.cfg, self._box, hostname, domains, now
            )
        except inventory_sync.OwnerMissing:
            self._log.error(
                "inventory {source}: owner account {owner!r} does not exist; nothing registered",
                source=self.cfg.source,
                owner=self.cfg.owner,
            )
            return
        if self._down:
            self._down = False
            self._log.info(
                "inventory {source}: {uri} reachable again",
                source=self.cfg.source,
                uri=self.cfg.uri,
            )
        self._report(result)

    async def _unreachable(self, reason: str) -> None:
        changed = await self._db.run(
            inventory_sync.mark_unknown, self.cfg.source, self._clock.seconds()
        )
        if not self._down or changed:
            self._log.warn(
                "inventory {source}: {uri} unreachable ({reason}); its VMs are "
                "Unknown until it answers",
                source=self.cfg.source,
                uri=self.cfg.uri,
                reason=reason,
            )
        self._down = True

    def _report(self, r: inventory_sync.SyncResult) -> None:
        by = self.cfg.source
        for vm_id in r.added:
            vms.log_change(vms.VmChange("added", vm_id, r.names[vm_id], r.owner, ()), by, by)
        for vm_id, fields in r.updated:
            vms.log_change(vms.VmChange("updated", vm_id, r.names[vm_id], r.owner, fields), by, by)
        for vm_id in r.removed:
            vms.log_change(vms.VmChange("removed", vm_id, r.names[vm_id], r.owner, ()), by, by)
        for vm_id in set(r.skipped) - self._skipped:
            self._log.warn(
                "inventory {source}: domain {vm} ({name}) not registered: a VM "
                "with its UUID comes from elsewhere",
                source=self.cfg.source,
                vm=vm_id,
                name=r.names.get(vm_id),
            )
        self._skipped = set(r.skipped)


def _reason(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:300]


class InventoryService(service.Service):
    """Starts and stops a :class:`LibvirtWatcher` per configured source."""

    def __init__(
        self,
        sources: tuple[LibvirtSourceConfig, ...],
        db: Database,
        box: SecretBox,
        reactor: Any,
        clock: Any,
        libvirt: Any,
    ):
        self.watchers = [LibvirtWatcher(cfg, db, box, reactor, clock, libvirt) for cfg in sources]

    def startService(self) -> None:
        super().startService()
        for watcher in self.watchers:
            watcher.start()

    def stopService(self):
        for watcher in self.watchers:
            watcher.stop()
        return super().stopService()
