"""The queue's one group-committing writer, and the checkpointer that keeps its WAL short.

One thread owns the write connection. It blocks for a job, drains every job submitted
meanwhile, runs them all in ONE ``BEGIN IMMEDIATE`` transaction (one fsync under
synchronous=FULL), then resolves each caller's future on its loop. While it fsyncs, new
jobs pile up and form the next group: the busier the proxy, the bigger the groups.

Checkpoints trigger on the WAL's size, never on the writer idling: SQLite's own
auto-checkpoint (which runs inside a commit, before its callers hear back) is off; the writer
runs a PASSIVE checkpoint between groups once the WAL holds ``_CHECKPOINT_FRAMES`` pages.

The writer also knows the file's health: a full disk (cleared by the next commit that
writes) and a damaged file (for good: from then on it refuses every job without touching
the file, and skips the closing checkpoint, so the file stays as it was for salvage).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from netwatch.errors import QueueDamagedError, QueueDiskFullError, QueueError
from netwatch.proxy.queue_file import BUSY_TIMEOUT_S, translate

_CHECKPOINT_FRAMES = 4000  # a PASSIVE checkpoint once the WAL holds this many pages (16 MiB)
_WAL_FORCE_BYTES = 64 * 1024**2  # a WAL file grown past this (a reader held it) is truncated

log = structlog.get_logger(__name__)
T = TypeVar("T")


def read_tally(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(queued entries, dead entries, bytes of every entry not delivered)."""
    rows = {
        state.decode() if isinstance(state, bytes) else state: (n, size)
        for state, n, size in conn.execute("SELECT * FROM tally")
    }
    used = rows["queued"][1] + rows["dead"][1] + rows["in_doubt"][1]
    return rows["queued"][0], rows["dead"][0], used


def file_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


class Txn:
    """What the jobs of one group-committed transaction share."""

    __slots__ = ("conn", "queued", "used")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        # Read from the tally once per group, then counted along by the enqueues;
        # None after any other job, which may have changed them.
        self.queued: int | None = None
        self.used: int | None = None

    def counts(self) -> tuple[int, int]:
        """(queued entries, accounted bytes) as of this point of the transaction."""
        if self.queued is None or self.used is None:
            self.queued, _, self.used = read_tally(self.conn)
        return self.queued, self.used


@dataclass(slots=True)
class _Job:
    fn: Callable[[Txn], Any]
    loop: asyncio.AbstractEventLoop
    fut: asyncio.Future[Any]


