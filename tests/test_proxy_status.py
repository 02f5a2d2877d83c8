"""What the proxy's status adds for the staff page: the site (for its time zone) and when a
queued entry was last delivered, which survives a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import aiohttp
from helpers.relay import FaultRelay
from helpers.servers import free_port, wait_until
from prometheus_client import CollectorRegistry

from netwatch.config.schema import Proxy
from netwatch.demo.simulator import PopulationSimulator, SimulatorSettings
from netwatch.events import EventHub
from netwatch.proxy.station import StationProxy


@asynccontextmanager
async def running(settings: Proxy) -> AsyncIterator[StationProxy]:
    proxy = StationProxy(
        settings,
        "q1",
        CollectorRegistry(),
        EventHub(),
        lambda: False,
        None,
        site_name="UBND phường Bến Nghé",
        timezone="Asia/Ho_Chi_Minh",
    )
    async with proxy:
        task = asyncio.get_running_loop().create_task(proxy.run())
        try:
            yield proxy
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_last_delivered_is_reported_and_survives_a_restart(tmp_path: Path) -> None:
    async with (
        PopulationSimulator(SimulatorSettings(), host="127.0.0.1", port=0) as sim,
        FaultRelay("127.0.0.1", sim.port) as relay,
    ):
        settings = Proxy.model_validate(
            {
                "listen": f"127.0.0.1:{free_port()}",
                "upstream": relay.url,
                "queue": {"path": str(tmp_path / "queue.db")},
                "replay": {"rate": "1000/s", "backoff_initial": "100ms"},
                "connect_timeout": "1s",
            }
        )
        async with running(settings) as proxy:
            status = proxy.status()
            assert status["site"] == {
                "id": "q1",
                "name": "UBND phường Bến Nghé",
                "timezone": "Asia/Ho_Chi_Minh",
            }
            assert status["last_delivered_at"] is None
            relay.mode = "refuse"
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{proxy.url}/api/applications", json={"seq": 1}) as response,
            ):
                assert response.status == 202
                queued_at = datetime.fromisoformat((await response.json())["queued_at"])
            relay.mode = "pass"
            delivered = await wait_until(
                lambda: proxy.status()["last_delivered_at"], timeout=30, interval=0.1
            )
            assert datetime.fromisoformat(delivered) >= queued_at
        async with running(settings) as again:
            assert again.status()["last_delivered_at"] == delivered
