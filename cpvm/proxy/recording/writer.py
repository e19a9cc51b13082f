"""Recording files written off the reactor thread, with a bound on what may wait.

The reactor never touches the disk for a recording: :class:`RecordingFile` queues each
block's pieces for a :class:`DrainThread` (one per process, shared by every recording, in
order), which opens, ``writev``-s, hashes, ``fsync``-s and closes. What is queued but not
yet written is counted; past ``max_buffer`` bytes the disk is too slow (or stuck) and the
file *fails* — as it does on any ``OSError`` (disk full, quota, I/O error). A failed file
takes no more data and ends at the last whole block, and its owner hears why once, on the
reactor thread, so the session can end or go on unrecorded (``[recording] on_failure``).

The SHA-256 and the size are of exactly the bytes that stay in the file, computed as they
are written, so the end report needs no second read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

Pieces = Sequence[bytes | memoryview]
# The name a recording has while it is written.
PART_SUFFIX = ".part"
Job = Callable[[], None]


class DrainThread:
    """One daemon thread that runs file jobs in the order they were submitted.

    Started on the first job. :meth:`stop` lets it finish what is queued, then ends it.
    """

    _log = Logger()

    def __init__(self, name: str = "cpvm-recording"):
        self._name = name
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Job) -> None:
        """Run ``job`` on the drain thread after every job submitted before it."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()
        self._queue.put(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued jobs and end the thread (waits at most ``timeout`` seconds)."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout)
        self._thread = None

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job()
            except Exception:  # a bug in a job must not end every recording's thread
                self._log.failure("recording job failed unexpectedly")


class InlineDrain:
    """Runs each job at once on the caller's thread: for tests, never for the reactor."""

    def submit(self, job: Job) -> None:
        job()

    def stop(self, timeout: float = 0.0) -> None:
        pass


def on_thread(drain: DrainThread | InlineDrain, call_from_thread: Callable[..., None]):
    """``run(fn, *args)``: ``fn`` on the drain thread, its result as a Deferred that fires
    on the reactor thread (for the retention's directory work)."""

    def run(fn: Callable[..., object], *args: object) -> Deferred:
        d: Deferred = Deferred()

        def job() -> None:
            try:
                result = fn(*args)
            except Exception:
                call_from_thread(d.errback, Failure())
            else:
                call_from_thread(d.callback, result)

        drain.submit(job)
        return d

    return run


@dataclass(frozen=True)
class FileResult:
    """What a finished recording file holds: its size and SHA-256, and whether all the
    data given to it is in it (``error`` says why not)."""

    path: str
    size: int
    sha256: str
    complete: bool
    error: str | None = None


class RecordingFile:
    """One recording file, mode 0600, created new (``O_EXCL``) by the drain thread.

    Reactor side: :meth:`write` (never blocks; ``False`` once the file failed), and
    :meth:`finish` (a Deferred that fires with a :class:`FileResult` on the reactor
    thread). ``on_failure(reason)`` is called at most once, on the reactor thread.
    """

    _log = Logger()

    def __init__(
        self,
        path: str,
        *,
        drain: DrainThread | InlineDrain,
        call_from_thread: Callable[..., None],
        max_buffer: int,
        on_failure: Callable[[str], None],
    ):
        self.path = path
        self._drain = drain
        self._call_from_thread = call_from_thread
        self._max_buffer = max_buffer
        self._on_failure = on_failure
        self.failure: str | None = None  # reactor side: why the file failed
        self._queued = 0  # written to by the reactor thread only
        self._drained = 0  # written to by the drain thread only
        self._finishing = False
        # Drain-thread state.
        self._fd: int | None = None
        self._error: str | None = None
        self._size = 0
        self._hash = hashlib.sha256()
        drain.submit(self._open)

    @property
    def waiting(self) -> int:
        """Bytes given to :meth:`write` that the drain thread has not written yet."""
        return self._queued - self._drained

    def write(self, pieces: Pieces) -> bool:
        """Queue one block's pieces; ``False`` if the file failed (now or before)."""
        if self.failure is not None or self._finishing:
            return False
        n = sum(len(p) for p in pieces)
        if self.waiting + n > self._max_buffer:
            self._fail(
                f"the disk is too slow: {self.waiting} bytes waiting to be written "
                f"(bound {self._max_buffer})"
            )
            return False
        self._queued += n
        self._drain.submit(lambda: self._write(pieces, n))
        return True

    def finish(self) -> Deferred:
        """Flush, fsync and close; fires with the :class:`FileResult`."""
        self._finishing = True
        d: Deferred = Deferred()
        self._drain.submit(lambda: self._finish(d))
        return d

    def _fail(self, reason: str) -> None:
        if self.failure is not None:
            return
        self.failure = reason
        self._log.warn("recording failed: {path}: {reason}", path=self.path, reason=reason)
        self._on_failure(reason)

    # -- the drain thread ------------------------------------------------------------------

    def _thread_error(self, reason: str) -> None:
        self._error = reason
        self._call_from_thread(self._fail, reason)

    def _open(self) -> None:
        # Written as <name>.part and linked to <name> when finished: a name without
        # ".part" is a whole recording, which retention (of any worker process) may delete.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            # Made with the first recording (0700: only cpvm reads them), so a proxy that
            # never records has no directory to look after.
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            if os.path.lexists(self.path):
                raise FileExistsError(errno.EEXIST, "a recording of this session exists")
            self._fd = os.open(self.path + PART_SUFFIX, flags, 0o600)
        except OSError as e:
            self._thread_error(f"cannot create the file: {_describe(e)}")

    def _write(self, pieces: Pieces, n: int) -> None:
        try:
            if self._fd is None or self._error is not None:
                return
            try:
                _writev_all(self._fd, pieces, n)
            except OSError as e:
                # Keep the file at its last whole block, so what is there stays readable
                # and the hash covers exactly it.
                try:
                    os.ftruncate(self._fd, self._size)
                except OSError:
                    pass
                self._thread_error(f"cannot write: {_describe(e)}")
                return
            for piece in pieces:
                self._hash.update(piece)
            self._size += n
        finally:
            self._drained += n

    def _finish(self, d: Deferred) -> None:
        if self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as e:
                if self._error is None:
                    self._thread_error(f"cannot fsync: {_describe(e)}")
            os.close(self._fd)
            self._fd = None
            try:  # never over an existing file: link, then drop the working name
                os.link(self.path + PART_SUFFIX, self.path)
                os.unlink(self.path + PART_SUFFIX)
            except OSError as e:
                self._error = self._error or f"cannot name the file: {_describe(e)}"
            _fsync_directory(os.path.dirname(self.path) or ".")
        result = FileResult(
            path=self.path,
            size=self._size,
            sha256=self._hash.hexdigest(),
            complete=self._error is None,
            error=self._error,
        )
        self._call_from_thread(self._resolve, d, result)

    def _resolve(self, d: Deferred, result: FileResult) -> None:
        # On the reactor thread, where a failure of the reactor side (too slow) is known.
        if result.complete and self.failure is not None:
            result = FileResult(result.path, result.size, result.sha256, False, self.failure)
        d.callback(result)


def _writev_all(fd: int, pieces: Pieces, total: int) -> None:
    """``writev`` until every byte is written (a regular file may take part of a call)."""
    views = [memoryview(p) for p in pieces if len(p)]
    done = os.writev(fd, views)
    while done < total:
        if done == 0:
            raise OSError(errno.ENOSPC, "no progress writing")
        total -= done
        while done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        views[0] = views[0][done:]
        done = os.writev(fd, views)


def _fsync_directory(directory: str) -> None:
    # The new file's directory entry must survive a crash too.
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, "error")
    return f"{name} ({e.strerror})" if e.strerror else name
