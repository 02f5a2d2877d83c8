"""Durable station queue in SQLite: an entry whose ``enqueue`` returned is on disk.

WAL, synchronous=FULL, BEGIN IMMEDIATE. Every write goes through ONE writer thread with its
own connection; it drains everything submitted so far into one transaction (one fsync for
the whole group), then resolves the callers' futures. Under load this turns N fsyncs into
one, which is what lets the proxy answer 202 only for entries on disk and still keep up.
Reads use a second, query-only connection in a worker thread: WAL lets it read while the
writer commits. Another process (the ``netwatch queue`` CLI) may open the same file.

A row that cannot be read back (a sealed field that fails authentication, headers that are
not JSON, text that is not UTF-8) comes out as an ``Entry`` with ``unreadable`` set and no
payload, never as an exception: the replayer sets it aside with ``quarantine`` (a dead
letter, reason ``unreadable``, its stored bytes untouched) and the rest of the queue goes on.
A file SQLite reports corrupt (at open, by ``PRAGMA quick_check``, or at run time) puts the
queue in the ``damaged`` state: no write reaches the file any more.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import secrets
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import structlog

from netwatch.errors import (
    QueueDamagedError,
    QueueError,
    QueueFileMissingError,
    QueueFullError,
    QueueKeyError,
)
from netwatch.proxy.crypto import Sealer, generate_key_file, load_key
from netwatch.proxy.queue_file import (
    Kind,
    connect,
    create_private_file,
    identify,
    make_private_dir,
    open_for_writing,
    prepare,
    quick_check,
    read_only_uri,
    tighten,
    translate,
)
from netwatch.proxy.queue_writer import GroupWriter, Txn, WalIndex, file_size, read_tally

EntryState = Literal["queued", "in_doubt", "delivered", "dead"]
Health = Literal["ok", "disk_full", "damaged"]
_STATES = ("queued", "in_doubt", "delivered", "dead")

UPSTREAM_BODY_CAP = 64 * 1024  # a dead letter keeps enough of the answer to explain it
ENTRY_OVERHEAD = 256  # row, index and sealing bytes an entry costs beyond its payload
DELIVERED_RETENTION = 7 * 86400.0

T = TypeVar("T")
log = structlog.get_logger(__name__)

# Heads of every order key without scanning the backlog: a recursive skip-scan visits each
# distinct key once through the partial index (O(keys * log n), not O(entries)). INDEXED BY:
# without ANALYZE statistics the planner prefers (state, seq) and reads every queued row.
# A key's head may be held for an operator (state in_doubt): then nothing of that key is ready.
# "state IN ('queued', 'in_doubt')" is the exact term of the partial index: keep it verbatim.
_READY_SQL = """
WITH RECURSIVE keys(k) AS (
    SELECT MIN(order_key) FROM entries INDEXED BY entries_queued_key
    WHERE state IN ('queued', 'in_doubt')
    UNION ALL
    SELECT (SELECT MIN(order_key) FROM entries INDEXED BY entries_queued_key
            WHERE state IN ('queued', 'in_doubt') AND order_key > k)
    FROM keys WHERE k IS NOT NULL
)
SELECT *, typeof(path) AS path_type FROM entries WHERE seq IN (
    SELECT (SELECT seq FROM entries INDEXED BY entries_queued_key
            WHERE state IN ('queued', 'in_doubt') AND order_key = k
            ORDER BY seq LIMIT 1)
    FROM keys WHERE k IS NOT NULL
) AND state = 'queued' AND next_attempt_at <= ? ORDER BY seq LIMIT ?
"""
_ROW = "SELECT *, typeof(path) AS path_type FROM entries"  # a sealed path is a BLOB
_LIST_ALL = f"{_ROW} WHERE seq > ? ORDER BY seq LIMIT ?"
_LIST_STATE = f"{_ROW} WHERE state = ? AND seq > ? ORDER BY seq LIMIT ?"
_LIST_DOUBT = (
    f"{_ROW} WHERE doubt = 1 AND state IN ('queued', 'in_doubt') AND seq > ? ORDER BY seq LIMIT ?"
)
_RAW_FIELDS = ("path", "query", "headers", "body", "upstream_body")
_RAW_SQL = "SELECT path, query, headers, body, upstream_body FROM entries WHERE seq = ?"
# Order keys held for an operator, with how many entries each holds back (itself included).
_HELD_SQL = """
SELECT h.order_key, (SELECT COUNT(*) FROM entries INDEXED BY entries_queued_key
                     WHERE state IN ('queued', 'in_doubt') AND order_key = h.order_key)
