"""The durable station queue, on real SQLite files."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from helpers.servers import wait_until
from structlog.testing import capture_logs

from netwatch.errors import QueueError, QueueFullError, QueueKeyError
from netwatch.proxy import queue as queue_module
from netwatch.proxy.crypto import generate_key_file, load_key
from netwatch.proxy.queue import DurableQueue, NewEntry

T0 = 1_800_000_000.0
BIG = 1 << 40


def new(n: int = 0, *, key: str = "", body: bytes | None = None) -> NewEntry:
    return NewEntry(
        method="POST",
        path="/api/cards",
        query=f"n={n}",
        headers=(("Content-Type", "application/json"), ("Authorization", "Bearer t0k3n")),
        body=body if body is not None else b'{"n": %d}' % n,
        idempotency_key=f"idem-{n}",
        order_key=key,
    )


def opened(path: Path, **kw: object) -> DurableQueue:
    options: dict[str, object] = {"max_bytes": BIG, "max_age": 3600.0, **kw}
    return DurableQueue.open(path, **options)  # type: ignore[arg-type]


def wal_size(db: Path) -> int:
    return Path(f"{db}-wal").stat().st_size


def disk_bytes(db: Path) -> bytes:
    wal = Path(f"{db}-wal")
    return db.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


async def used(q: DurableQueue) -> int:
    return (await q.stats(now=T0)).accounted_bytes


@pytest.fixture
def qpath(tmp_path: Path) -> Path:
    return tmp_path / "state" / "queue.db"  # the parent does not exist: open creates it


async def test_enqueue_returns_position_and_everything_survives_reopen(qpath: Path) -> None:
    async with opened(qpath) as q:
        results = [await q.enqueue(new(i), now=T0 + i) for i in range(3)]
    assert [pos for _, pos in results] == [1, 2, 3]
    assert len({e.id for e, _ in results}) == 3
    assert all(len(e.id) == 32 for e, _ in results)  # 128 random bits, hex
    async with opened(qpath) as q:
        for entry, _ in results:
            assert await q.get(entry.id) == entry
        assert [e.id for e in await q.list()] == [e.id for e, _ in results]
        assert await used(q) == sum(e.size for e, _ in results)


async def test_position_counts_only_queued_entries(qpath: Path) -> None:
    async with opened(qpath) as q:
        first, _ = await q.enqueue(new(1), now=T0)
        await q.enqueue(new(2), now=T0)
        await q.mark_delivered(first.id, status=201, now=T0 + 1)
        _, position = await q.enqueue(new(3), now=T0 + 2)
    assert position == 2


async def test_positions_stay_exact_when_one_group_mixes_enqueues_and_marks(
    qpath: Path,
) -> None:
    async with opened(qpath) as q:
        first, _ = await q.enqueue(new(1), now=T0)
        await q.enqueue(new(2), now=T0)
        # White box: park the writer so that the next three calls form one group.
        release, parked_in = threading.Event(), threading.Event()

        def park(_: object) -> bool:
            parked_in.set()
            return release.wait(5)

        parked = asyncio.ensure_future(q._write(park))
        await wait_until(parked_in.is_set, message="the writer parked")
        calls = asyncio.gather(
            q.enqueue(new(3), now=T0),
            q.mark_delivered(first.id, status=200, now=T0),
            q.enqueue(new(4), now=T0),
        )
        await wait_until(lambda: q._w._jobs.qsize() == 3, message="three jobs waiting")
        commits = q.commits
        release.set()
        (_, third), _, (_, fourth) = await calls
        await parked
        assert q.commits - commits == 2  # the parked job's transaction, then the group
    assert (third, fourth) == (3, 3)


async def test_ready_gives_only_the_head_of_each_order_key_oldest_first(qpath: Path) -> None:
    async with opened(qpath) as q:
        a1, _ = await q.enqueue(new(1, key="a"), now=T0)
        b1, _ = await q.enqueue(new(2, key="b"), now=T0)
        a2, _ = await q.enqueue(new(3, key="a"), now=T0)
        c1, _ = await q.enqueue(new(4), now=T0)
        assert [e.id for e in await q.ready(now=T0, limit=10)] == [a1.id, b1.id, c1.id]
        assert [e.id for e in await q.ready(now=T0, limit=2)] == [a1.id, b1.id]
        await q.mark_delivered(a1.id, status=200, now=T0 + 1)
        assert [e.id for e in await q.ready(now=T0, limit=10)] == [b1.id, a2.id, c1.id]


async def test_retried_entry_holds_its_key_until_next_attempt(qpath: Path) -> None:
    async with opened(qpath) as q:
        a1, _ = await q.enqueue(new(1, key="a"), now=T0)
        await q.enqueue(new(2, key="a"), now=T0)
        b1, _ = await q.enqueue(new(3, key="b"), now=T0)
        await q.mark_retry(a1.id, status=503, next_attempt_at=T0 + 10, now=T0)
        assert [e.id for e in await q.ready(now=T0 + 5, limit=10)] == [b1.id]
        head = (await q.ready(now=T0 + 10, limit=10))[0]
    assert head.id == a1.id
    assert (head.attempts, head.upstream_status, head.next_attempt_at) == (1, 503, T0 + 10)


async def test_dead_letter_does_not_block_the_entries_behind_it(qpath: Path) -> None:
    async with opened(qpath) as q:
        a1, _ = await q.enqueue(new(1, key="a"), now=T0)
        a2, _ = await q.enqueue(new(2, key="a"), now=T0)
        big_answer = b"x" * (queue_module.UPSTREAM_BODY_CAP + 100)
        await q.mark_dead(a1.id, reason="rejected", status=422, body=big_answer, now=T0 + 1)
        assert [e.id for e in await q.ready(now=T0 + 1, limit=10)] == [a2.id]
        dead = await q.get(a1.id)
        assert dead is not None
        assert (dead.state, dead.reason, dead.upstream_status) == ("dead", "rejected", 422)
        assert dead.upstream_body == big_answer[: queue_module.UPSTREAM_BODY_CAP]
        assert dead.body == a1.body  # kept, so an operator can retry or export it
        assert await used(q) == dead.size + a2.size


async def test_delivered_entry_keeps_a_small_row_and_frees_its_space(qpath: Path) -> None:
    async with opened(qpath) as q:
        entry, _ = await q.enqueue(new(1, body=b"b" * 5000), now=T0)
        await q.mark_delivered(entry.id, status=201, now=T0 + 3)
        done = await q.get(entry.id)
        assert await used(q) == 0
    assert done is not None
    assert (done.state, done.upstream_status, done.delivered_at) == ("delivered", 201, T0 + 3)
    assert (done.body, done.headers, done.size, done.attempts) == (b"", (), 0, 1)
    assert done.idempotency_key == "idem-1"


async def test_group_commit_turns_many_enqueues_into_few_transactions(qpath: Path) -> None:
    async with opened(qpath) as q:
        results = await asyncio.gather(*(q.enqueue(new(i), now=T0) for i in range(300)))
        commits = q.commits
    assert commits <= 10
    assert sorted(pos for _, pos in results) == list(range(1, 301))
    async with opened(qpath, max_batch=1) as q:
        await asyncio.gather(*(q.enqueue(new(i), now=T0) for i in range(20)))
        assert q.commits == 20  # the baseline the group commit is measured against


async def test_full_queue_refuses_new_entries_and_keeps_the_queued_ones(qpath: Path) -> None:
    async with opened(qpath, max_bytes=20_000) as q:
        results = await asyncio.gather(
            *(q.enqueue(new(i, body=b"z" * 1000), now=T0) for i in range(40)),
            return_exceptions=True,
        )
        kept = [r[0] for r in results if isinstance(r, tuple)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert kept
        assert refused
        assert all(isinstance(r, QueueFullError) for r in refused)
        assert await used(q) <= 20_000
        with pytest.raises(QueueFullError, match="queue full"):
            await q.enqueue(new(99, body=b"z" * 1000), now=T0)
    async with opened(qpath, max_bytes=20_000) as q:
        assert [e.id for e in await q.list(limit=100)] == [e.id for e in kept]
        assert all(e.state == "queued" for e in await q.list(limit=100))


async def test_space_freed_by_another_process_is_seen_at_once(qpath: Path) -> None:
    async with opened(qpath, max_bytes=5000) as daemon:
        first, _ = await daemon.enqueue(new(1, body=b"z" * 3000), now=T0)
        await daemon.mark_dead(first.id, reason="rejected", status=400, body=None, now=T0)
        with pytest.raises(QueueFullError):
            await daemon.enqueue(new(2, body=b"z" * 3000), now=T0)
        async with opened(qpath, create=False) as cli:
            assert await cli.purge_dead() == 1
        await daemon.enqueue(new(2, body=b"z" * 3000), now=T0)


async def test_expire_turns_old_entries_into_dead_letters_not_deletions(qpath: Path) -> None:
    async with opened(qpath, max_age=60.0) as q:
        old, _ = await q.enqueue(new(1, key="a"), now=T0)
        young, _ = await q.enqueue(new(2, key="a"), now=T0 + 50)
        assert await q.expire(now=T0 + 70) == [old.id]
        dead = await q.get(old.id)
        assert dead is not None
        assert (dead.state, dead.reason) == ("dead", "expired")
        assert [e.id for e in await q.ready(now=T0 + 70, limit=10)] == [young.id]
        # An operator's retry restarts the clock, or the letter would expire again at once.
        assert await q.retry_dead(old.id, now=T0 + 80) == 1
        assert await q.expire(now=T0 + 120) == [young.id]
        assert (await q.stats(now=T0 + 120)).depth == 1


async def test_expire_deletes_delivered_rows_after_the_retention(qpath: Path) -> None:
    async with opened(qpath, delivered_retention=100.0) as q:
        entry, _ = await q.enqueue(new(1), now=T0)
        await q.mark_delivered(entry.id, status=200, now=T0)
        await q.expire(now=T0 + 50)
        assert await q.get(entry.id) is not None
        await q.expire(now=T0 + 101)
        assert await q.get(entry.id) is None


async def test_retry_and_purge_dead_letters_keep_the_accounting_right(qpath: Path) -> None:
    async with opened(qpath) as q:
        entries = [(await q.enqueue(new(i), now=T0))[0] for i in range(3)]
        for e in entries:
            await q.mark_dead(e.id, reason="rejected", status=400, body=b"nope", now=T0)
        assert await q.retry_dead(entries[0].id, now=T0 + 1) == 1
        assert await q.retry_dead(entries[0].id, now=T0 + 1) == 0  # no longer dead
        back = await q.get(entries[0].id)
        assert back is not None
        assert (back.state, back.attempts, back.upstream_body) == ("queued", 0, None)
        assert back.size == entries[0].size
        assert await q.purge_dead() == 2
        assert await used(q) == entries[0].size
        stats = await q.stats(now=T0 + 10)
    assert (stats.depth, stats.dead, stats.oldest_age_s) == (1, 0, 10.0)
    assert stats.bytes > 0


def tally_and_truth(db: Path) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    with sqlite3.connect(db) as raw:
        tally = raw.execute("SELECT * FROM tally WHERE entries > 0 ORDER BY state").fetchall()
        truth = raw.execute(
            "SELECT state, COUNT(*), SUM(size) FROM entries GROUP BY state ORDER BY state"
        ).fetchall()
    raw.close()
    return tally, truth


async def test_tally_matches_the_entries_after_every_kind_of_change(qpath: Path) -> None:
    async with opened(qpath, max_age=60.0, delivered_retention=10.0) as q:
        ids = [(await q.enqueue(new(i, key=str(i % 3)), now=T0 + i))[0].id for i in range(12)]
        await q.mark_delivered(ids[0], status=200, now=T0 + 20)
        await q.mark_retry(ids[1], status=503, next_attempt_at=T0 + 30, now=T0 + 20)
        await q.mark_dead(ids[2], reason="rejected", status=400, body=b"no" * 99, now=T0 + 20)
        await q.mark_dead(ids[3], reason="operator", status=None, body=None, now=T0 + 20)
        await q.retry_dead(ids[2], now=T0 + 21)
        await q.expire(now=T0 + 65)  # entries 0-4 expire; 0's delivered row is pruned
        await q.purge_dead()
        await q.retry_dead(now=T0 + 66)
        stats = await q.stats(now=T0 + 66)
        tally, truth = await asyncio.to_thread(tally_and_truth, qpath)
    assert tally == truth
    assert truth == [("queued", 8, stats.accounted_bytes)]
    assert stats.depth == 8


async def test_wal_is_checkpointed_on_size_and_reused_not_regrown(qpath: Path) -> None:
    sizes = []
    async with opened(qpath) as q:
        for i in range(40):
            await q.enqueue(new(i, body=os.urandom(1024 * 1024)), now=T0)
            sizes.append(wal_size(qpath))
        assert (await q.stats(now=T0)).bytes >= 40 * 1024 * 1024
        checkpoints = q._w.checkpoints
    # 40 MiB went through it, back to back (the writer never idled): checkpoints on the
    # WAL's size (4000 pages) kept it short, and the file was reused from its start, not
    # grown again.
    assert max(sizes) < 20 * 1024 * 1024
    assert sizes[-8:] == [sizes[-1]] * 8
    assert checkpoints >= 2
    assert not await asyncio.to_thread(os.path.exists, f"{qpath}-wal")  # removed at close


async def test_encrypted_queue_keeps_no_plaintext_on_disk(qpath: Path, tmp_path: Path) -> None:
    key = load_key(generate_key_file(tmp_path / "key"))
    secret = NewEntry(
        "POST", "/api/cards/SECRET-PATH", "cccd=SECRET-QUERY", (("Authorization", "SECRET-TOKEN"),),
        b'{"name": "SECRET-CITIZEN"}', "idem-1",
    )  # fmt: skip
    async with opened(qpath, key=key) as q:
        entry, _ = await q.enqueue(secret, now=T0)
        other, _ = await q.enqueue(new(2), now=T0)
        await q.mark_dead(other.id, reason="rejected", status=400, body=b"SECRET-ANSWER", now=T0)
        on_disk = disk_bytes(qpath)  # while open: the WAL holds the latest pages
    on_disk += disk_bytes(qpath)
    markers = (
        b"SECRET-PATH",
        b"SECRET-QUERY",
        b"SECRET-TOKEN",
        b"SECRET-CITIZEN",
        b"SECRET-ANSWER",
    )
    for marker in markers:
        assert marker not in on_disk
    async with opened(qpath, key=key) as q:
        assert await q.get(entry.id) == entry


@pytest.mark.parametrize(
    ("create_with", "open_with", "message"),
    [
        (b"k" * 32, b"w" * 32, "the key does not open this queue"),
        (b"k" * 32, None, "this queue is encrypted"),
        (None, b"k" * 32, "this queue is not encrypted"),
    ],
    ids=["wrong-key", "missing-key", "key-on-plain-queue"],
)
async def test_open_with_the_wrong_key_fails_at_once(
    qpath: Path, create_with: bytes | None, open_with: bytes | None, message: str
) -> None:
    async with opened(qpath, key=create_with) as q:
        await q.enqueue(new(1), now=T0)
    with pytest.raises(QueueKeyError, match=message):
        async with opened(qpath, key=open_with):
            pass


async def test_a_field_moved_to_another_entry_fails_authentication(qpath: Path) -> None:
    async with opened(qpath, key=b"k" * 32) as q:
        first, _ = await q.enqueue(new(1), now=T0)
        await q.enqueue(new(2), now=T0)
    with sqlite3.connect(qpath) as raw:
        raw.execute("UPDATE entries SET body = (SELECT body FROM entries WHERE seq = 2)")
    raw.close()
    async with opened(qpath, key=b"k" * 32) as q:
        moved = await q.get(first.id)
    assert moved is not None
    assert moved.unreadable == "a sealed field fails authentication"
    assert moved.body == b""  # nothing that failed authentication is handed out


def test_key_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "keys" / "queue.key")
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(load_key(path)) == 32
    with pytest.raises(QueueKeyError, match="refusing to overwrite"):
        generate_key_file(path)


def test_load_key_explains_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(QueueKeyError, match="key file not found"):
        load_key(tmp_path / "missing")
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(QueueKeyError, match="exactly 32 raw bytes, this file has 3"):
        load_key(short)
    loose = tmp_path / "loose"
    loose.write_bytes(b"k" * 32)
    loose.chmod(0o644)
    with capture_logs() as logs:
        assert load_key(loose) == b"k" * 32
    assert logs[0]["log_level"] == "warning"


async def test_open_refuses_a_newer_schema_and_a_non_database(qpath: Path) -> None:
    async with opened(qpath):
        pass
    with sqlite3.connect(qpath) as raw:
        raw.execute("PRAGMA user_version = 99")
    raw.close()
    with pytest.raises(QueueError, match="newer than this netwatch"):
        async with opened(qpath):
            pass
    await asyncio.to_thread(qpath.write_bytes, b"not a database at all" * 100)
    with pytest.raises(QueueError, match="not a netwatch queue"):
        async with opened(qpath):
            pass


async def test_open_without_create_refuses_a_missing_file(qpath: Path) -> None:
    with pytest.raises(QueueError, match="no queue file"):
        async with opened(qpath, create=False):
            pass
    assert not await asyncio.to_thread(qpath.exists)


_ENQUEUER = textwrap.dedent(
    """
    import asyncio, sys
    from netwatch.proxy.queue import DurableQueue, NewEntry

    async def worker(q, w):
        for i in range(100_000):
            entry, _ = await q.enqueue(
                NewEntry("POST", "/api/x", "", (), b"payload %d" % i, f"{w}-{i}", str(w)),
                now=1.0,
            )
            print(entry.id, flush=True)

    async def main():
        async with DurableQueue.open(sys.argv[1], max_bytes=1 << 40, max_age=1e9) as q:
            await asyncio.gather(*(worker(q, w) for w in range(8)))

    asyncio.run(main())
    """
)


def run_and_kill_enqueuer(db: Path, after: int) -> list[str]:
    """Start a process that enqueues from 8 tasks and prints each ticket once enqueue has
    returned; SIGKILL it mid-stream; return every ticket it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _ENQUEUER, str(db)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    printed = []
    for line in proc.stdout:
        printed.append(line.strip())
        if len(printed) == after:
            break
    os.kill(proc.pid, signal.SIGKILL)
    printed.extend(line.strip() for line in proc.stdout)  # flushed before it died
    proc.wait()
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return [t for t in printed if t]


async def test_queued_request_survives_sigkill(qpath: Path) -> None:
    printed = await asyncio.to_thread(run_and_kill_enqueuer, qpath, 300)
    assert len(printed) >= 300
    async with opened(qpath) as q:
        for ticket in printed:
            entry = await q.get(ticket)
            assert entry is not None, ticket
            assert entry.state == "queued"
        assert (await q.stats(now=2.0)).depth >= len(printed)
