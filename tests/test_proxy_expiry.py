"""Entries older than ``max_age`` become dead letters (reason ``expired``) while the proxy runs,
and nothing younger does: the running proxy's housekeeping, not only a restart, expires them.

The housekeeping period (30 s in production) is shortened so the test takes seconds; the
queue, the proxy, its HTTP server and the simulator are real.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers.servers import wait_until
from prometheus_client import CollectorRegistry
from test_proxy import make_settings, post, running, ticket_state

from netwatch.demo.simulator import PopulationSimulator
from netwatch.proxy import station

MAX_AGE = 4.0


async def test_running_proxy_expires_entries_past_max_age_and_keeps_younger_ones(
    tmp_path: Path, sim: PopulationSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(station, "EXPIRE_EVERY", 0.5)
    registry = CollectorRegistry()
    settings = make_settings(
        tmp_path, sim.url, queue={"path": str(tmp_path / "q.db"), "max_age": f"{MAX_AGE:g}s"}
    )
    async with aiohttp.ClientSession() as client, running(settings, registry=registry) as proxy:
        proxy.override("offline")
        _, old, _ = await post(client, proxy, {"citizen_id": "1", "seq": 1})
        await asyncio.sleep(MAX_AGE / 2)  # the second entry is younger by half of max_age
        _, young, _ = await post(client, proxy, {"citizen_id": "2", "seq": 2})

        async def old_dead() -> tuple[Any, Any] | None:
            first = await ticket_state(client, proxy, old["ticket"])
            second = await ticket_state(client, proxy, young["ticket"])
            return (first, second) if first["state"] == "dead" else None

        expired, kept = await wait_until(old_dead, timeout=MAX_AGE + 10, interval=0.05)
        assert expired["reason"] == "expired"
        # The same housekeeping pass looked at the younger entry and left it queued.
        assert kept["state"] == "queued", kept
        sample = registry.get_sample_value
        assert sample("netwatch_replay_total", {"site": "q1", "outcome": "dead"}) == 1.0

        proxy.override("auto")
        await wait_until(lambda: proxy.mode == "online", timeout=10)
        delivered = await ticket_state(client, proxy, young["ticket"])
    assert delivered["state"] == "delivered"
    assert [row["station_seq"] for row in sim.applied] == [2]
    assert len(sim.receipts) == 1  # the expired entry never reached the upstream