FROM (SELECT DISTINCT order_key FROM entries WHERE state = 'in_doubt') AS h
"""


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
    # An online forward that may have been applied upstream without an answer.
    doubt: bool = False


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
    unreadable: str | None = None  # why the row cannot be read back (then no payload)
    attempt_at: float | None = None  # start of the last attempt
    doubt: bool = False  # an attempt may have been applied upstream; not yet resolved
    doubts: int = 0  # attempts that ended without a final answer (or the process died)

    @property
    def ticket_state(self) -> str:
        """What the station sees: a queued entry in doubt is ``in_doubt`` too."""
        return "in_doubt" if self.doubt and self.state == "queued" else self.state


@dataclass(frozen=True, slots=True)
class QueueStats:
    depth: int  # entries in state "queued"
    oldest_age_s: float  # age of the oldest queued entry, 0.0 when empty
    bytes: int  # on-disk size of the database files (db + wal)
    dead: int  # entries in state "dead"
    accounted_bytes: int = 0  # bytes of queued + dead entries, counted against max_bytes
    unreadable: int = 0  # dead letters set aside because they could not be read
    in_doubt: int = 0  # unsettled entries that may have been applied upstream
    held: int = 0  # of which held for an operator (state "in_doubt")
    blocked: int = 0  # queued entries waiting behind a held one on its order key
    held_keys: frozenset[str] = frozenset()  # order keys with a held entry


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
        auto_key: Path | None,
        create: bool,
        max_batch: int,
        delivered_retention: float,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.max_age = max_age
        self._sealer = Sealer(key)
        self._auto_key = auto_key
        self._create = create
        self._max_batch = max_batch
        self._retention = delivered_retention
        self._writer: GroupWriter | None = None
        self._rconn: sqlite3.Connection | None = None
        self._rlock = threading.Lock()  # one query-only connection, one reader at a time
        self._wal_index = WalIndex(Path(f"{path}-shm"))

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        max_bytes: int,
        max_age: float,
        key: bytes | None = None,
        auto_key: str | Path | None = None,
        create: bool = True,
        max_batch: int = 1024,
        delivered_retention: float = DELIVERED_RETENTION,
    ) -> DurableQueue:
        """``key`` seals entries (AES-256-GCM). ``auto_key`` is the key file used when no
        ``key`` is given: created (0600) with a new queue, read for an encrypted one; an
        older plaintext queue opens as it is. ``create=False`` refuses a missing file (the
        CLI must not invent a queue, nor a key); ``max_batch=1`` disables group commit (the
        benchmark's baseline)."""
        return cls(
            Path(path),
            max_bytes=max_bytes,
            max_age=max_age,
            key=key,
            auto_key=None if auto_key is None else Path(auto_key),
            create=create,
            max_batch=max_batch,
            delivered_retention=delivered_retention,
        )

    @property
    def commits(self) -> int:
        """Transactions committed by this object's writer (group commit makes it small)."""
        return self._w.commits

    @property
    def damaged(self) -> str | None:
        """Why the file is unusable (SQLite found it corrupt), or None."""
        return None if self._writer is None else self._writer.damaged

    @property
    def health(self) -> Health:
        """``damaged``: nothing is written any more; ``disk_full``: the last write could
        not commit for want of space (cleared by the next write that commits)."""
        if self._writer is None or self._writer.damaged is not None:
            return "damaged" if self._writer is not None else "ok"
        return "disk_full" if self._writer.disk_full else "ok"

    @property
    def encrypted(self) -> bool:
        return self._sealer.encrypted

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
        # A damaged file stays exactly as it is: the last connection to close would copy
        # the WAL into it; a read-only one, open meanwhile and closed last, never does.
        witness = await asyncio.to_thread(self._witness) if self.damaged else None
        if self._writer is not None:
            await self._writer.close()
        with self._rlock:
            if self._rconn is not None:
                self._rconn.close()
                self._rconn = None
        if witness is not None:
            witness.close()
        self._wal_index.close()  # last: its close drops this process's locks on the -shm

    def _witness(self) -> sqlite3.Connection | None:
        try:
            conn = connect(read_only_uri(self.path), uri=True)
        except sqlite3.Error:
            return None
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA schema_version").fetchone()
        return conn

    def _open_files(self) -> None:
        # Whose file is it? Asked before anything is written: a foreign one stays untouched.
        damage: str | None = None
        try:
            kind = identify(self.path)
        except QueueDamagedError as exc:  # not even its schema reads: open it to read only
            kind, damage = "netwatch", str(exc)
        if kind == "new" and not self._create:
            raise QueueFileMissingError(f"{self.path}: no queue file there")
        try:
            wconn, damage = self._connect(kind, damage)
        except OSError as exc:
            raise QueueError(f"{self.path}: cannot open the queue: {exc}") from exc
        self._writer = GroupWriter(wconn, self.path, self._wal_index, max_batch=self._max_batch)
        if damage is not None:
            if not damage.startswith(str(self.path)):
                damage = f"{self.path}: the queue file is damaged ({damage})"
            self._writer.set_damaged(QueueDamagedError(damage))

    def _connect(self, kind: Kind, damage: str | None) -> tuple[sqlite3.Connection, str | None]:
        """(writer connection, why the file is damaged or None); a damaged file gets no
        pragma, no schema change, no key: nothing is written to it."""
        wconn = None
        try:
            if kind == "new":
                make_private_dir(self.path.parent)
                create_private_file(self.path)
            tighten(self.path)
            wconn = open_for_writing(self.path, kind) if damage is None else connect(self.path)
            self._rconn = connect(self.path)
            self._rconn.execute("PRAGMA query_only=ON")
            self._rconn.row_factory = sqlite3.Row
            # Stored text is decoded by _to_entry, so a non-UTF-8 row is one unreadable
            # entry instead of a failed query.
            self._rconn.text_factory = bytes
            if damage is None:
                damage = quick_check(wconn)
            if damage is None:
                prepare(wconn, self.path, self._check_key)
            else:  # read what can be read, with the right key
                with contextlib.suppress(sqlite3.Error):
                    self._check_key(wconn, writable=False)
        except sqlite3.Error as exc:
            error = translate(exc, f"{self.path}: cannot open the queue")
            if isinstance(error, QueueDamagedError) and wconn and self._rconn:
                return wconn, str(error)
            _close(wconn, self._rconn)
            self._rconn = None
            raise error from exc
        except BaseException:
            _close(wconn, self._rconn)
            self._rconn = None
            raise
        return wconn, damage

    def _check_key(self, conn: sqlite3.Connection, *, writable: bool = True) -> None:
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        encryption = meta.get("encryption")
        if encryption is None:
            if writable:
                self._stamp(conn)
        elif bytes(encryption) == b"none":
            if self._sealer.encrypted:
                raise QueueKeyError(
                    f"{self.path}: this queue is not encrypted but a key was given; "
                    "open it without a key (a queue cannot be encrypted in place)"
                )
            if self._auto_key is not None and writable and self._create:  # the daemon's
                log.warning(
                    "queue_not_encrypted",
                    path=str(self.path),
                    hint="made by an older netwatch: it stays plaintext; to encrypt, let it "
                    "drain, stop netwatch, move the file away and start again",
                )
        else:
            auto = self._auto_key
            if not self._sealer.encrypted and auto is not None and auto.exists():
                self._sealer = Sealer(load_key(auto))
            if not self._sealer.encrypted:
                looked = f", none at {auto}" if auto is not None else ""
                raise QueueKeyError(
                    f"{self.path}: this queue is encrypted; give its key "
                    f"(proxy.queue.key_file, or --key-file{looked})"
                )
            if not self._sealer.verify(bytes(meta["key_check"])):
                raise QueueKeyError(
                    f"{self.path}: the key does not open this queue (wrong key file?)"
                )

    def _stamp(self, conn: sqlite3.Connection) -> None:
        """A new queue: record whether (and with which key) it is sealed."""
        if not self._sealer.encrypted and self._auto_key is not None:
            self._sealer = Sealer(self._new_key(self._auto_key))
        if self._sealer.encrypted:
            rows = [("encryption", b"aes-256-gcm"), ("key_check", self._sealer.check_value())]
        else:
            rows = [("encryption", b"none")]
        conn.executemany("INSERT INTO meta (name, value) VALUES (?, ?)", rows)

    def _new_key(self, path: Path) -> bytes:
        if path.exists():
            return load_key(path)
        generate_key_file(path)
        # Once, at creation: without this file the queued applications cannot be read.
        log.warning(
            "queue_key_created",
            path=str(path),
            backup="copy this key file somewhere safe: without it the queued entries "
            "cannot be read (restoring a queue file needs its key)",
        )
        return load_key(path)

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
                    error = translate(exc, "queue read failed")
                    if isinstance(error, QueueDamagedError) and self._writer is not None:
                        self._writer.set_damaged(error)
                    raise error from exc

        return await asyncio.to_thread(run)

    # --- writes -----------------------------------------------------------------------

    async def enqueue(self, new: NewEntry, *, now: float) -> tuple[Entry, int]:
        """Commit durably, then return (entry, position among queued entries, 1-based).
        Raises QueueFullError when max_bytes would be exceeded (nothing else touched)."""
        return await self._write(lambda txn: self._insert(txn, new, now))

    def _insert(self, txn: Txn, new: NewEntry, now: float) -> tuple[Entry, int]:
        entry_id = secrets.token_hex(16)
        seal = self._sealer.seal
        # Citizens' identifiers travel in paths too: sealed (a BLOB) when there is a key.
        path: str | bytes = new.path
        if self._sealer.encrypted:
            path = seal(entry_id, "path", new.path.encode())
        query = seal(entry_id, "query", new.query.encode())
        headers = seal(entry_id, "headers", _dump_headers(new.headers))
        body = seal(entry_id, "body", new.body)
        size = ENTRY_OVERHEAD + len(path) + len(query) + len(headers) + len(body)
        size += sum(len(s) for s in (new.method, new.idempotency_key, new.order_key))
        queued, used = txn.counts()
        if used + size > self.max_bytes:
            raise QueueFullError(
                f"queue full: {used} of {self.max_bytes} bytes used, the request needs {size}"
            )
        cur = txn.conn.execute(
            "INSERT INTO entries (id, order_key, method, path, query, headers, body,"
            " idempotency_key, queued_at, age_from, state, next_attempt_at, size,"
            " attempt_at, doubt, doubts)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
            (entry_id, new.order_key, new.method, path, query, headers, body,
             new.idempotency_key, now, now, now, size, now if new.doubt else None,
             int(new.doubt), int(new.doubt)),
        )  # fmt: skip
        txn.queued, txn.used = queued + 1, used + size
        entry = Entry(
            id=entry_id, seq=cast(int, cur.lastrowid), order_key=new.order_key,
            method=new.method, path=new.path, query=new.query, headers=new.headers,
            body=new.body, idempotency_key=new.idempotency_key, queued_at=now,
            state="queued", attempts=0, next_attempt_at=now, upstream_status=None,
            upstream_body=None, reason=None, delivered_at=None, size=size,
            attempt_at=now if new.doubt else None, doubt=new.doubt, doubts=int(new.doubt),
        )  # fmt: skip
        return entry, txn.queued

    def _update(self, txn: Txn, sql: str, params: tuple[Any, ...]) -> int:
        txn.queued = txn.used = None  # the tally triggers moved them
        return txn.conn.execute(sql, params).rowcount

    async def mark_attempting(self, entry_ids: Sequence[str], *, now: float) -> None:
        """Record, durably and in one commit, that these entries are about to be sent: a
        process that dies before their outcome is written finds them in doubt on restart
        (``recover_attempts``)."""
        sql = "UPDATE entries SET in_flight = 1, attempt_at = ? WHERE state = 'queued' AND id = ?"
        params = [(now, entry_id) for entry_id in entry_ids]

        def run(txn: Txn) -> None:
            txn.conn.executemany(sql, params)

        await self._write(run)

    async def claim(
        self,
        *,
        now: float,
        limit: int,
        skip: Callable[[Entry], bool],
        sends: Callable[[Entry], bool],
    ) -> builtins.list[Entry]:
        """``ready`` heads, minus those ``skip`` refuses, and the attempt record of those
        that ``sends`` says are sent at once, in ONE job of the writer: it shares the group
        commit of the deliveries around it, so the record costs the replay no fsync of its
        own. Returns the entries as read (before the record)."""

        def run(txn: Txn) -> builtins.list[Entry]:
            rows = _rows(txn.conn, _READY_SQL, (now, limit))
            heads = [e for e in map(self._to_entry, rows) if not skip(e)]
            marks = [(now, e.id) for e in heads if sends(e)]
            if marks:
                txn.conn.executemany(
                    "UPDATE entries SET in_flight = 1, attempt_at = ? WHERE id = ?", marks
                )
            return heads

        return await self._write(run)

    async def recover_attempts(self) -> builtins.list[str]:
        """Entries whose send was in flight when the process died are in doubt now.
        Only the process that sends (the proxy, at start) may call this."""

        def run(txn: Txn) -> builtins.list[str]:
            ids = [r[0] for r in txn.conn.execute("SELECT id FROM entries WHERE in_flight = 1")]
            txn.conn.execute(
                "UPDATE entries SET in_flight = 0, doubt = 1, doubts = doubts + 1"
                " WHERE in_flight = 1"
            )
            return ids

        return await self._write(run)

    async def mark_delivered(
        self, entry_id: str, *, status: int, now: float, reason: str | None = None
    ) -> None:
        """``reason`` says how it was settled when it was not by its own answer (``found by
        lookup``, ``resolved by operator``)."""
        # The payload is dropped at once: a delivered entry only answers ticket lookups.
        sql = (
            "UPDATE entries SET state = 'delivered', delivered_at = ?, upstream_status = ?,"
            " attempts = attempts + 1, headers = NULL, body = NULL, upstream_body = NULL,"
            " reason = ?, size = 0, in_flight = 0, doubt = 0"
            " WHERE state IN ('queued', 'in_doubt') AND id = ?"
        )
        params = (now, status, reason, entry_id)
        await self._write(lambda txn: self._update(txn, sql, params))

    async def mark_retry(
        self,
        entry_id: str,
        *,
        status: int | None,
        next_attempt_at: float,
        now: float,
        in_doubt: bool = False,
        attempt: bool = True,
    ) -> None:
        """Count an attempt; keep it at the head of its order key until next_attempt_at.

        ``in_doubt``: the attempt may have been applied upstream without an answer. A
        final answer (``status``) resolves an earlier doubt; a failure before anything
        was sent leaves it as it was. ``attempt=False`` only reschedules."""
        sql = (
            "UPDATE entries SET attempts = attempts + ?, upstream_status = ?,"
            " next_attempt_at = ?, in_flight = 0, doubts = doubts + ?,"
            " doubt = CASE WHEN ? THEN 1 WHEN ? IS NOT NULL THEN 0 ELSE doubt END"
            " WHERE state = 'queued' AND id = ?"
        )
        flag = int(in_doubt)
        params = (int(attempt), status, next_attempt_at, flag, flag, status, entry_id)
        await self._write(lambda txn: self._update(txn, sql, params))

    async def mark_held(self, entry_id: str, *, reason: str, in_doubt: bool, now: float) -> None:
        """Hold an entry in doubt for an operator (state ``in_doubt``): nothing of its
        order key is sent until ``resolve``. ``in_doubt``: the attempt that just ended
        is what left it in doubt (counted as an attempt)."""
        sql = (
            "UPDATE entries SET state = 'in_doubt', reason = ?, in_flight = 0, doubt = 1,"
            " attempts = attempts + ?, doubts = doubts + ? WHERE state = 'queued' AND id = ?"
        )
        params = (reason, int(in_doubt), int(in_doubt), entry_id)
        await self._write(lambda txn: self._update(txn, sql, params))

    async def resolve(self, entry_id: str, *, applied: bool, now: float) -> Entry | None:
        """An operator's word on an entry in doubt: ``applied`` (delivered, the upstream has
        it) or not (queued again, sent once more without any lookup). Returns the entry as
        it was, or None when it is unknown; an entry not in doubt is left as it is."""

        def run(txn: Txn) -> Entry | None:
            found = _rows(txn.conn, f"{_ROW} WHERE id = ?", (entry_id,))
            row = found[0] if found else None
            if row is None:
                return None
            entry = self._to_entry(row)
            if not entry.doubt or entry.state not in {"queued", "in_doubt"}:
                return entry
            if applied:
                sql = (
                    "UPDATE entries SET state = 'delivered', delivered_at = ?, headers = NULL,"
                    " body = NULL, upstream_body = NULL, size = 0, doubt = 0,"
                    " reason = 'resolved by operator: applied' WHERE id = ?"
                )
                params: tuple[Any, ...] = (now, entry_id)
            else:
                sql = (
                    "UPDATE entries SET state = 'queued', doubt = 0, next_attempt_at = ?,"
                    " reason = NULL WHERE id = ?"
                )
                params = (now, entry_id)
            self._update(txn, sql, params)
            return entry

        return await self._write(run)

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
                " upstream_body = ?, size = size + ?, attempts = attempts + ?,"
                " in_flight = 0, doubt = doubt * (? IS NULL) WHERE state = 'queued' AND id = ?"
            )
            grow = len(sealed or b"")
            answered = int(status is not None)
            params = (reason, status, sealed, grow, answered, status, entry_id)
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

    async def quarantine(self, seq: int) -> bool:
        """Set a queued entry that cannot be read back aside as a dead letter (reason
        ``unreadable``) by its seq (its id may be what is damaged); its stored bytes stay
        as they are, for ``netwatch queue export`` or another key. True if it was queued."""
        sql = (
            "UPDATE entries SET state = 'dead', reason = 'unreadable', in_flight = 0"
            " WHERE state = 'queued' AND seq = ?"
        )
        return bool(await self._write(lambda txn: self._update(txn, sql, (seq,))))

    async def check_writable(self) -> None:
        """Commit one page: raises QueueDiskFullError while the disk is full, and clears
        ``disk_full`` once a page can be written again. (The value must change: SQLite
        writes nothing for an update that leaves a row as it was.)"""
        sql = "INSERT OR REPLACE INTO meta (name, value) VALUES ('write_check', randomblob(8))"
        await self._write(lambda txn: txn.conn.execute(sql).rowcount)

    async def purge_dead(self) -> int:
        sql = "DELETE FROM entries WHERE state = 'dead'"
        return await self._write(lambda txn: self._update(txn, sql, ()))

    # --- reads ------------------------------------------------------------------------

    async def ready(self, *, now: float, limit: int) -> Sequence[Entry]:
        """Queued entries that may be sent now: only the head of each order key
        (FIFO per key), whose next_attempt_at <= now, oldest seq first."""
        return await self._read(lambda c: self._entries(c, _READY_SQL, (now, limit)))

    async def get(self, entry_id: str) -> Entry | None:
        sql = f"{_ROW} WHERE id = ?"
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
                unreadable = conn.execute(
                    "SELECT COUNT(*) FROM entries INDEXED BY entries_unreadable"
                    " WHERE reason = 'unreadable' AND state = 'dead'"
                ).fetchone()[0]
                in_doubt = conn.execute(
                    "SELECT COUNT(*) FROM entries INDEXED BY entries_doubt"
                    " WHERE doubt = 1 AND state IN ('queued', 'in_doubt')"
                ).fetchone()[0]
                held_keys = {_text(k): n for k, n in conn.execute(_HELD_SQL).fetchall()}
                held = conn.execute(
                    "SELECT entries FROM tally WHERE state = 'in_doubt'"
                ).fetchone()[0]
            finally:
                conn.execute("COMMIT")
            return QueueStats(
                depth=depth,
                oldest_age_s=max(0.0, now - oldest[0]) if oldest else 0.0,
                bytes=file_size(self.path) + file_size(Path(f"{self.path}-wal")),
                dead=dead,
                accounted_bytes=used,
                unreadable=unreadable,
                in_doubt=in_doubt,
                held=held,
                blocked=sum(held_keys.values()) - held,
                held_keys=frozenset(held_keys),
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
        self,
        *,
        state: EntryState | None = None,
        limit: int = 100,
        after_seq: int = 0,
        in_doubt: bool = False,
    ) -> Sequence[Entry]:
        """Entries in arrival order; ``after_seq`` pages through (pass the last seq seen).
        ``in_doubt``: only unsettled entries in doubt (held or not)."""
        params: tuple[Any, ...]
        if in_doubt:
            sql, params = _LIST_DOUBT, (after_seq, limit)
        elif state is None:
            sql, params = _LIST_ALL, (after_seq, limit)
        else:
            sql, params = _LIST_STATE, (state, after_seq, limit)
        return await self._read(lambda c: self._entries(c, sql, params))

    async def raw(self, seq: int) -> dict[str, bytes | None]:
        """An entry's payload columns exactly as stored (sealed when the queue has a key)."""

        def run(conn: sqlite3.Connection) -> dict[str, bytes | None]:
            row = conn.execute(_RAW_SQL, (seq,)).fetchone()
            if row is None:
                return {}
            return {name: None if row[name] is None else bytes(row[name]) for name in _RAW_FIELDS}

        return await self._read(run)

    def _entries(
        self, conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]
    ) -> builtins.list[Entry]:
        return [self._to_entry(row) for row in conn.execute(sql, params).fetchall()]

    def _to_entry(self, row: sqlite3.Row) -> Entry:
        try:
            return self._decode(row)
        except QueueKeyError:
            return _unreadable(row, "a sealed field fails authentication")
        except UnicodeDecodeError:
            return _unreadable(row, "stored text is not UTF-8")
        except (ValueError, TypeError):
            return _unreadable(row, "stored headers or fields do not decode")

    def _decode(self, row: sqlite3.Row) -> Entry:
        entry_id = _text(row["id"])

        def unseal(field: str) -> bytes | None:
            blob = row[field]  # NULL: the payload was dropped on delivery
            return None if blob is None else self._sealer.open(entry_id, field, bytes(blob))

        path = bytes(row["path"])
        if row["path_type"] == b"blob":  # sealed; older rows kept their path as text
            path = self._sealer.open(entry_id, "path", path)
        headers = unseal("headers")
        state = _text(row["state"])
        if state not in _STATES:
            raise ValueError(state)
        return Entry(
            id=entry_id,
            seq=row["seq"],
            order_key=_text(row["order_key"]),
            method=_text(row["method"]),
            path=path.decode(),
            query=(unseal("query") or b"").decode(),
            headers=_load_headers(headers) if headers is not None else (),
            body=unseal("body") or b"",
            idempotency_key=_text(row["idempotency_key"]),
            queued_at=row["queued_at"],
            state=cast(EntryState, state),
            attempts=row["attempts"],
            next_attempt_at=row["next_attempt_at"],
            upstream_status=row["upstream_status"],
            upstream_body=unseal("upstream_body"),
            reason=None if row["reason"] is None else _text(row["reason"]),
            delivered_at=row["delivered_at"],
            size=row["size"],
            attempt_at=row["attempt_at"],
            doubt=bool(row["doubt"]),
            doubts=row["doubts"],
        )


