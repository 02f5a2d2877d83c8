"""A full disk under the station queue: a real, small tmpfs filled to the last page.

No 202 for an entry that did not commit (507 ``queue_full``, reason ``disk full``), healthz
and an alert say the queue cannot take writes, and an entry delivered while its outcome
cannot be recorded is never sent again: replay pauses until there is room.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog.testing
from helpers.servers import free_port, wait_until
from prometheus_client import CollectorRegistry
from test_queue_faults import RecordingHub

from netwatch.config.schema import Proxy
from netwatch.demo.simulator import PopulationSimulator
from netwatch.events import EventHub
from netwatch.proxy.station import StationProxy


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mount)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(mount: Path) -> Path:
    """Take every free byte of the file system (whole pages first, then the last one)."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (b"\0" * 65536, b"\0"):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, chunk)
    finally:
        os.close(fd)
    return filler


@asynccontextmanager
async def running(settings: Proxy, hub: EventHub) -> AsyncIterator[StationProxy]:
    proxy = StationProxy(settings, "q1", CollectorRegistry(), hub, lambda: False, None)
    async with proxy:
        task = asyncio.get_running_loop().create_task(proxy.run())
        try:
            yield proxy
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def answer(response: aiohttp.ClientResponse) -> tuple[int, Any]:
    return response.status, await response.json()


@pytest.mark.slow
async def test_disk_full_answers_507_never_a_false_202_and_never_resends(
    small_disk: Path,
) -> None:
    db = small_disk / "queue.db"
    settings = Proxy.model_validate(
        {
            "listen": f"127.0.0.1:{free_port()}",
            "upstream": "http://127.0.0.1:9",  # replaced below
            "queue": {"path": str(db)},
            "replay": {"rate": "1000/s", "peak_rate": "1000/s", "backoff_initial": "100ms"},
        }
    )
    hub = RecordingHub()
    async with PopulationSimulator() as sim, aiohttp.ClientSession() as client:
        settings = settings.model_copy(update={"upstream": sim.url})
        async with running(settings, hub) as proxy:
            url = f"{proxy.url}/api/applications"
            proxy.override("offline")
            tickets = []
            for n in range(20):
                async with client.post(url, json={"station": "s1", "seq": n}) as r:
                    assert r.status == 202
                    tickets.append(r.headers["Netwatch-Ticket"])
            # Every page back in the database and the WAL emptied, as after a quiet night;
            # then the disk fills up (another program's logs, say).
            raw = sqlite3.connect(db)
            assert raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
            raw.close()
            filler = await asyncio.to_thread(fill_disk, small_disk)

            for n in range(20, 30):
                async with client.post(url, json={"station": "s1", "seq": n}) as r:
                    assert await answer(r) == (507, {"error": "queue_full", "reason": "disk full"})
            async with client.get(f"{proxy.url}/_netwatch/healthz") as r:
                assert await answer(r) == (
                    503,
                    {"ok": False, "error": "queue_unwritable", "reason": "disk full"},
                )
            await wait_until(lambda: "QueueDiskFull" in hub.queue_alerts(), 10, message="alert")

            # The link is back, but no attempt can be recorded before its send (the record
            # is a write): nothing goes out until it can be, and nothing is sent twice.
            with structlog.testing.capture_logs() as logs:
                proxy.override("auto")
                await wait_until(
                    lambda: any(e["event"] == "replay_queue_read_failed" for e in logs),
                    10,
                    message="the replayer tried to claim the head",
                )
            assert sim.receipts == []
            assert proxy.status()["replay"]["in_flight"] == 0

            await asyncio.to_thread(filler.unlink)  # room again: replay resumes
            await wait_until(lambda: sim.stats.applied == 20, 30, message="the rest delivered")
            assert sim.stats.replayed == 0  # each entry sent exactly once
            assert [a["station_seq"] for a in sim.applied] == list(range(20))
            async with client.get(f"{proxy.url}/_netwatch/healthz") as r:
                assert r.status == 200
        async with running(settings, RecordingHub()) as proxy:
            kept = await proxy.queue.list(limit=100)
    assert [e.id for e in kept] == tickets  # every 202 kept, and nothing else
    assert all(e.state == "delivered" for e in kept)
