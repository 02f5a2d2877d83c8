"""Citizens' data at rest: private files whatever the umask, sealed by default (paths and
queries too), the key made once beside the queue, plaintext only when asked for."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from click.testing import CliRunner, Result
from helpers.servers import free_port, wait_until
from prometheus_client import CollectorRegistry

from netwatch.config.schema import Proxy
from netwatch.demo.simulator import PopulationSimulator
from netwatch.events import EventHub
from netwatch.proxy.crypto import default_key_path, generate_key_file, load_key
from netwatch.proxy.queue import DurableQueue, NewEntry
from netwatch.proxy.queue_cmd import queue as queue_cli
from netwatch.proxy.station import StationProxy

CITIZEN = "079912345678"
NAME = "TRAN THI SECRET"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def on_disk(db: Path) -> bytes:
    return b"".join(
        p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists()
    )  # fmt: skip


def meta(db: Path) -> dict[str, bytes]:
    conn = sqlite3.connect(db)
    rows = dict(conn.execute("SELECT name, value FROM meta").fetchall())
    conn.close()
    return rows


def cli(*args: str) -> Result:
    return CliRunner().invoke(queue_cli, list(args))


class ProxyRun:
    """``netwatch proxy`` as a real process, started under a given umask."""

    def __init__(self, tmp_path: Path, queue_path: Path, umask: int) -> None:
        self.port = free_port()
        config = {
            "site": {"id": "q1"},
            "proxy": {
                "listen": f"127.0.0.1:{self.port}",
                "upstream": f"http://127.0.0.1:{free_port()}",  # refused: writes are queued
                "queue": {"path": str(queue_path)},
            },
        }
        cfg = tmp_path / "proxy.yaml"
        cfg.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / f"proxy-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netwatch", "--log-format", "json", "proxy", "-c", str(cfg)],
            stdout=self._log, stderr=subprocess.STDOUT, umask=umask,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    async def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.proc.wait, 15)
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


async def healthy(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/_netwatch/healthz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask-022", "umask-000"])
async def test_queue_files_are_private_and_sealed_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    state = tmp_path / "var" / "lib" / "netwatch"  # nothing of it exists yet
    db = state / "queue.db"
    key = default_key_path(db)
    async with aiohttp.ClientSession() as session:
        proxy = ProxyRun(tmp_path, db, umask)
        try:
            await wait_until(lambda: healthy(session, proxy.url), 30, message="proxy up")
            url = f"{proxy.url}/api/citizens/{CITIZEN}/cards?cccd={CITIZEN}"
            async with session.post(url, json={"name": NAME}) as r:
                assert r.status == 202, await r.text()
                ticket = r.headers["Netwatch-Ticket"]
            assert mode(state) == 0o700
            for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), key):
                assert mode(path) == 0o600, path
            secrets = (CITIZEN.encode(), NAME.encode(), b"/api/citizens")
            assert not any(s in on_disk(db) for s in secrets)  # path and query sealed too
            created = [e for e in proxy.events() if e.get("event") == "queue_key_created"]
            assert [e["path"] for e in created] == [str(key)]
            assert "backup" in created[0]
            await proxy.stop()
        finally:
            proxy.kill()
        again = ProxyRun(tmp_path, db, umask)
        try:
            await wait_until(lambda: healthy(session, again.url), 30, message="proxy up again")
            async with session.get(f"{again.url}/_netwatch/tickets/{ticket}") as r:
                assert (await r.json())["state"] == "queued"
            assert not [e for e in again.events() if e.get("event") == "queue_key_created"]
        finally:
            again.kill()
    assert meta(db)["encryption"] == b"aes-256-gcm"


@asynccontextmanager
async def running(settings: Proxy, key: bytes | None = None) -> AsyncIterator[StationProxy]:
    proxy = StationProxy(settings, "q1", CollectorRegistry(), EventHub(), lambda: False, key)
    async with proxy:
        task = asyncio.get_running_loop().create_task(proxy.run())
        try:
            yield proxy
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


def settings(tmp_path: Path, upstream: str, **queue: Any) -> Proxy:
    return Proxy.model_validate(
        {
            "listen": f"127.0.0.1:{free_port()}",
            "upstream": upstream,
            "queue": {"path": str(tmp_path / "queue.db"), **queue},
            "replay": {"rate": "1000/s", "peak_rate": "1000/s", "backoff_initial": "100ms"},
        }
    )


async def test_an_explicit_key_file_wins_and_encrypt_false_opts_out(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    explicit = generate_key_file(tmp_path / "keys" / "site.key")
    given = settings(tmp_path / "a", "http://127.0.0.1:9", key_file=str(explicit))
    async with running(given, load_key(explicit)):  # as the daemon loads it
        pass
    assert not default_key_path(given.queue.path).exists()
    assert meta(Path(given.queue.path))["encryption"] == b"aes-256-gcm"

    (tmp_path / "b").mkdir()
    plain = settings(tmp_path / "b", "http://127.0.0.1:9", encrypt=False)
    async with running(plain):
        pass
    assert not default_key_path(plain.queue.path).exists()
    assert meta(Path(plain.queue.path))["encryption"] == b"none"


async def test_a_plaintext_queue_of_an_older_netwatch_keeps_working(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"
    async with DurableQueue.open(db, max_bytes=1 << 30, max_age=1e9) as q:  # no key: plaintext
        await q.enqueue(
            NewEntry("POST", "/api/applications", "", (), b'{"seq": 1}', "idem-1"),
            now=time.time(),
        )
    async with PopulationSimulator() as sim, running(settings(tmp_path, sim.url)):
        await wait_until(lambda: len(sim.applied) == 1, 15, message="the old entry replayed")
    assert meta(db)["encryption"] == b"none"
    assert not default_key_path(db).exists()


def test_export_writes_plaintext_only_with_decrypt(tmp_path: Path) -> None:
    db = tmp_path / "queue.db"

    async def make() -> None:
        async with DurableQueue.open(
            db, max_bytes=1 << 30, max_age=1e9, auto_key=default_key_path(db)
        ) as q:
            entry, _ = await q.enqueue(
                NewEntry("POST", f"/api/citizens/{CITIZEN}", f"cccd={CITIZEN}",
                         (("X-Station", "s1"),), json.dumps({"name": NAME}).encode(), "i1"),
                now=time.time(),
            )  # fmt: skip
            await q.mark_dead(entry.id, reason="rejected", status=422, body=b"no", now=time.time())

    asyncio.run(make())
    sealed = cli("export", "--dead", "--queue", str(db))
    assert sealed.exit_code == 0, sealed.output
    assert CITIZEN not in sealed.output
    assert NAME not in sealed.output
    record = json.loads(sealed.output)
    assert record["sealed"] is True
    assert record["path"] is None
    assert base64.b64decode(record["stored_b64"]["body"])  # the sealed bytes, as stored
    plain = cli("export", "--dead", "--decrypt", "--queue", str(db))
    assert plain.exit_code == 0, plain.output
    record = json.loads(plain.output)
    assert (record["path"], record["query"]) == (f"/api/citizens/{CITIZEN}", f"cccd={CITIZEN}")
    assert json.loads(base64.b64decode(record["body_b64"])) == {"name": NAME}
