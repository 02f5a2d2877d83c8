"""In-doubt bookkeeping of the durable queue, on real SQLite files: the attempt record,
recovery after a crash, held entries blocking their order key, the operator's resolve, and
the upgrade of a version-1 queue file."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

from netwatch.clock import SystemClock
from netwatch.config.schema import Lookup, LookupDedupe, Replay
from netwatch.proxy.forward import Reply
from netwatch.proxy.queue import DurableQueue, Entry, NewEntry
from netwatch.proxy.queue_file import APPLICATION_ID, SCHEMA_VERSION
from netwatch.proxy.replay import Replayer

T0 = 1_800_000_000.0

# The schema of queue files written before in-doubt bookkeeping existed (user_version 1).
SCHEMA_V1 = """
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
    state TEXT NOT NULL CHECK (state IN ('queued', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    upstream_status INTEGER,
    upstream_body BLOB,                      -- sealed, capped
    reason TEXT,
    delivered_at REAL,
    size INTEGER NOT NULL                    -- bytes accounted against max_bytes
);
CREATE INDEX entries_state_seq ON entries (state, seq);
CREATE INDEX entries_queued_key ON entries (order_key, seq) WHERE state = 'queued';
CREATE INDEX entries_queued_age ON entries (age_from) WHERE state = 'queued';
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
-- Entries and bytes per state, kept by triggers: O(1) positions, depth and max_bytes checks,
-- right across processes (the CLI purging dead letters frees space the daemon sees at once)
-- and across crashes (they commit with the rows they count).
CREATE TABLE tally (state TEXT PRIMARY KEY, entries INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT INTO tally VALUES ('queued', 0, 0), ('delivered', 0, 0), ('dead', 0, 0);
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


def new(n: int, key: str = "k", *, doubt: bool = False) -> NewEntry:
    return NewEntry("POST", "/api/x", "", (), b'{"n": %d}' % n, f"idem-{n}", key, doubt=doubt)


def opened(path: Path) -> DurableQueue:
    return DurableQueue.open(path, max_bytes=1 << 40, max_age=3600.0)


async def test_an_attempt_in_flight_when_the_process_died_is_in_doubt_after_restart(
    tmp_path: Path,
) -> None:
    db = tmp_path / "q.db"
    async with opened(db) as q:
        a, _ = await q.enqueue(new(1, "a"), now=T0)
        b, _ = await q.enqueue(new(2, "b"), now=T0)
        c, _ = await q.enqueue(new(3, "c"), now=T0)
        commits = q.commits
        await q.mark_attempting([a.id, b.id], now=T0 + 1)
        assert q.commits == commits + 1  # one commit for the whole batch
        await q.mark_delivered(b.id, status=201, now=T0 + 2)
        # The process dies here: a's attempt has no outcome.
    async with opened(db) as q:
        assert await q.recover_attempts() == [a.id]
        assert await q.recover_attempts() == []  # recovered once
        got = {e.id: e for e in await q.list()}
        assert (got[a.id].doubt, got[a.id].doubts, got[a.id].ticket_state) == (True, 1, "in_doubt")
        assert got[a.id].attempt_at == T0 + 1
        assert not got[b.id].doubt
        assert not got[c.id].doubt
        stats = await q.stats(now=T0 + 3)
        assert (stats.depth, stats.in_doubt, stats.held) == (2, 1, 0)
        assert [e.id for e in await q.list(in_doubt=True)] == [a.id]


async def test_a_final_answer_resolves_a_doubt_and_a_failure_before_sending_keeps_it(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path / "q.db") as q:
        e, _ = await q.enqueue(new(1), now=T0)
        await q.mark_attempting([e.id], now=T0)
        await q.mark_retry(e.id, status=None, next_attempt_at=T0, now=T0, in_doubt=True)
        await q.mark_attempting([e.id], now=T0 + 1)
        await q.mark_retry(e.id, status=None, next_attempt_at=T0, now=T0 + 1)  # refused
        got = await q.get(e.id)
        assert got is not None
        assert got.doubt
        assert got.doubts == 1
        assert got.attempts == 2
        await q.mark_attempting([e.id], now=T0 + 2)
        await q.mark_retry(e.id, status=503, next_attempt_at=T0, now=T0 + 2)
        got = await q.get(e.id)
        assert got is not None
        assert not got.doubt
        assert got.doubts == 1


async def test_a_held_entry_blocks_only_its_order_key_until_resolved(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    async with opened(db) as q:
        a1, _ = await q.enqueue(new(1, "a", doubt=True), now=T0)
        a2, _ = await q.enqueue(new(2, "a"), now=T0)
        b1, _ = await q.enqueue(new(3, "b"), now=T0)
        assert [e.id for e in await q.ready(now=T0, limit=10)] == [a1.id, b1.id]
        await q.mark_held(a1.id, reason="in doubt: awaiting an operator", in_doubt=False, now=T0)
        assert [e.id for e in await q.ready(now=T0, limit=10)] == [b1.id]
        stats = await q.stats(now=T0)
        assert (stats.depth, stats.held, stats.blocked, stats.in_doubt) == (2, 1, 1, 1)
        assert stats.held_keys == frozenset({"a"})
        held = await q.get(a1.id)
        assert held is not None
        assert held.state == "in_doubt"
        assert held.ticket_state == "in_doubt"
        # Held entries never expire: only an operator settles them.
        assert await q.expire(now=T0 + 10_000) == [a2.id, b1.id]
        assert (await q.get(a1.id)).state == "in_doubt"  # type: ignore[union-attr]
        before = await q.resolve(a1.id, applied=False, now=T0 + 5)
        assert before is not None
        assert before.state == "in_doubt"
        resent = await q.get(a1.id)
        assert resent is not None
        assert resent.state == "queued"
        assert not resent.doubt
        assert [e.id for e in await q.ready(now=T0 + 5, limit=10)] == [a1.id]
        stats = await q.stats(now=T0 + 5)
        assert (stats.held, stats.in_doubt, stats.held_keys) == (0, 0, frozenset())


async def test_resolve_applied_delivers_and_leaves_an_entry_not_in_doubt_alone(
    tmp_path: Path,
) -> None:
    async with opened(tmp_path / "q.db") as q:
        a, _ = await q.enqueue(new(1), now=T0)
        b, _ = await q.enqueue(new(2, "other"), now=T0)
        await q.mark_held(a.id, reason="x", in_doubt=True, now=T0)
        await q.resolve(a.id, applied=True, now=T0 + 1)
        got = await q.get(a.id)
        assert got is not None
        assert got.state == "delivered"
        assert got.body == b""
        assert got.reason == "resolved by operator: applied"
        before = await q.resolve(b.id, applied=True, now=T0 + 1)
        assert before is not None
        assert not before.doubt
        assert (await q.get(b.id)).state == "queued"  # type: ignore[union-attr]
        assert await q.resolve("nope", applied=True, now=T0) is None


async def test_a_version_1_queue_file_is_upgraded_in_place(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript(SCHEMA_V1)
    conn.execute("INSERT INTO meta VALUES ('encryption', X'6e6f6e65')")  # b"none"
    for seq, state in ((1, "delivered"), (2, "queued"), (3, "dead"), (7, "queued")):
        conn.execute(
            "INSERT INTO entries (seq, id, order_key, method, path, query, headers, body,"
            " idempotency_key, queued_at, age_from, state, next_attempt_at, size)"
            " VALUES (?, ?, 'k', 'POST', '/api/x', X'', X'5b5d', X'7b7d', ?, ?, ?, ?, ?, 300)",
            (seq, f"t{seq}", f"i{seq}", T0, T0, state, T0),
        )
    conn.execute("DELETE FROM entries WHERE seq = 7")  # its seq must never be reused
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    async with opened(db) as q:
        stats = await q.stats(now=T0)
        assert (stats.depth, stats.dead, stats.in_doubt) == (1, 1, 0)
        assert stats.accounted_bytes == 600
        assert [(e.id, e.state, e.doubt) for e in await q.list()] == [
            ("t1", "delivered", False),
            ("t2", "queued", False),
            ("t3", "dead", False),
        ]
        fresh, _ = await q.enqueue(new(9), now=T0)
        assert fresh.seq == 8
        await q.mark_held("t2", reason="x", in_doubt=True, now=T0)
        assert (await q.stats(now=T0)).held == 1
    check = sqlite3.connect(db)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert check.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()


async def test_a_lookup_the_stored_body_cannot_fill_holds_the_entry_and_sends_nothing(
    tmp_path: Path,
) -> None:
    rule = LookupDedupe(lookup=Lookup(url="/api/applications/{body.application_no}"))
    sent: list[str] = []
    looked: list[str] = []
    outcomes: list[str] = []
    settled = asyncio.Event()

    def on_result(_entry: Entry, outcome: str, _now: float) -> None:
        outcomes.append(outcome)
        settled.set()

    async def send(entry: Entry) -> Reply:
        sent.append(entry.id)
        return Reply(201, None, b"")

    async def look(_entry: Entry, _lookup: Lookup, path: str) -> int:
        looked.append(path)
        return 404

    async with opened(tmp_path / "q.db") as q:
        entry, _ = await q.enqueue(new(1, doubt=True), now=time.time() - 60)
        replayer = Replayer(
            q, send, Replay(), clock=SystemClock(), is_peak=lambda: False,
            active=lambda: True, on_result=on_result,
            on_network_error=lambda _r: None, poll=0.01, strategy=lambda _e: rule,
            lookup=look, settle=0.0,
        )  # fmt: skip
        task = asyncio.get_running_loop().create_task(replayer.run())
        try:
            async with asyncio.timeout(10):
                await settled.wait()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        held = await q.get(entry.id)
    assert outcomes == ["held"]
    assert sent == []
    assert looked == []
    assert held is not None
    assert held.state == "in_doubt"
    assert held.reason == "lookup impossible: the stored body has no {body.application_no}"
