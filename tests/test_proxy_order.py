"""Per-order-key order holds whatever operators do to the queue file meanwhile.

A real ``netwatch proxy`` process, the population-database simulator, a station posting
steadily, and ``netwatch queue retry --all-dead`` / ``purge`` run as real CLI processes
while the proxy replays. Every write the station sends after the retry must reach the
upstream after the dead letters the retry put back on its order key.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers.daemon import eventually, free_tcp_port
from helpers.stations import ProxyProcess, proxy_config

from netwatch.demo.simulator import PopulationSimulator, SimulatorSettings

pytestmark = pytest.mark.slow

DEAD = 30  # dead letters the operator puts back


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "netwatch",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def _post(session: aiohttp.ClientSession, url: str, seq: int) -> int:
    body = {"station": "s1", "seq": seq, "citizen_id": f"{seq:012d}"}
    headers = {"Idempotency-Key": f"s1-{seq:05d}", "Netwatch-Order-Key": "s1"}
    async with session.post(f"{url}/api/applications", json=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_retried_dead_letters_are_not_overtaken_by_new_writes(tmp_path: Path) -> None:
    """The fault seen: after `queue retry --all-dead` during steady posting, later writes were
    forwarded directly and applied before the retried ones (the proxy stayed `online`)."""
    settings = SimulatorSettings(latency_ms=15.0)
    # A connection per request: the order under test is the proxy's, and a keep-alive
    # connection closed by the proxy just as the next POST reuses it is no part of it.
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        PopulationSimulator(settings) as sim,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        queue_path = tmp_path / "queue.db"
        config = proxy_config(
            listen=f"127.0.0.1:{free_tcp_port()}",
            upstream=sim.url,
            queue_path=queue_path,
            guard_url=f"{sim.url}/health",
        )
        proxy = ProxyProcess(tmp_path, config)
        proxy.start()
        try:
            await proxy.wait_ready()

            async def mode_is(mode: str) -> bool:
                status = await proxy.status()
                return status is not None and status["mode"] == mode

            await eventually(lambda: mode_is("online"), 20, "proxy online")
            # An outage: the station's writes queue; then the upstream refuses the first
            # DEAD replays (422 dead letters) and takes the rest.
            sim.set_outage(True)
            await eventually(lambda: mode_is("offline"), 20, "proxy offline")
            seq = 0
            for _ in range(DEAD + 5):
                seq += 1
                assert await _post(session, proxy.url, seq) == 202
            sim.control(reject_next=DEAD, reject_status=422)
            sim.set_outage(False)
            await eventually(lambda: mode_is("online"), 30, "backlog drained")
            dead_seqs = set(range(1, DEAD + 1))
            assert {a["station_seq"] for a in sim.applied} == set(range(DEAD + 1, DEAD + 6))

            # The station keeps posting while the operator retries the dead letters.
            issued_after_retry: list[int] = []
            retried = asyncio.Event()
            stop = asyncio.Event()

            async def station() -> None:
                nonlocal seq
                while not stop.is_set():
                    seq += 1
                    after = retried.is_set()
                    assert await _post(session, proxy.url, seq) in {201, 202}
                    if after:
                        issued_after_retry.append(seq)
                    await asyncio.sleep(0.005)

            async def operator() -> None:
                await asyncio.sleep(0.3)
                code, out = await _cli("queue", "retry", "--all-dead", "--queue", str(queue_path))
                assert code == 0, out
                retried.set()
                code, out = await _cli(
                    "queue", "purge", "--dead", "--yes", "--queue", str(queue_path)
                )
                assert code == 0, out
                await asyncio.sleep(1.5)
                stop.set()

            deadline = time.monotonic() + 60
            async with asyncio.timeout(deadline - time.monotonic()):
                await asyncio.gather(station(), operator())

            async def all_applied() -> bool:
                applied = {a["station_seq"] for a in sim.applied}
                return applied >= set(range(1, seq + 1))

            await eventually(all_applied, 30, "every write applied")
            order = [a["station_seq"] for a in sim.applied]
            assert len(order) == len(set(order)), "a write was applied twice"
            # Exactly once as the upstream *received* it: nothing is sent again once applied.
            applied_at: dict[str | None, float] = {}
            for receipt in sim.exchanges:
                key = receipt.idempotency_key
                assert key not in applied_at, f"{key} received again after it was applied"
                if 200 <= receipt.status < 300:
                    applied_at[key] = receipt.at
            position = {s: i for i, s in enumerate(order)}
            last_retried = max(position[s] for s in dead_seqs)
            overtakers = [s for s in issued_after_retry if position[s] < last_retried]
            assert issued_after_retry, "the station sent nothing after the retry"
            assert not overtakers, f"{len(overtakers)} later writes overtook retried ones"

            async def settled() -> bool:
                status: Any = await proxy.status()
                live, disk = status["backlog"], status["queue"]["depth"]
                return status["mode"] == "online" and live == 0 and disk == 0

            await eventually(settled, 10, "proxy online with an empty queue")
        finally:
            proxy.stop()