class GroupWriter:
    """The writer thread and its connection."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path, index: WalIndex, *, max_batch: int
    ) -> None:
        self.commits = 0  # transactions committed
        self.damaged: str | None = None  # why the file is unusable, for good
        self.disk_full = False  # the last write failed for want of space
        self._conn = conn
        self._path = path
        self._max_batch = max(1, max_batch)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self.checkpoints = 0  # checkpoints run (PASSIVE past _CHECKPOINT_FRAMES, TRUNCATE)
        self._wal = Path(f"{path}-wal")
        self._index = index
        self._thread = threading.Thread(target=self._loop, name="queue-writer", daemon=True)
        self._thread.start()

    def set_damaged(self, error: QueueDamagedError) -> None:
        """Stop writing to the file (a read found it corrupt, or a write did)."""
        if self.damaged is None:
            self.damaged = str(error)
            log.error("queue_damaged", error=self.damaged)

    async def submit(self, fn: Callable[[Txn], T]) -> T:
        """Run ``fn`` in the next group; return once its transaction is committed.

        Cancelling the caller does not cancel the write: once submitted, it commits."""
        if self._closed:
            raise QueueError("the queue is closed")
        if self.damaged is not None:
            raise QueueDamagedError(self.damaged)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, loop, fut))
        return await fut

    async def close(self) -> None:
        """Commit every job already submitted, checkpoint, close the connection."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)  # queued after every submitted job: they all commit first
        await asyncio.to_thread(self._thread.join)

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            self._commit(batch)
            self._maybe_checkpoint()
        if self.damaged is None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._conn.close()

    def _commit(self, batch: list[_Job]) -> None:
        outcomes = self._transact(batch)
        # One wake-up per event loop for the whole group, not one per entry.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for job, result, err in outcomes:
            by_loop.setdefault(job.loop, []).append((job.fut, result, err))
        for loop, resolved in by_loop.items():
            # A caller whose loop is already closed cannot be told; the others must be.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve_all, resolved)

    def _transact(self, batch: list[_Job]) -> list[tuple[_Job, Any, BaseException | None]]:
        if self.damaged is not None:
            damaged = QueueDamagedError(self.damaged)
            return [(job, None, damaged) for job in batch]
        conn = self._conn
        txn = Txn(conn)
        changes = conn.total_changes
        try:
            conn.execute("BEGIN IMMEDIATE")
            outcomes = [self._run(txn, job) for job in batch]
            conn.execute("COMMIT")
        except Exception as exc:  # the writer must survive anything and answer every caller
            error = self._failed(exc)
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            return [(job, None, error) for job in batch]
        self.commits += 1
        if conn.total_changes != changes:
            self.disk_full = False  # a page was written: there is room again
        return outcomes

    def _run(self, txn: Txn, job: _Job) -> tuple[_Job, Any, BaseException | None]:
        # A savepoint per job: one refused entry (queue full) leaves the others of the
        # group untouched and committed.
        conn = txn.conn
        saved = (txn.queued, txn.used)
        conn.execute("SAVEPOINT job")
        try:
            result = job.fn(txn)
        except sqlite3.Error as exc:
            error = translate(exc, "queue write failed")
            if isinstance(error, (QueueDamagedError, QueueDiskFullError)):
                raise error from exc  # the whole group fails: nothing more goes to the file
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            txn.queued, txn.used = saved
            return job, None, error
        except Exception as exc:
            conn.execute("ROLLBACK TO job")
            conn.execute("RELEASE job")
            txn.queued, txn.used = saved
            return job, None, exc
        conn.execute("RELEASE job")
        return job, result, None

    def _failed(self, exc: Exception) -> QueueError:
        if isinstance(exc, sqlite3.Error):
            error = translate(exc, "queue commit failed")
        elif isinstance(exc, QueueError):
            error = exc
        else:
            error = QueueError(f"queue commit failed: {exc}")
        if isinstance(error, QueueDamagedError):
            self.set_damaged(error)
        elif isinstance(error, QueueDiskFullError):
            if not self.disk_full:
                log.error("queue_disk_full", path=str(self._path))
            self.disk_full = True
        return error

    def _maybe_checkpoint(self) -> None:
        # After the group's callers are answered, not inside their commit (where SQLite's
        # own auto-checkpoint would run). On WAL size only: once every page is copied back,
        # the next transaction starts the WAL over from its beginning, so the file keeps
        # its size and its blocks (no growing file to fsync), and is truncated only if a
        # long reader made it grow past _WAL_FORCE_BYTES, and at close.
        if self.damaged is not None:
            return
        try:
            frames = self._index.frames()
            if frames is not None and frames >= _CHECKPOINT_FRAMES:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                self.checkpoints += 1
            elif frames is None or file_size(self._wal) > _WAL_FORCE_BYTES:
                self._truncate()
        except (sqlite3.Error, OSError) as exc:  # a missed checkpoint is tried again later
            log.warning("queue_checkpoint_failed", error=str(exc))

    def _truncate(self) -> None:
        if file_size(self._wal) <= _WAL_FORCE_BYTES:
            return
        # No busy wait: a reader (ours, or the CLI's) holding a snapshot must not stall
        # enqueues; a busy checkpoint is simply tried again after a later commit.
        self._conn.execute("PRAGMA busy_timeout = 0")
        try:
            busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        finally:
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if not busy:
            self.checkpoints += 1


class WalIndex:
    """Pages in the WAL (its ``mxFrame``), read from the wal-index header in the ``-shm``
    file (SQLite's file format, "WAL-index format": byte 16, native byte order): far
    cheaper than asking SQLite through a checkpoint.

    The file is read through one descriptor, opened once and closed only by ``close()``,
    after every SQLite connection of this process to the queue is closed. Opening and
    closing the ``-shm`` file per read, as this once did, drops every POSIX lock the process
    holds on it (closing *any* descriptor of a file does), SQLite's own included: another
    process opening the queue (``netwatch queue list``) then took the file for unused,
    truncated it, and the proxy died of SIGBUS on its mapping of the file (seen in the
    SIGKILL-storm test: exit by signal 7 while an operator listed the queue; SQLite's "How
    To Corrupt An SQLite Database File", section 2.2)."""

    def __init__(self, shm: Path) -> None:
        self._shm = shm
        self._fd: int | None = None

    def frames(self) -> int | None:
        """The WAL's page count, or None when the index cannot be read."""
        try:
            if self._fd is None:
                self._fd = os.open(self._shm, os.O_RDONLY | os.O_CLOEXEC)
            head = os.pread(self._fd, 20, 0)
        except OSError:
            return None
        if len(head) < 20:
            return None
        frames: int = struct.unpack_from("=I", head, 16)[0]
        return frames

    def close(self) -> None:
        """Only once no SQLite connection of this process has the queue open."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


def _resolve_all(outcomes: list[_Outcome]) -> None:
    for fut, result, exc in outcomes:
        if fut.done():  # the caller was cancelled; its write happened all the same
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
