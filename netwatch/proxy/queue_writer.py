"""The queue's SQLite plumbing: schema, connections, and the one group-committing writer.

One thread owns the write connection. It blocks for a job, drains every job submitted
meanwhile, runs them all in ONE ``BEGIN IMMEDIATE`` transaction (one fsync under
synchronous=FULL), then resolves each caller's future on its loop. While it fsyncs, new
jobs pile up and form the next group: the busier the proxy, the bigger the groups.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from netwatch.errors import QueueError

SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 5.0  # the CLI and the daemon share the file; neither holds it for long
_WAL_TRUNCATE_BYTES = 4 * 1024**2  # truncate the WAL when idle and bigger than this
_WAL_FORCE_BYTES = 64 * 1024**2  # ... or even when busy, past this
_CHECKPOINT_EVERY = 1000  # commits between idle truncations regardless of size

log = structlog.get_logger(__name__)
T = TypeVar("T")

_ENTRIES = """
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order, never reused
    id TEXT NOT NULL UNIQUE,                 -- the ticket: 128 random bits
    order_key TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    query BLOB NOT NULL,                     -- sealed when the queue has a key
    headers BLOB,                            -- sealed JSON, NULL once delivered
    body BLOB,                               -- sealed, NULL once delivered
    idempotency_key TEXT NOT NULL,
    queued_at REAL NOT NULL,
    age_from REAL NOT NULL,                  -- max_age counts from here (operator retry resets)
    -- in_doubt: held for an operator (``netwatch queue resolve``); it blocks its order key
    state TEXT NOT NULL CHECK (state IN ('queued', 'in_doubt', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    upstream_status INTEGER,
    upstream_body BLOB,                      -- sealed, capped
    reason TEXT,
    delivered_at REAL,
    size INTEGER NOT NULL,                   -- bytes accounted against max_bytes
    attempt_at REAL,                         -- start of the last attempt to send it
    in_flight INTEGER NOT NULL DEFAULT 0,    -- 1 from before a send until its outcome
    doubt INTEGER NOT NULL DEFAULT 0,        -- an attempt may have been applied: unresolved
    doubts INTEGER NOT NULL DEFAULT 0        -- attempts that ended without a final answer
);
"""
# Held entries stay in the per-key index: the head of a key is found among queued and held
# entries, and a held head blocks its key.
_INDEXES = """
CREATE INDEX entries_state_seq ON entries (state, seq);
CREATE INDEX entries_queued_key ON entries (order_key, seq) WHERE state IN ('queued', 'in_doubt');
CREATE INDEX entries_queued_age ON entries (age_from) WHERE state = 'queued';
CREATE INDEX entries_doubt ON entries (state) WHERE doubt = 1;
"""
# Entries and bytes per state, kept by triggers: O(1) positions, depth and max_bytes checks,
# right across processes (the CLI purging dead letters frees space the daemon sees at once)
# and across crashes (they commit with the rows they count).
_TRIGGERS = """
CREATE TRIGGER tally_insert AFTER INSERT ON entries BEGIN
    UPDATE tally SET entries = entries + 1, bytes = bytes + NEW.size WHERE state = NEW.state;
END;
CREATE TRIGGER tally_delete AFTER DELETE ON entries BEGIN
    UPDATE tally SET entries = entries - 1, bytes = bytes - OLD.size WHERE state = OLD.state;
END;
CREATE TRIGGER tally_update AFTER UPDATE OF state, size ON entries BEGIN
    UPDATE tally SET entries = entries - 1, bytes = bytes - OLD.size WHERE state = OLD.state;
    UPDATE tally SET entries = entries + 1, bytes = bytes + NEW.size WHERE state = NEW.state;
END;
"""
SCHEMA = (
    _ENTRIES
    + _INDEXES
    + """
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE tally (state TEXT PRIMARY KEY, entries INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT INTO tally VALUES ('queued', 0, 0), ('in_doubt', 0, 0), ('delivered', 0, 0), ('dead', 0, 0);
"""
    + _TRIGGERS
)
_COPY_V1 = (
    "INSERT INTO entries (seq, id, order_key, method, path, query, headers, body,"
    " idempotency_key, queued_at, age_from, state, attempts, next_attempt_at, upstream_status,"
    " upstream_body, reason, delivered_at, size)"
    " SELECT seq, id, order_key, method, path, query, headers, body, idempotency_key,"
    " queued_at, age_from, state, attempts, next_attempt_at, upstream_status, upstream_body,"
    " reason, delivered_at, size FROM entries_v1"
)


def _migrate_to_2(conn: sqlite3.Connection) -> None:
    """Version 2: in-doubt bookkeeping, and the state ``in_doubt`` (a CHECK constraint
    cannot be altered in place, so the table is rebuilt; seq numbers stay never reused)."""
    last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
    conn.execute("ALTER TABLE entries RENAME TO entries_v1")
    for statement in _statements(_ENTRIES):
        conn.execute(statement)
    conn.execute(_COPY_V1)
    conn.execute("DROP TABLE entries_v1")  # and its indexes and triggers
    for statement in _statements(_INDEXES + _TRIGGERS):
        conn.execute(statement)
    conn.execute("INSERT INTO tally VALUES ('in_doubt', 0, 0)")
    if last is not None:
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'entries'", (last[0],))


# Upgrades of an existing file: MIGRATIONS[n] turns version n - 1 into version n.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {2: _migrate_to_2}


def connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), never implicit.
    # check_same_thread=False: each connection is used by one thread at a time, but not
    # always by the thread that opened it (opening runs in a worker thread).
    return sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )


def prepare(
    conn: sqlite3.Connection, path: Path, check: Callable[[sqlite3.Connection], None]
) -> None:
    """Switch to WAL, create the schema once (refusing a newer one), then run ``check``
    (the key check) in the same transaction, so two processes opening a new file agree."""
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise QueueError(f"{path}: cannot switch the queue to WAL mode ({mode})")
    conn.execute("PRAGMA synchronous=FULL")
    with immediate(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise QueueError(
                f"{path}: queue schema {version} is newer than this netwatch understands "
                f"({SCHEMA_VERSION}); upgrade netwatch"
            )
        if version == 0:
            for statement in _statements(SCHEMA):
                conn.execute(statement)
        else:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[step](conn)
        if version != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        check(conn)


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` transaction: take the write lock up front, so a busy file
    waits in the busy handler instead of failing half-way through."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _statements(script: str) -> Iterator[str]:
    # executescript() would COMMIT the caller's transaction first, so split by hand;
    # complete_statement() knows a trigger's BEGIN ... END is one statement.
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""


def read_tally(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(queued entries, dead entries, bytes of every entry not delivered)."""
    rows = {state: (n, size) for state, n, size in conn.execute("SELECT * FROM tally")}
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

    def __init__(self, conn: sqlite3.Connection, path: Path, *, max_batch: int) -> None:
        self.commits = 0  # transactions committed
        self.checkpoints = 0  # WAL truncations done
        self._conn = conn
        self._wal = Path(f"{path}-wal")
        self._max_batch = max(1, max_batch)
        self._since_checkpoint = 0
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="queue-writer", daemon=True)
        self._thread.start()

    async def submit(self, fn: Callable[[Txn], T]) -> T:
        """Run ``fn`` in the next group; return once its transaction is committed.

        Cancelling the caller does not cancel the write: once submitted, it commits."""
        if self._closed:
            raise QueueError("the queue is closed")
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
            try:
                self._maybe_checkpoint(idle=stop or self._jobs.empty())
            except (sqlite3.Error, OSError) as exc:  # a missed checkpoint is retried later
                log.warning("queue checkpoint failed", error=str(exc))
        with contextlib.suppress(sqlite3.Error):
            self._checkpoint()
        self._conn.close()

    def _commit(self, batch: list[_Job]) -> None:
        conn = self._conn
        txn = Txn(conn)
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                # A savepoint per job: one refused entry (queue full) leaves the others of
                # the group untouched and committed.
                saved = (txn.queued, txn.used)
                conn.execute("SAVEPOINT job")
                try:
                    result = job.fn(txn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    txn.queued, txn.used = saved
                    if isinstance(exc, sqlite3.Error):
                        exc = QueueError(f"queue write failed: {exc}")
                    outcomes.append((job, None, exc))
                else:
                    conn.execute("RELEASE job")
                    outcomes.append((job, result, None))
            conn.execute("COMMIT")
        except Exception as exc:  # the writer must survive anything and answer every caller
            error = QueueError(f"queue commit failed: {exc}")
            outcomes = [(job, None, error) for job in batch]
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
        else:
            self.commits += 1
        # One wake-up per event loop for the whole group, not one per entry.
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for job, result, err in outcomes:
            by_loop.setdefault(job.loop, []).append((job.fut, result, err))
        for loop, resolved in by_loop.items():
            # A caller whose loop is already closed cannot be told; the others must be.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_resolve_all, resolved)

    def _maybe_checkpoint(self, *, idle: bool) -> None:
        # SQLite's own PASSIVE auto-checkpoint recycles the WAL but never shrinks the file;
        # TRUNCATE does, and costs nobody anything when no caller waits on the writer.
        self._since_checkpoint += 1
        wal = file_size(self._wal)
        due = wal > _WAL_TRUNCATE_BYTES or self._since_checkpoint >= _CHECKPOINT_EVERY
        if (idle and due) or wal > _WAL_FORCE_BYTES:
            self._checkpoint()

    def _checkpoint(self) -> None:
        # No busy wait: a reader (ours, or the CLI's) holding a snapshot must not stall
        # enqueues; a busy checkpoint is simply tried again after a later commit.
        self._conn.execute("PRAGMA busy_timeout = 0")
        try:
            busy = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        finally:
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if not busy:
            self.checkpoints += 1
            self._since_checkpoint = 0


_Outcome = tuple["asyncio.Future[Any]", Any, BaseException | None]


def _resolve_all(outcomes: list[_Outcome]) -> None:
    for fut, result, exc in outcomes:
        if fut.done():  # the caller was cancelled; its write happened all the same
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