def _rows(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[sqlite3.Row]:
    """Rows read on the writer's connection as the reader sees them: ``sqlite3.Row`` with
    stored text as bytes, so a row that is not UTF-8 becomes one unreadable entry instead of
    failing the whole read."""
    factory = conn.text_factory
    conn.text_factory = bytes
    try:
        cursor = conn.cursor()
        cursor.row_factory = sqlite3.Row
        return cursor.execute(sql, params).fetchall()
    finally:
        conn.text_factory = factory


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise TypeError(type(value).__name__)


def _unreadable(row: sqlite3.Row, why: str) -> Entry:
    """What can be shown of a row that does not decode: its bookkeeping, no payload."""

    def text(name: str) -> str:
        value = row[name]
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        return "" if value is None else str(value)

    def number(name: str) -> float:
        value = row[name]
        return float(value) if isinstance(value, int | float) else 0.0

    state = text("state")
    status = row["upstream_status"]
    return Entry(
        id=text("id"), seq=row["seq"], order_key=text("order_key"), method=text("method"),
        path="", query="", headers=(), body=b"", idempotency_key=text("idempotency_key"),
        queued_at=number("queued_at"),
        state=cast(EntryState, state if state in _STATES else "queued"),
        attempts=int(number("attempts")), next_attempt_at=number("next_attempt_at"),
        upstream_status=status if isinstance(status, int) else None, upstream_body=None,
        reason=text("reason") or None,
        delivered_at=row["delivered_at"] if isinstance(row["delivered_at"], float) else None,
        size=int(number("size")), unreadable=why,
    )  # fmt: skip


def _close(*conns: sqlite3.Connection | None) -> None:
    for conn in conns:
        if conn is not None:
            conn.close()


def _dump_headers(headers: tuple[tuple[str, str], ...]) -> bytes:
    return json.dumps([list(h) for h in headers], separators=(",", ":")).encode()


def _load_headers(data: bytes) -> tuple[tuple[str, str], ...]:
    pairs = json.loads(data)
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
    ):
        raise ValueError("headers are not a list of name/value pairs")
    return tuple((k, v) for k, v in pairs)
