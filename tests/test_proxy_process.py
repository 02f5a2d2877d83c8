"""``netwatch proxy -c FILE`` as a real process: it guards the upstream with its own probe,
forwards, serves its metrics, and stops cleanly."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from helpers.daemon import DaemonProcess, eventually, free_tcp_port, write_config
from helpers.receipts import assert_received_once
from helpers.relay import FaultRelay
from helpers.stations import proxy_config

from netwatch.demo.simulator import PopulationSimulator


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return await resp.json()


async def test_proxy_process_follows_its_guard_and_exports_metrics(tmp_path: Path) -> None:
    async with (
        PopulationSimulator() as sim,
        FaultRelay("127.0.0.1", sim.port) as relay,
        aiohttp.ClientSession() as session,
    ):
        port = free_tcp_port()
        config = proxy_config(
            listen=f"127.0.0.1:{port}",
            upstream=relay.url,
            queue_path=tmp_path / "queue.db",
            guard_url=f"{relay.url}/health",
            request_timeout="2s",
        )
        cfg = write_config(tmp_path / "proxy.yaml", config)
        proc = DaemonProcess(["proxy", "-c", str(cfg)], tmp_path / "proxy.log", None)
        base = f"http://127.0.0.1:{port}"
        try:

            async def mode() -> str | None:
                try:
                    status = await get_json(session, f"{base}/_netwatch/status")
                except aiohttp.ClientError:
                    return None
                value: str = status["mode"]
                return value

            await eventually(lambda: _equals(mode, "online"), 15, "proxy online")
            async with session.post(
                f"{base}/api/applications", json={"station": "s1", "seq": 1}
            ) as resp:
                assert resp.status == 201
            assert [a["station_seq"] for a in sim.applied] == [1]

            relay.mode = "refuse"
            await eventually(lambda: _equals(mode, "offline"), 10, "proxy offline")
            async with session.post(
                f"{base}/api/applications", json={"station": "s1", "seq": 2}
            ) as resp:
                assert resp.status == 202
                ticket = resp.headers["Netwatch-Ticket"]

            relay.mode = "pass"
            await eventually(lambda: _equals(mode, "online"), 15, "proxy back online")
            state = await get_json(session, f"{base}/_netwatch/tickets/{ticket}")
            assert state["state"] == "delivered"
            assert [a["station_seq"] for a in sim.applied] == [1, 2]
            assert_received_once(sim.receipts, [a["idempotency_key"] for a in sim.applied])
            assert len(sim.receipts) == 2

            async with session.get(f"{base}/_netwatch/metrics") as resp:
                text = await resp.text()
            assert 'netwatch_proxy_mode{mode="online",site="chaos-lab"} 1.0' in text
            assert 'netwatch_link_state{site="chaos-lab",state="up"' in text

            status = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "netwatch", "status", "--url", base,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await status.communicate()
            assert status.returncode == 0, err.decode()
            assert "station proxy  guard: popdb-api ok" in out.decode()
            assert "proxy online" in out.decode()

            proc.signal(signal.SIGTERM)
            assert await proc.wait_exit(5.0) == 0
        finally:
            proc.kill()


async def _equals(read: Any, expected: str) -> bool:
    return bool(await read() == expected)
