"""Real packet loss, not a relay: the population-database simulator runs in its own network
namespace behind a veth pair, and an nftables rule there silently drops its port.

That is the failure a relay cannot fake: no RST, no FIN, just silence, so everything has to
notice by *timeout*. These tests prove that the stand-alone proxy goes offline on it,
queues writes (202), replays each exactly once and in order when the packets flow again,
and that the site monitor marks a tcp target down with the ``timeout`` error class and up
again. They need root, ``ip`` and ``nft``, and are skipped with the reason otherwise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers.daemon import eventually, free_tcp_port, run_daemon
from helpers.netns import NetNs, unavailable_reason
from helpers.receipts import assert_received_once
from helpers.stations import ProxyProcess, proxy_config

pytestmark = [pytest.mark.netns, pytest.mark.slow]

SIM_PORT = 18099  # the namespace is new and empty: any port is free in it
WRITES = 6


@pytest.fixture
def netns() -> Iterator[NetNs]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with NetNs.create() as ns:
        yield ns


async def get_json(url: str, timeout: float = 2.0) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
        session.get(url) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


@pytest.fixture
async def sim_url(netns: NetNs, tmp_path: Path) -> str:
    """The simulator inside the namespace, reachable from the root namespace over the veth
    (``NetNs.close`` kills it with the namespace)."""
    argv = [sys.executable, "-m", "netwatch.demo.simulator", "--host", netns.ns_addr]
    argv += ["--port", str(SIM_PORT), "--latency-ms", "0", "--jitter-ms", "0"]
    proc = netns.popen(argv, tmp_path / "sim.log")
    url = f"http://{netns.ns_addr}:{SIM_PORT}"

    async def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"simulator exited: {(tmp_path / 'sim.log').read_text()}")
        try:
            code, _ = await get_json(url + "/health", timeout=0.5)
        except (OSError, aiohttp.ClientError, TimeoutError):
            return False
        return code == 200

    await eventually(healthy, 15.0, "the simulator in the namespace to answer")
    return url


async def post(url: str, key: str, seq: int) -> tuple[int, dict[str, Any], str | None]:
    headers = {"Idempotency-Key": key, "Netwatch-Order-Key": "st-ns"}
    body = {"station": "st-ns", "seq": seq, "citizen_id": f"{seq:012d}"}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.post(url + "/api/applications", json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json(content_type=None), resp.headers.get("Netwatch-Ticket")


def events(proxy_log: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in proxy_log if e.get("event") == name]


@pytest.mark.timeout(60)
async def test_proxy_goes_offline_on_silent_drop_and_replays_once(
    netns: NetNs, sim_url: str, tmp_path: Path
) -> None:
    config = proxy_config(
        listen=f"127.0.0.1:{free_tcp_port()}",
        upstream=sim_url,
        queue_path=tmp_path / "queue.db",
        guard_url=sim_url + "/health",
        request_timeout="2s",
    )
    proxy = ProxyProcess(tmp_path, config)
    proxy.start()
    try:
        await proxy.wait_ready()

        async def mode_is(mode: str) -> dict[str, Any] | None:
            status = await proxy.status()
            return status if status is not None and status["mode"] == mode else None

        await eventually(lambda: mode_is("online"), 10.0, "the proxy online")
        status, body, _ = await post(proxy.url, "ns-00000", 0)
        assert status == 201, body

        handle = netns.drop_tcp_port(SIM_PORT)
        dropped_at = time.monotonic()
        # Sent before anything noticed: its forward hangs on the silent link, and must end
        # queued (abandoned when the guard goes down, or passively by timeout), not failed.
        status, body, first = await post(proxy.url, "ns-00001", 1)
        assert status == 202, body
        hung = time.monotonic() - dropped_at
        offline = await eventually(lambda: mode_is("offline"), 10.0, "the proxy offline")
        assert offline["guard"] == {"popdb-api": "down"}
        down = [e for e in events(proxy.log_events(), "link_state_changed") if e["new"] == "down"]
        assert down, proxy.log_tail()
        assert down[-1]["error"] == "timeout", down[-1]

        tickets = [first]
        for seq in range(2, WRITES + 1):
            status, body, ticket = await post(proxy.url, f"ns-{seq:05d}", seq)
            assert status == 202, body
            assert body["status"] == "queued"
            assert ticket == body["ticket"]
            tickets.append(ticket)
        queued = await proxy.status()
        assert queued is not None
        assert queued["mode"] == "offline"

        netns.delete_rule(handle)
        print(f"\nfirst write hung {hung:.2f}s; drop held {time.monotonic() - dropped_at:.1f}s")
        await eventually(lambda: mode_is("online"), 20.0, "the proxy online after replay")
        await eventually(
            lambda: _drained(proxy), 10.0, "the queue empty", interval=0.2
        )  # the depth in /status refreshes once a second

        code, applied = await get_json(sim_url + "/_sim/applied")
        assert code == 200
        keys = [row["idempotency_key"] for row in applied]
        assert keys == [f"ns-{seq:05d}" for seq in range(WRITES + 1)], keys
        # ns-00001's first forward was written into the silent link and timed out: it is in
        # doubt (TCP may still deliver those bytes once the drop is lifted). Nothing else
        # may arrive twice.
        code, receipts = await get_json(sim_url + "/_sim/receipts")
        assert code == 200
        assert_received_once(receipts, keys, resent={"ns-00001"})
        assert len(receipts) in {WRITES + 1, WRITES + 2}
        for ticket in tickets:
            code, state = await proxy.get_json(f"/_netwatch/tickets/{ticket}")
            assert code == 200
            assert state["state"] == "delivered", state
        modes = [e["mode"] for e in events(proxy.log_events(), "proxy_mode_changed")]
        assert modes[-3:] == ["offline", "replaying", "online"], modes
    finally:
        proxy.stop()


async def _drained(proxy: ProxyProcess) -> bool:
    status = await proxy.status()
    return bool(status and status["queue"] and status["queue"]["depth"] == 0)


@pytest.mark.timeout(60)
async def test_monitor_marks_tcp_target_down_by_timeout_and_back_up(
    netns: NetNs, sim_url: str, tmp_path: Path
) -> None:
    config = {
        "site": {"id": "netns-lab"},
        "targets": [
            {
                "name": "popdb-tcp",
                "type": "tcp",
                "host": netns.ns_addr,
                "port": SIM_PORT,
                "interval": "200ms",
                "timeout": "300ms",
            }
        ],
        "link": {"fail_after": 2, "recover_after": 2},
        "metrics": {"listen": f"127.0.0.1:{free_tcp_port()}"},
    }
    async with run_daemon(tmp_path, config) as daemon:

        async def target(state: str) -> dict[str, Any] | None:
            row = (await daemon.status())["targets"][0]
            return row if row["state"] == state else None

        await eventually(lambda: target("up"), 10.0, "the tcp target up")
        handle = netns.drop_tcp_port(SIM_PORT)
        try:
            down = await eventually(lambda: target("down"), 10.0, "the tcp target down")
        finally:
            netns.delete_rule(handle)
        assert down["last"]["error"] == "timeout", down
        assert await daemon.value("netwatch_link_up", target="popdb-tcp") == 0.0
        await eventually(lambda: target("up"), 10.0, "the tcp target back up")
        changes = [e for e in daemon.log_events() if e.get("event") == "link_state_changed"]
        assert [(e["new"], e["error"]) for e in changes][-2:] == [("down", "timeout"), ("up", None)]
