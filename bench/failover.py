"""Failover latency of the station proxy: how long the first write waits when the link
breaks, and the latency of writes once the proxy is offline.

    .venv/bin/python bench/failover.py [--writes 500] [--concurrency 16] [--dir DIR]

Real sockets on loopback: station client -> StationProxy -> fault relay -> simulator.
For each fault the proxy starts online with warm keep-alive connections, the relay breaks
the link, and one write is timed (answered 202 once it is durably queued):

- ``refuse``: connections reset and new connects refused; passive detection is immediate.
- ``blackhole``: bytes vanish. Without help the first write waits for
  ``proxy.request_timeout``; with a guard probe noticing the outage (simulated here after
  ``--guard-after`` seconds, as a probe with ``fail_after`` would) the waiting forward is
  abandoned and queued at that moment.

Then ``--writes`` writes at ``--concurrency`` are sent while offline: p50 / p99 / max.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers.relay import FaultRelay, RelayMode  # found through the path set just above
from helpers.servers import free_port

from netwatch.config.schema import Proxy
from netwatch.demo.simulator import PopulationSimulator, SimulatorSettings
from netwatch.events import EventHub
from netwatch.proxy.station import StationProxy


@asynccontextmanager
async def proxy_for(upstream: str, db: Path, **extra: object) -> AsyncIterator[StationProxy]:
    settings = Proxy.model_validate(
        {
            "listen": f"127.0.0.1:{free_port()}",
            "upstream": upstream,
            "queue": {"path": str(db)},
            "connect_timeout": "2s",
            **extra,
        }
    )
    proxy = StationProxy(settings, "bench", CollectorRegistry(), EventHub(), lambda: False, None)
    async with proxy:
        yield proxy


async def write(session: aiohttp.ClientSession, url: str, n: int) -> tuple[int, float]:
    started = time.perf_counter()
    async with session.post(f"{url}/api/applications", json={"citizen_id": str(n)}) as r:
        await r.read()
        return r.status, time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def scenario(
    name: str,
    fault: RelayMode,
    directory: Path,
    *,
    writes: int,
    concurrency: int,
    during: Callable[[StationProxy], Awaitable[None]] | None = None,
    **extra: object,
) -> None:
    async with (
        PopulationSimulator(SimulatorSettings(), host="127.0.0.1", port=0) as sim,
        FaultRelay("127.0.0.1", sim.port) as relay,
        proxy_for(relay.url, directory / f"{name}.db", **extra) as proxy,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session,
    ):
        if "guard" in extra:
            proxy.set_guard("popdb-api", True)
        # Warm up: keep-alive connections to the upstream exist when the link breaks.
        await asyncio.gather(*(write(session, proxy.url, -i) for i in range(concurrency)))
        relay.mode = fault
        helper = asyncio.ensure_future(during(proxy)) if during else None
        status, first = await write(session, proxy.url, 0)
        if helper is not None:
            with contextlib.suppress(asyncio.CancelledError):
                helper.cancel()
                await helper
        gate = asyncio.Semaphore(concurrency)

        async def one(n: int) -> tuple[int, float]:
            async with gate:
                return await write(session, proxy.url, n)

        started = time.perf_counter()
        results = await asyncio.gather(*(one(n) for n in range(1, writes + 1)))
        elapsed = time.perf_counter() - started
        received, twice = len(sim.receipts), len(sim.received_more_than_once())
    latencies = [lat for _, lat in results]
    statuses = {s for s, _ in results}
    print(
        f"  {name:<24} first write {first * 1000:8.1f} ms (HTTP {status});"
        f" offline: p50 {statistics.median(latencies) * 1000:6.2f} ms"
        f"  p99 {pct(latencies, 0.99) * 1000:6.2f} ms  max {max(latencies) * 1000:6.2f} ms"
        f"  {writes / elapsed:6.0f} writes/s  statuses {sorted(statuses)}"
        f"  upstream received {received} writes ({twice} keys twice)"
    )


async def main(args: argparse.Namespace, directory: Path) -> None:
    common = {"writes": args.writes, "concurrency": args.concurrency}
    print(f"failover, {args.writes} offline writes at concurrency {args.concurrency}")
    await scenario("refused", "refuse", directory, **common)

    async def guard_down(proxy: StationProxy) -> None:
        await asyncio.sleep(args.guard_after)
        proxy.set_guard("popdb-api", False)

    await scenario(
        f"black hole, timeout {args.request_timeout:g}s",
        "blackhole",
        directory,
        request_timeout=f"{args.request_timeout}s",
        **common,
    )
    await scenario(
        f"black hole, guard {args.guard_after:g}s",
        "blackhole",
        directory,
        during=guard_down,
        request_timeout="30s",
        guard=["popdb-api"],
        **common,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--request-timeout", type=float, default=5.0)
    parser.add_argument("--guard-after", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=None)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=arguments.dir) as tmp:
        asyncio.run(main(arguments, Path(tmp)))
