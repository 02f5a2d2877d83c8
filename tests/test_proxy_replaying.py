"""The proxy while a backlog replays: new writes queue behind it, reads are still forwarded.

Real sockets, a real SQLite queue, the population-database simulator; the replay is paced
slowly (``rate``) so the backlog takes a couple of seconds to drain and the test can act
in the middle of it, which it checks (the backlog is not yet all received).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers.receipts import assert_received_once
from helpers.servers import wait_until
from test_proxy import make_settings, post, running, ticket_state

from netwatch.demo.simulator import PopulationSimulator

BACKLOG = 8
RATE = "4/s"  # two seconds of replay for the backlog


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def station_seqs(sim: PopulationSimulator) -> list[int]:
    return [row["station_seq"] for row in sim.applied if row["order_key"] == "st-1"]


async def test_a_write_during_replay_queues_behind_the_backlog_and_a_read_is_forwarded(
    tmp_path: Path, client: aiohttp.ClientSession, sim: PopulationSimulator
) -> None:
    replay: dict[str, Any] = {"rate": RATE, "peak_rate": RATE, "backoff_initial": "100ms"}
    async with running(make_settings(tmp_path, sim.url, replay=replay)) as proxy:
        proxy.override("offline")
        tickets = []
        for seq in range(BACKLOG):
            body = {"citizen_id": "1", "station": "st-1", "seq": seq}
            status, answer, _ = await post(client, proxy, body, **{"Netwatch-Order-Key": "st-1"})
            assert status == 202
            tickets.append(answer["ticket"])
        proxy.override("auto")
        assert proxy.mode == "replaying"
        await wait_until(lambda: sim.receipts, timeout=10, message="the replay to begin")

        late = {"citizen_id": "1", "station": "st-1", "seq": BACKLOG}
        status, answer, _ = await post(client, proxy, late, **{"Netwatch-Order-Key": "st-1"})
        assert status == 202, answer  # queued behind the backlog, not forwarded ahead of it
        tickets.append(answer["ticket"])

        async with client.get(f"{proxy.url}/api/citizens/1") as response:
            assert response.status == 200  # the link is known good: lookups keep working
            citizen = await response.json()
        assert citizen["id"] == "1"  # answered by the upstream, not by the proxy
        # All of that happened in the middle of the replay, not after it.
        assert len(sim.receipts) < BACKLOG
        assert proxy.mode == "replaying"

        await wait_until(lambda: proxy.mode == "online", timeout=20)
        states = [(await ticket_state(client, proxy, t))["state"] for t in tickets]
    assert states == ["delivered"] * (BACKLOG + 1)
    assert station_seqs(sim) == list(range(BACKLOG + 1))
    assert_received_once(sim.receipts, [row["idempotency_key"] for row in sim.applied])
    assert len(sim.receipts) == BACKLOG + 1
