"""An operator's MQTT ``cmd/mode`` reaches the site daemon's OWN station proxy: one real
``netwatch run`` process with a ``proxy:`` section, a real Mosquitto broker (private to the
test, unique prefix), the population-database simulator healthy the whole time.

Offline by command, the proxy answers writes 202 (queued) and reads 503 although its guard
is up; back to ``auto``, it replays the queued write once and forwards again.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers.daemon import eventually, free_tcp_port, run_daemon
from helpers.mosquitto import run_mosquitto
from helpers.mqtt_sub import watch
from helpers.receipts import assert_received_once

from netwatch.demo.simulator import PopulationSimulator

pytestmark = pytest.mark.slow

SITE = "q1-own-proxy"


async def http(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, str | None]:
    async with session.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers.get("Netwatch-Ticket")


async def test_cmd_mode_over_mqtt_switches_the_daemons_own_proxy(
    tmp_path: Path, sim: PopulationSimulator
) -> None:
    prefix = f"nwtest-{uuid.uuid4().hex[:8]}/v1"
    topic = f"{prefix}/{SITE}"
    proxy_url = f"http://127.0.0.1:{free_tcp_port()}"
    async with run_mosquitto(tmp_path) as broker, watch(broker, f"{topic}/#") as operator:
        config = {
            "site": {"id": SITE, "timezone": "UTC"},
            "defaults": {"interval": "200ms", "timeout": "300ms"},
            "targets": [{"name": "popdb-api", "type": "http", "url": f"{sim.url}/health"}],
            "link": {"fail_after": 2, "recover_after": 2},
            "metrics": {"listen": f"127.0.0.1:{free_tcp_port()}"},
            "mqtt": {"url": broker.url, "prefix": prefix},
            "proxy": {
                "listen": proxy_url.removeprefix("http://"),
                "upstream": sim.url,
                "guard": ["popdb-api"],
                "queue": {"path": str(tmp_path / "queue.db")},
            },
        }
        async with run_daemon(tmp_path, config) as daemon, aiohttp.ClientSession() as session:

            async def proxy(mode: str) -> dict[str, Any] | None:
                status = (await daemon.status()).get("proxy")
                ok = status and status["mode"] == mode and status["guard"]["popdb-api"] == "ok"
                return status if ok else None

            await eventually(lambda: proxy("online"), 15, "the proxy online, guard up")
            # Subscribed to cmd/mode before it says online (mqtt.py): a command now lands.
            await operator.wait_for(
                lambda: (s := operator.latest(f"{topic}/status")) and s["online"], 15, "online"
            )
            status, body, _ = await http(session, "GET", f"{proxy_url}/api/citizens/1")
            assert (status, body["id"]) == (200, "1")

            await operator.publish(f"{topic}/cmd/mode", {"mode": "offline"})
            offline = await eventually(lambda: proxy("offline"), 10, "the proxy offline")
            assert (offline["reason"], offline["override"]) == ("operator", "offline")
            write = {"citizen_id": "2", "station": "st-1", "seq": 1}
            headers = {"Idempotency-Key": "cmd-1"}
            status, body, ticket = await http(
                session, "POST", f"{proxy_url}/api/applications", json=write, headers=headers
            )
            assert (status, body["status"]) == (202, "queued")
            status, body, _ = await http(session, "GET", f"{proxy_url}/api/citizens/1")
            assert (status, body) == (503, {"error": "upstream_unavailable", "mode": "offline"})
            assert sim.receipts == []
            await operator.wait_for(
                lambda: (m := operator.latest(f"{topic}/mode")) and m["mode"] == "offline",
                10,
                "the mode published offline",
            )

            await operator.publish(f"{topic}/cmd/mode", {"mode": "auto"})
            await eventually(lambda: proxy("online"), 15, "the proxy back online")
            status, body, _ = await http(session, "GET", f"{proxy_url}/_netwatch/tickets/{ticket}")
            assert (status, body["state"]) == (200, "delivered")
    assert_received_once(sim.receipts, ["cmd-1"])
    assert len(sim.receipts) == 1
