"""Durable station queue in SQLite: an entry whose ``enqueue`` returned is on disk.

WAL, synchronous=FULL, BEGIN IMMEDIATE. Every write goes through ONE writer thread with its
own connection; it drains everything submitted so far into one transaction (one fsync for
the whole group), then resolves the callers' futures. Under load this turns N fsyncs into
one, which is what lets the proxy answer 202 only for entries on disk and still keep up.
Reads use a second, query-only connection in a worker thread: WAL lets it read while the
writer commits. Another process (the ``netwatch queue`` CLI) may open the same file.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import secrets
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from netwatch.errors import QueueError, QueueFileMissingError, QueueFullError, QueueKeyError
from netwatch.proxy.crypto import Sealer
from netwatch.proxy.queue_writer import (
    GroupWriter,
    Txn,
    connect,
    file_size,
    prepare,
    read_tally,
)

EntryState = Literal["queued", "delivered", "dead"]

UPSTREAM_BODY_CAP = 64 * 1024  # a dead letter keeps enough of the answer to explain it
ENTRY_OVERHEAD = 256  # row, index and sealing bytes an entry costs beyond its payload
DELIVERED_RETENTION = 7 * 86400.0

T = TypeVar("T")

# Heads of every order key without scanning the backlog: a recursive skip-scan visits each
# distinct key once through the partial index (O(keys * log n), not O(entries)). INDEXED BY:
# without ANALYZE statistics the planner prefers (state, seq) and reads every queued row.
_READY_SQL = """
WITH RECURSIVE keys(k) AS (
    SELECT MIN(order_key) FROM entries INDEXED BY entries_queued_key WHERE state = 'queued'
    UNION ALL
    SELECT (SELECT MIN(order_key) FROM entries INDEXED BY entries_queued_key
            WHERE state = 'queued' AND order_key > k)
    FROM keys WHERE k IS NOT NULL
)
SELECT * FROM entries WHERE seq IN (
    SELECT (SELECT seq FROM entries INDEXED BY entries_queued_key
            WHERE state = 'queued' AND order_key = k
            ORDER BY seq LIMIT 1)
    FROM keys WHERE k IS NOT NULL
) AND next_attempt_at <= ? ORDER BY seq LIMIT ?
"""
_LIST_ALL = "SELECT * FROM entries WHERE seq > ? ORDER BY seq LIMIT ?"
_LIST_STATE = "SELECT * FROM entries WHERE state = ? AND seq > ? ORDER BY seq LIMIT ?"


@dataclass(frozen=True, slots=True)
class NewEntry:
    """What the proxy hands the queue for one station request."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    idempotency_key: str
    order_key: str = ""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored request and its replay bookkeeping (times are Unix seconds)."""

    id: str  # the ticket handed to the station
    seq: int  # global arrival order
    order_key: str
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]  # empty once delivered (payload dropped)
    body: bytes  # empty once delivered
    idempotency_key: str
    queued_at: float
    state: EntryState
    attempts: int
    next_attempt_at: float
    upstream_status: int | None
    upstream_body: bytes | None
    reason: str | None  # dead letters: "expired", "rejected", "operator", ...
    delivered_at: float | None
    size: int  # bytes this entry accounts for against max_bytes


@dataclass(frozen=True, slots=True)
class QueueStats:
    depth: int  # entries in state "queued"
    oldest_age_s: float  # age of the oldest queued entry, 0.0 when empty
    bytes: int  # on-disk size of the database files (db + wal)
    dead: int  # entries in state "dead"
    accounted_bytes: int = 0  # bytes of queued + dead entries, counted against max_bytes


class DurableQueue:
    """Open with ``async with DurableQueue.open(path, ...) as q:``.

    Nothing per entry is held in memory: counts and bytes live in the ``tally`` table, so a
    backlog of any size costs the same RSS. ``mark_*`` of an unknown or already-settled
    ticket changes nothing.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_age: float,
        key: bytes | None,
        create: bool,
        max_batch: int,
        delivered_retention: float,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._sealer = Sealer(key)
        self._create = create
        self._max_batch = max_batch
        self._retention = delivered_retention
        self._writer: GroupWriter | None = None
        self._rconn: sqlite3.Connection | None = None
        self._rlock = threading.Lock()  # one query-only connection, one reader at a time

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        max_bytes: int,
        max_age: float,
        key: bytes | None = None,
        create: bool = True,
        max_batch: int = 1024,
        delivered_retention: float = DELIVERED_RETENTION,
    ) -> DurableQueue:
        """``create=False`` refuses a missing file (the CLI must not invent a queue);
        ``max_batch=1`` disables group commit (the benchmark's baseline)."""
        return cls(
            Path(path),
            max_bytes=max_bytes,
            max_age=max_age,
            key=key,
            create=create,
            max_batch=max_batch,
            delivered_retention=delivered_retention,
        )

    @property
    def commits(self) -> int:
        """Transactions committed by this object's writer (group commit makes it small)."""
        return self._w.commits

    @property
    def _w(self) -> GroupWriter:
        if self._writer is None:
            raise QueueError(f"{self.path}: the queue is not open")
        return self._writer

    # --- lifetime ---------------------------------------------------------------------

    async def __aenter__(self) -> DurableQueue:
        await asyncio.to_thread(self._open_files)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            await self._writer.close()
        with self._rlock:
            if self._rconn is not None:
                self._rconn.close()
                self._rconn = None

    def _open_files(self) -> None:
        if not self._create and not self.path.exists():
            raise QueueFileMissingError(f"{self.path}: no queue file there")
        wconn = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            wconn = connect(self.path)
            prepare(wconn, self.path, self._check_key)
            self._rconn = connect(self.path)
            self._rconn.execute("PRAGMA query_only=ON")
            self._rconn.row_factory = sqlite3.Row
        except (sqlite3.Error, OSError, QueueError) as exc:
            if wconn is not None:
                wconn.close()
            if isinstance(exc, QueueError):
                raise
            raise QueueError(f"{self.path}: cannot open the queue: {exc}") from exc
        self._writer = GroupWriter(wconn, self.path, max_batch=self._max_batch)

    def _check_key(self, conn: sqlite3.Connection) -> None:
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        if "encryption" not in meta:
            if self._sealer.encrypted:
                rows = [("encryption", b"aes-256-gcm"), ("key_check", self._sealer.check_value())]
            else:
                rows = [("encryption", b"none")]
            conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", rows)
        elif bytes(meta["encryption"]) == b"none":
            if self._sealer.encrypted:
                raise QueueKeyError(
                    f"{self.path}: this queue is not encrypted but a key was given; "
                    "open it without a key (a queue cannot be encrypted in place)"
                )
        elif not self._sealer.encrypted:
            raise QueueKeyError(
                f"{self.path}: this queue is encrypted; give its key "
                "(proxy.queue.key_file, or --key-file)"
            )
        elif not self._sealer.verify(bytes(meta["key_check"])):
            raise QueueKeyError(f"{self.path}: the key does not open this queue (wrong key file?)")

    async def _write(self, fn: Callable[[Txn], T]) -> T:
        return await self._w.submit(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._rlock:
                if self._rconn is None:
                    raise QueueError("the queue is closed")
                try:
                    return fn(self._rconn)
                except sqlite3.Error as exc:
                    raise QueueError(f"queue read failed: {exc}") from exc

        return await asyncio.to_thread(run)

    # --- writes -----------------------------------------------------------------------

    async def enqueue(self, new: NewEntry, *, now: float) -> tuple[Entry, int]:
        """Commit durably, then return (entry, position among queued entries, 1-based).
        Raises QueueFullError when max_bytes would be exceeded (nothing else touched)."""
        return await self._write(lambda txn: self._insert(txn, new, now))

    def _insert(self, txn: Txn, new: NewEntry, now: float) -> tuple[Entry, int]:
        entry_id = secrets.token_hex(16)
        seal = self._sealer.seal
        query = seal(entry_id, "query", new.query.encode())
        headers = seal(entry_id, "headers", _dump_headers(new.headers))
        body = seal(entry_id, "body", new.body)
        size = ENTRY_OVERHEAD + len(query) + len(headers) + len(body)
        size += sum(len(s) for s in (new.method, new.path, new.idempotency_key, new.order_key))
        queued, used = txn.counts()
        if used + size > self.max_bytes:
            raise QueueFullError(
                f"queue full: {used} of {self.max_bytes} bytes used, the request needs {size}"
            )
        cur = txn.conn.execute(
            "INSERT INTO entries (id, order_key, method, path, query, headers, body,"
            " idempotency_key, queued_at, age_from, state, next_attempt_at, size)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?)",
            (entry_id, new.order_key, new.method, new.path, query, headers, body,
             new.idempotency_key, now, now, now, size),
        )  # fmt: skip
        txn.queued, txn.used = queued + 1, used + size
        entry = Entry(
            id=entry_id, seq=cast(int, cur.lastrowid), order_key=new.order_key,
            method=new.method, path=new.path, query=new.query, headers=new.headers,
            body=new.body, idempotency_key=new.idempotency_key, queued_at=now,
            state="queued", attempts=0, next_attempt_at=now, upstream_status=None,
            upstream_body=None, reason=None, delivered_at=None, size=size,
        )  # fmt: skip
        return entry, txn.queued

    def _update(self, txn: Txn, sql: str, params: tuple[Any, ...]) -> int:
        txn.queued = txn.used = None  # the tally triggers moved them
        return txn.conn.execute(sql, params).rowcount

    async def mark_delivered(self, entry_id: str, *, status: int, now: float) -> None:
        # The payload is dropped at once: a delivered entry only answers ticket lookups.
        sql = (
            "UPDATE entries SET state = 'delivered', delivered_at = ?, upstream_status = ?,"
            " attempts = attempts + 1, headers = NULL, body = NULL, upstream_body = NULL,"
            " reason = NULL, size = 0 WHERE state != 'delivered' AND id = ?"
        )
        params = (now, status, entry_id)
        await self._write(lambda txn: self._update(txn, sql, params))

    async def mark_retry(
        self, entry_id: str, *, status: int | None, next_attempt_at: float, now: float
    ) -> None:
        """Count an attempt; keep it at the head of its order key until next_attempt_at."""
        sql = (
            "UPDATE entries SET attempts = attempts + 1, upstream_status = ?,"
            " next_attempt_at = ? WHERE state = 'queued' AND id = ?"
        )
        params = (status, next_attempt_at, entry_id)
        await self._write(lambda txn: self._update(txn, sql, params))

    async def mark_dead(
        self, entry_id: str, *, reason: str, status: int | None, body: bytes | None, now: float
    ) -> None:
        """A dead letter keeps its payload and the upstream answer (body capped); an
        answer (``status``) counts as an attempt."""

        def run(txn: Txn) -> None:
            sealed = None
            if body is not None:
                sealed = self._sealer.seal(entry_id, "upstream_body", body[:UPSTREAM_BODY_CAP])
            sql = (
                "UPDATE entries SET state = 'dead', reason = ?, upstream_status = ?,"
                " upstream_body = ?, size = size + ?, attempts = attempts + ?"
                " WHERE state = 'queued' AND id = ?"
            )
            grow = len(sealed or b"")
            params = (reason, status, sealed, grow, int(status is not None), entry_id)
            self._update(txn, sql, params)

        await self._write(run)

    async def expire(self, *, now: float) -> builtins.list[str]:
        """Queued entries older than max_age become dead letters with reason 'expired'.

        Also housekeeping: delivered rows older than the retention (7 days) are deleted."""

        def run(txn: Txn) -> builtins.list[str]:
            txn.queued = txn.used = None
            cutoff = now - self.max_age
            ids = [
                row[0]
                for row in txn.conn.execute(
                    "SELECT id FROM entries WHERE state = 'queued' AND age_from < ? ORDER BY seq",
                    (cutoff,),
                )
            ]
            txn.conn.execute(
                "UPDATE entries SET state = 'dead', reason = 'expired'"
                " WHERE state = 'queued' AND age_from < ?",
                (cutoff,),
            )
            txn.conn.execute(
                "DELETE FROM entries WHERE state = 'delivered' AND delivered_at < ?",
                (now - self._retention,),
            )
            return ids

        return await self._write(run)

    async def retry_dead(self, entry_id: str | None = None, *, now: float) -> int:
        """Put one dead letter (or all, with None) back in the queue; returns how many.

        It keeps its seq, so it goes back to its place in its order key, and its max_age
        counts from now (else an expired letter would expire again at once)."""
        sql = (
            "UPDATE entries SET state = 'queued', reason = NULL, attempts = 0,"
            " next_attempt_at = ?, age_from = ?, upstream_status = NULL,"
            " size = size - COALESCE(length(upstream_body), 0), upstream_body = NULL"
            " WHERE state = 'dead' AND (? IS NULL OR id = ?)"
        )
        params = (now, now, entry_id, entry_id)
        return await self._write(lambda txn: self._update(txn, sql, params))

    async def shift_times(self, seconds: float) -> int:
        """The wall clock stepped by ``seconds``: move the times of entries that may still
        be sent, so that a retry wait keeps what was left of it and a forward step does not
        age anything. A backward step leaves ``age_from`` alone: a clock step may delay an
        expiry, never bring it forward. Returns the entries moved."""
        sql = (
            "UPDATE entries SET next_attempt_at = next_attempt_at + ?,"
            " queued_at = queued_at + ?, age_from = age_from + ?"
            " WHERE state NOT IN ('delivered', 'dead')"
        )
        params = (seconds, seconds, max(0.0, seconds))
        return await self._write(lambda txn: self._update(txn, sql, params))

    async def clamp_future(self, *, now: float, max_wait: float) -> int:
        """At start, with no monotonic clock shared with the last run: a time in the future
        means the wall clock went back while the proxy was stopped. Such an entry counts as
        queued now, and waits at most ``max_wait``. Returns the entries changed."""
        latest = now + max_wait
        sql = (
            "UPDATE entries SET age_from = MIN(age_from, ?), queued_at = MIN(queued_at, ?),"
            " next_attempt_at = MIN(next_attempt_at, ?)"
            " WHERE state NOT IN ('delivered', 'dead')"
            " AND (age_from > ? OR queued_at > ? OR next_attempt_at > ?)"
        )
        params = (now, now, latest, now, now, latest)
        return await self._write(lambda txn: self._update(txn, sql, params))

    async def purge_dead(self) -> int:
        sql = "DELETE FROM entries WHERE state = 'dead'"
        return await self._write(lambda txn: self._update(txn, sql, ()))

    # --- reads ------------------------------------------------------------------------

    async def ready(self, *, now: float, limit: int) -> Sequence[Entry]:
        """Queued entries that may be sent now: only the head of each order key
        (FIFO per key), whose next_attempt_at <= now, oldest seq first."""
        return await self._read(lambda c: self._entries(c, _READY_SQL, (now, limit)))

    async def get(self, entry_id: str) -> Entry | None:
        sql = "SELECT * FROM entries WHERE id = ?"
        found = await self._read(lambda c: self._entries(c, sql, (entry_id,)))
        return found[0] if found else None

    async def stats(self, *, now: float) -> QueueStats:
        def run(conn: sqlite3.Connection) -> QueueStats:
            conn.execute("BEGIN")  # the tally and the oldest entry from one snapshot
            try:
                depth, dead, used = read_tally(conn)
                # The lowest seq is the oldest arrival: O(log n), where MIN(queued_at)
                # would read every queued row.
                oldest = conn.execute(
                    "SELECT queued_at FROM entries WHERE state = 'queued' ORDER BY seq LIMIT 1"
                ).fetchone()
            finally:
                conn.execute("COMMIT")
            return QueueStats(
                depth=depth,
                oldest_age_s=max(0.0, now - oldest[0]) if oldest else 0.0,
                bytes=file_size(self.path) + file_size(Path(f"{self.path}-wal")),
                dead=dead,
                accounted_bytes=used,
            )

        return await self._read(run)

    async def last_delivered_at(self) -> float | None:
        """When the most recently delivered entry was delivered (None: none kept)."""

        def run(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MAX(delivered_at) FROM entries WHERE state = 'delivered'"
            ).fetchone()
            return None if row is None or row[0] is None else float(row[0])

        return await self._read(run)

    async def list(
        self, *, state: EntryState | None = None, limit: int = 100, after_seq: int = 0
    ) -> Sequence[Entry]:
        """Entries in arrival order; ``after_seq`` pages through (pass the last seq seen)."""
        params: tuple[Any, ...]
        if state is None:
            sql, params = _LIST_ALL, (after_seq, limit)
        else:
            sql, params = _LIST_STATE, (state, after_seq, limit)
        return await self._read(lambda c: self._entries(c, sql, params))

    def _entries(
        self, conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]
    ) -> builtins.list[Entry]:
        return [self._to_entry(row) for row in conn.execute(sql, params).fetchall()]

    def _to_entry(self, row: sqlite3.Row) -> Entry:
        entry_id = row["id"]

        def unseal(field: str) -> bytes | None:
            blob = row[field]  # NULL: the payload was dropped on delivery
            return None if blob is None else self._sealer.open(entry_id, field, bytes(blob))

        headers = unseal("headers")
        return Entry(
            id=entry_id,
            seq=row["seq"],
            order_key=row["order_key"],
            method=row["method"],
            path=row["path"],
            query=(unseal("query") or b"").decode(),
            headers=_load_headers(headers) if headers is not None else (),
            body=unseal("body") or b"",
            idempotency_key=row["idempotency_key"],
            queued_at=row["queued_at"],
            state=row["state"],
            attempts=row["attempts"],
            next_attempt_at=row["next_attempt_at"],
            upstream_status=row["upstream_status"],
            upstream_body=unseal("upstream_body"),
            reason=row["reason"],
            delivered_at=row["delivered_at"],
            size=row["size"],
        )


def _dump_headers(headers: tuple[tuple[str, str], ...]) -> bytes:
    return json.dumps([list(h) for h in headers], separators=(",", ":")).encode()


def _load_headers(data: bytes) -> tuple[tuple[str, str], ...]:
    return tuple((str(k), str(v)) for k, v in json.loads(data))
