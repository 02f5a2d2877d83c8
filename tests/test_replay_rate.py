"""A real ``netwatch proxy`` replays at ``replay.peak_rate`` inside a peak window of its config,
and at ``replay.rate`` outside one: the rate is measured from the times the population
database received the replayed writes, not read from the proxy's own figures.

The fast rate is 25 times the slow one, so generous bounds still tell them apart.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers.daemon import eventually, free_tcp_port
from helpers.receipts import assert_received_once
from helpers.relay import FaultRelay
from helpers.stations import ProxyProcess, proxy_config

from netwatch.demo.simulator import PopulationSimulator

pytestmark = pytest.mark.slow

SLOW, FAST = 4.0, 100.0
WRITES = 12


def window(peak_now: bool) -> dict[str, Any]:
    now = datetime.now(UTC)
    start = now - timedelta(hours=2) if peak_now else now + timedelta(hours=2)
    end = start + timedelta(hours=4) if peak_now else start + timedelta(hours=1)
    return {"days": ["mon-sun"], "start": start.strftime("%H:%M"), "end": end.strftime("%H:%M")}


async def mode_is(proxy: ProxyProcess, mode: str) -> dict[str, Any] | None:
    status = await proxy.status()
    return status if status is not None and status["mode"] == mode else None


@pytest.mark.parametrize("peak_now", [True, False], ids=["peak", "off_peak"])
async def test_replay_paces_at_peak_rate_inside_peak_hours_and_rate_outside(
    tmp_path: Path, sim: PopulationSimulator, peak_now: bool
) -> None:
    # Whichever rate applies now is the slow one; the other is 25 times faster.
    rate, peak_rate = (FAST, SLOW) if peak_now else (SLOW, FAST)
    async with FaultRelay("127.0.0.1", sim.port) as relay:
        relay.mode = "refuse"
        config = proxy_config(
            listen=f"127.0.0.1:{free_tcp_port()}",
            upstream=relay.url,
            queue_path=tmp_path / "queue.db",
            guard_url=relay.url + "/health",
        )
        config["site"]["timezone"] = "UTC"
        config["peak_hours"] = [window(peak_now)]
        config["proxy"]["replay"].update(rate=f"{rate:g}/s", peak_rate=f"{peak_rate:g}/s")
        proxy = ProxyProcess(tmp_path, config)
        proxy.start()
        try:
            await proxy.wait_ready()
            await eventually(lambda: mode_is(proxy, "offline"), 15, "the proxy offline")
            keys = [f"rate-{n:02d}" for n in range(WRITES)]
            async with aiohttp.ClientSession() as session:
                for n, key in enumerate(keys):
                    # One order key each: only the pacing can hold the replay back.
                    headers = {"Idempotency-Key": key, "Netwatch-Order-Key": f"st-{n}"}
                    body = {"station": f"st-{n}", "seq": n}
                    async with session.post(
                        proxy.url + "/api/applications", json=body, headers=headers
                    ) as resp:
                        assert resp.status == 202
            relay.mode = "pass"
            replaying = await eventually(lambda: mode_is(proxy, "replaying"), 15, "replaying")
            assert replaying["replay"]["rate_per_s"] == SLOW
            await eventually(
                lambda: _received(sim, WRITES), 30, f"{WRITES} writes replayed", interval=0.1
            )
        finally:
            proxy.stop()
    times = sorted(row["elapsed_s"] for row in sim.receipts)
    measured = (WRITES - 1) / (times[-1] - times[0])
    print(f"\nreplay at {measured:.2f}/s, configured {SLOW:g}/s (peak now: {peak_now})")
    assert SLOW * 0.5 <= measured <= SLOW * 1.6
    assert_received_once(sim.receipts, keys)


async def _received(sim: PopulationSimulator, count: int) -> bool:
    return len(sim.receipts) >= count
