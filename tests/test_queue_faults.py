"""The station queue under real faults: damaged rows, damaged files, foreign files.

Real SQLite files damaged the way disks and people damage them (bytes overwritten in place,
rows edited by hand), a real ``StationProxy`` in front of the population-database simulator,
and the ``netwatch queue`` commands on the result.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner, Result
from helpers.servers import free_port, wait_until
from prometheus_client import CollectorRegistry

from netwatch.alerting.alerts import AlertPolicy, AlertState
from netwatch.clock import Instant, SystemClock
from netwatch.config.schema import Proxy
from netwatch.demo.simulator import PopulationSimulator
from netwatch.errors import QueueForeignError
from netwatch.events import Event, EventHub, QueueStats
from netwatch.proxy.crypto import default_key_path
from netwatch.proxy.queue import DurableQueue, Entry, NewEntry
from netwatch.proxy.queue_cmd import queue as queue_cli
from netwatch.proxy.queue_file import APPLICATION_ID, SCHEMA, SCHEMA_VERSION, statements
from netwatch.proxy.station import StationProxy

T0 = 1_800_000_000.0
PAGE = 4096


def new(n: int, *, size: int = 0, key: str = "") -> NewEntry:
    body = json.dumps({"station": "s1", "seq": n, "pad": "x" * size}).encode()
    return NewEntry(
        "POST", "/api/applications", f"cccd=079{n:09d}",
        (("Content-Type", "application/json"),), body, f"idem-{n}", key,
    )  # fmt: skip


async def fill(path: Path, count: int, *, sealed: bool = False, size: int = 0) -> list[Entry]:
    """``sealed``: with the key beside the queue, as the proxy makes it by default."""
    auto_key = default_key_path(path) if sealed else None
    async with DurableQueue.open(path, max_bytes=1 << 40, max_age=1e9, auto_key=auto_key) as q:
        # Now, not a fixed date: a proxy started on it must find the entries due.
        return [(await q.enqueue(new(n, size=size), now=time.time()))[0] for n in range(count)]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def snapshot(db: Path) -> tuple[str, bytes]:
    """The database file, and what its WAL holds (absent and empty are the same)."""
    wal = Path(f"{db}-wal")
    return sha(db), wal.read_bytes() if wal.exists() else b""


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def wreck(db: Path, first_page: int, last_page: int) -> None:
    """Overwrite whole pages in place, as a failing disk would."""
    with db.open("r+b") as f:
        for page in range(first_page, last_page + 1):
            f.seek((page - 1) * PAGE)
            f.write(b"\xa5" * PAGE)


def raw_sql(db: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(sql, params)
    conn.close()


def stored_row(db: Path, seq: int) -> tuple[bytes, ...]:
    conn = sqlite3.connect(db)
    conn.text_factory = bytes
    row = conn.execute("SELECT path, query, headers, body FROM entries WHERE seq = ?", (seq,))
    found = tuple(row.fetchone())
    conn.close()
    return found


def state_of(db: Path, seq: int) -> tuple[str, str | None]:
    conn = sqlite3.connect(db)
    found = conn.execute("SELECT state, reason FROM entries WHERE seq = ?", (seq,)).fetchone()
    conn.close()
    return found[0], found[1]


def cli(*args: str) -> Result:
    return CliRunner().invoke(queue_cli, list(args))


async def acli(*args: str) -> Result:
    return await asyncio.to_thread(cli, *args)


def settings(tmp_path: Path, upstream: str, **queue: Any) -> Proxy:
    return Proxy.model_validate(
        {
            "listen": f"127.0.0.1:{free_port()}",
            "upstream": upstream,
            "queue": {"path": str(tmp_path / "queue.db"), **queue},
            "replay": {"rate": "1000/s", "peak_rate": "1000/s", "backoff_initial": "100ms"},
            "connect_timeout": "1s",
            "request_timeout": "5s",
        }
    )


class RecordingHub(EventHub):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)
        super().publish(event)

    def queue_alerts(self) -> set[str]:
        """The alerts the daemon would fire from the queue snapshots published so far."""
        alerts = AlertState(AlertPolicy(hold_down=3600), "q1")
        firing: set[str] = set()
        for event in self.events:
            if isinstance(event, QueueStats):
                for alert in alerts.on_queue(event, Instant.of(SystemClock())):
                    assert alert.summary_vi  # bilingual, like every alert
                    firing.add(alert.alert)
        return firing


@asynccontextmanager
async def running(
    config: Proxy, hub: EventHub, key: bytes | None = None
) -> AsyncIterator[StationProxy]:
    proxy = StationProxy(config, "q1", CollectorRegistry(), hub, lambda: False, key)
    async with proxy:
        task = asyncio.get_running_loop().create_task(proxy.run())
        try:
            yield proxy
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


@pytest.fixture
async def sim() -> AsyncIterator[PopulationSimulator]:
    async with PopulationSimulator() as simulator:
        yield simulator


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def post(client: aiohttp.ClientSession, proxy: StationProxy, n: int) -> tuple[int, Any]:
    url = f"{proxy.url}/api/applications"
    async with client.post(url, json={"station": "s1", "seq": n}) as r:
        return r.status, await r.json()


async def healthz(client: aiohttp.ClientSession, proxy: StationProxy) -> tuple[int, Any]:
    async with client.get(f"{proxy.url}/_netwatch/healthz") as r:
        return r.status, await r.json()


# --- 2. a damaged entry never stops the queue --------------------------------------------------


async def test_unreadable_rows_are_set_aside_and_the_rest_replays(
    tmp_path: Path, sim: PopulationSimulator, client: aiohttp.ClientSession
) -> None:
    db = tmp_path / "queue.db"
    entries = await fill(db, 8, sealed=True)
    # One sealed body altered (fails authentication), one entry's headers not JSON once
    # opened (sealed garbage under a valid seal is not possible without the key: write
    # them unsealed, which fails authentication too), one path that is not UTF-8 text.
    raw_sql(
        db, "UPDATE entries SET body = CAST(substr(body, 1, 20) || x'00' AS BLOB) WHERE seq = 2"
    )
    raw_sql(db, "UPDATE entries SET headers = 'not json' WHERE seq = 4")
    raw_sql(db, "UPDATE entries SET path = CAST(x'2f61ff' AS TEXT) WHERE seq = 6")
    stored = {seq: stored_row(db, seq) for seq in (2, 4, 6)}
    hub = RecordingHub()
    async with running(settings(tmp_path, sim.url), hub) as proxy:
        await wait_until(lambda: len(sim.applied) == 5, 15, message="the readable five delivered")
        await wait_until(lambda: "QueueUnreadable" in hub.queue_alerts(), 10)
        assert (await healthz(client, proxy))[0] == 200
        status = proxy.status()["queue"]
    assert [a["station_seq"] for a in sim.applied] == [0, 2, 4, 6, 7]  # in order
    assert status["unreadable"] == 3
    for seq, before in stored.items():
        assert stored_row(db, seq) == before  # the stored bytes are kept, untouched
        assert state_of(db, seq) == ("dead", "unreadable")

    # The operator's tools still work on it, and show it.
    listed = await acli("list", "--queue", str(db), "--state", "dead", "--json")
    assert listed.exit_code == 0, listed.output
    dead = json.loads(listed.output)
    assert [d["seq"] for d in dead] == [2, 4, 6]
    assert all(d["reason"] == "unreadable" and d["unreadable"] for d in dead)
    shown = await acli("show", entries[3].id, "--queue", str(db), "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["unreadable"] == "a sealed field fails authentication"
    exported = await acli("export", "--dead", "--decrypt", "--queue", str(db))
    assert exported.exit_code == 0, exported.output
    records = [json.loads(line) for line in exported.output.splitlines()]
    assert [r["seq"] for r in records] == [2, 4, 6]
    assert all("stored_b64" in r for r in records)  # raw bytes, since nothing decodes


async def test_a_bad_row_in_a_plaintext_queue_does_not_crash_the_proxy_at_start(
    tmp_path: Path, sim: PopulationSimulator
) -> None:
    db = tmp_path / "queue.db"
    await fill(db, 4)
    raw_sql(db, "UPDATE entries SET headers = x'7b' WHERE seq = 1")  # "{": not JSON
    raw_sql(db, "UPDATE entries SET query = x'ff00' WHERE seq = 3")  # not UTF-8
    hub = RecordingHub()
    async with running(settings(tmp_path, sim.url, encrypt=False), hub) as proxy:
        await wait_until(lambda: len(sim.applied) == 2, 15, message="the readable two delivered")
        await wait_until(lambda: proxy.status()["queue"]["unreadable"] == 2, 10)
    assert [a["station_seq"] for a in sim.applied] == [1, 3]


# --- 3. a damaged file is found, not fed -------------------------------------------------------


async def test_a_damaged_file_is_found_at_start_and_not_fed(
    tmp_path: Path, sim: PopulationSimulator, client: aiohttp.ClientSession
) -> None:
    db = tmp_path / "queue.db"
    await fill(db, 40, size=3000)
    wreck(db, 20, 24)
    before = snapshot(db)
    hub = RecordingHub()
    async with running(settings(tmp_path, sim.url, encrypt=False), hub) as proxy:
        proxy.override("offline")
        assert await post(client, proxy, 1) == (
            503,
            {"error": "queue_damaged", "mode": "offline"},
        )
        code, body = await healthz(client, proxy)
        assert (code, body["error"]) == (503, "queue_damaged")
        await wait_until(lambda: "QueueDamaged" in hub.queue_alerts(), 10)
        assert proxy.status()["queue"] is None or proxy.status()["queue"]["health"] == "damaged"
    assert snapshot(db) == before  # not a byte written, not even a checkpoint at close
    assert sim.applied == []


async def test_corruption_at_run_time_stops_the_202s_and_keeps_the_file(
    tmp_path: Path, sim: PopulationSimulator, client: aiohttp.ClientSession
) -> None:
    db = tmp_path / "queue.db"
    hub = RecordingHub()
    async with running(settings(tmp_path, sim.url, encrypt=False), hub) as proxy:
        proxy.override("offline")
        for n in range(60):  # about one page each
            async with client.post(
                f"{proxy.url}/api/applications", json={"seq": n, "pad": "x" * 3000}
            ) as r:
                assert r.status == 202
        # Every page back in the database file, then a disk fault under it.
        raw_sql(db, "PRAGMA wal_checkpoint(TRUNCATE)")
        await asyncio.to_thread(wreck, db, 3, 60)
        answers = []
        for n in range(100, 120):
            status, body = await post(client, proxy, n)
            answers.append((status, body.get("error")))
            if status == 503:
                break
            # A read of older entries (a ticket lookup, the replay) meets the damage too.
            await proxy.queue.list(limit=100)
        assert answers[-1] == (503, "queue_damaged"), answers
        damaged_at = snapshot(db)
        for n in range(200, 205):  # and from then on, never a 202
            assert (await post(client, proxy, n))[0] == 503
        code, body = await healthz(client, proxy)
        assert (code, body["error"]) == (503, "queue_damaged")
        await wait_until(lambda: "QueueDamaged" in hub.queue_alerts(), 10)
    assert snapshot(db) == damaged_at


async def test_salvage_copies_every_readable_entry_in_order_and_reports_the_rest(
    tmp_path: Path,
) -> None:
    src, dst = tmp_path / "queue.db", tmp_path / "salvaged" / "queue.db"
    async with DurableQueue.open(
        src, max_bytes=1 << 40, max_age=1e9, auto_key=default_key_path(src)
    ) as q:
        entries = [(await q.enqueue(new(n, size=3000), now=T0 + n))[0] for n in range(60)]
        await q.mark_delivered(entries[0].id, status=201, now=T0 + 100)
    wreck(src, 30, 33)
    before = snapshot(src)
    result = await acli("salvage", str(src), str(dst))
    assert result.exit_code == 1, result.output
    assert "could not read: seq " in result.output
    assert "some entries could not be salvaged" in result.stderr
    assert snapshot(src) == before  # only read
    assert default_key_path(dst).exists()  # sealed like SRC: its key came along
    async with DurableQueue.open(
        dst, max_bytes=1 << 40, max_age=1e9, auto_key=default_key_path(dst), create=False
    ) as q:
        copied = list(await q.list(limit=1000))
    original = {e.seq: e for e in entries}
    assert 45 <= len(copied) < 60
    assert [e.seq for e in copied] == sorted(e.seq for e in copied)
    for e in copied[1:]:
        assert e == original[e.seq]  # byte for byte, decrypted with the same key
    assert copied[0].state == "delivered"
    missing = sorted(set(original) - {e.seq for e in copied})
    first, last = missing[0], missing[-1]
    assert f"could not read: seq {first}-{last} (damaged pages)" in result.output
    assert missing == list(range(first, last + 1))  # one gap, where the pages were


def test_salvage_of_a_whole_file_copies_everything_and_exits_0(tmp_path: Path) -> None:
    src, dst = tmp_path / "queue.db", tmp_path / "copy.db"
    asyncio.run(fill(src, 5))
    result = cli("salvage", str(src), str(dst))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"copied 5 entries from {src} to {dst}, in arrival order")
    again = cli("salvage", str(src), str(dst))
    assert again.exit_code == 2
    assert "already exists" in again.stderr


# --- 4. a file that is not a netwatch queue is refused untouched -------------------------------


def foreign_database(path: Path, *, application_id: int = 0, wal: bool = False) -> None:
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA application_id = {application_id}")
    with conn:
        conn.execute("CREATE TABLE citizens (id TEXT PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO citizens VALUES ('079012345678', 'NGUYEN VAN A')")
    conn.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_bytes(b"%PDF-1.7 not a database\n" * 200),
        foreign_database,
        lambda p: foreign_database(p, application_id=0x0F055112, wal=True),
    ],
    ids=["not-sqlite", "other-sqlite", "other-app-wal"],
)
async def test_a_foreign_file_is_refused_untouched(tmp_path: Path, make: Any) -> None:
    path = tmp_path / "queue.db"
    make(path)
    before = snapshot(path)
    listing_before = listing(tmp_path)
    with pytest.raises(QueueForeignError, match="not a netwatch queue"):
        async with DurableQueue.open(path, max_bytes=1 << 30, max_age=60.0):
            pass
    result = await acli("list", "--queue", str(path))
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(path) == before
    assert listing(tmp_path) == listing_before


def test_the_proxy_refuses_a_foreign_queue_file_with_one_line_and_exit_2(
    tmp_path: Path,
) -> None:
    path = tmp_path / "queue.db"
    foreign_database(path)
    before = snapshot(path)
    config = tmp_path / "proxy.yaml"
    config.write_text(
        "site: {id: q1}\n"
        f"proxy: {{listen: '127.0.0.1:{free_port()}', upstream: 'http://127.0.0.1:9',"
        f" queue: {{path: '{path}'}}}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "netwatch", "proxy", "-c", str(config)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("netwatch: error")]
    assert len(errors) == 1
    assert "not a netwatch queue" in errors[0]
    assert "Traceback" not in done.stderr
    assert snapshot(path) == before
    assert not default_key_path(path).exists()


async def test_a_queue_of_the_previous_version_opens_and_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    # Version 1, as netwatch wrote it: no application_id, plaintext.
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in statements(SCHEMA):
        conn.execute(statement)
    conn.execute("INSERT INTO meta VALUES ('encryption', x'6e6f6e65')")
    conn.execute(
        "INSERT INTO entries (id, order_key, method, path, query, headers, body,"
        " idempotency_key, queued_at, age_from, state, next_attempt_at, size)"
        " VALUES ('t1', '', 'POST', '/api/x', x'', '[]', x'7b7d', 'i1', 1, 1, 'queued', 1, 300)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    async with DurableQueue.open(db, max_bytes=1 << 30, max_age=1e9) as q:
        entry = await q.get("t1")
        assert entry is not None
        assert (entry.path, entry.body, entry.state) == ("/api/x", b"{}", "queued")
        added, _ = await q.enqueue(new(1), now=T0)
    check = sqlite3.connect(db)
    assert check.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert check.execute("SELECT COUNT(*) FROM entries").fetchone()[0] == 2
    check.close()
    assert added.path == "/api/applications"


async def test_a_new_queue_says_whose_it_is_from_its_first_byte(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    async with DurableQueue.open(db, max_bytes=1 << 30, max_age=60.0):
        header = db.read_bytes()[:100]  # the main file itself, not only the WAL
    assert int.from_bytes(header[68:72], "big") == APPLICATION_ID
