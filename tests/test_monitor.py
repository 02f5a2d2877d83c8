"""The probe scheduler in-process, against real loopback servers: spread, no drift, a hung
probe that delays nobody else, and the lag self-metric."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from netwatch.clock import SystemClock
from netwatch.config.schema import Config
from netwatch.events import LinkChanged
from netwatch.monitor.metrics import MonitorMetrics
from netwatch.monitor.runner import Monitor
from netwatch.monitor.schedule import PeakSchedule


@pytest.fixture
async def hung_http_port() -> AsyncIterator[int]:
    """Accepts connections and never answers: an HTTP probe against it hangs."""
    held: list[asyncio.StreamWriter] = []

    async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]
        for writer in held:
            writer.close()


def make_config(targets: list[dict[str, Any]], **extra: Any) -> Config:
    return Config.model_validate(
        {"site": {"id": "lab", "timezone": "UTC"}, "targets": targets, **extra}
    )


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[tuple[Monitor, CollectorRegistry]]:
    registry = CollectorRegistry()
    monitor = Monitor(
        config,
        clock=SystemClock(),
        schedule=PeakSchedule.from_config(config),
        metrics=MonitorMetrics(registry, config.site.id, "test"),
    )
    try:
        async with asyncio.TaskGroup() as tg:
            monitor.start(tg)
            yield monitor, registry
            for rt in monitor.targets.values():
                assert rt.task is not None
                rt.task.cancel()
    finally:
        from probes.http import close_shared_sessions

        await close_shared_sessions()


async def test_each_target_keeps_its_own_interval_without_drift(tcp_upstream: int) -> None:
    config = make_config(
        [
            {
                "name": "fast",
                "type": "tcp",
                "host": "127.0.0.1",
                "port": tcp_upstream,
                "interval": "100ms",
            },
            {
                "name": "slow",
                "type": "tcp",
                "host": "127.0.0.1",
                "port": tcp_upstream,
                "interval": "500ms",
            },
        ]
    )
    async with running(config) as (monitor, registry):
        await asyncio.sleep(3.0)
        fast, slow = monitor.targets["fast"].rounds, monitor.targets["slow"].rounds
    # 3 s at 100 ms is 30 rounds minus the random first phase (< 1 interval); drift would
    # lose rounds steadily, a double schedule would add them.
    assert 28 <= fast <= 31
    assert 5 <= slow <= 7
    lag_count = registry.get_sample_value("netwatch_scheduler_lag_seconds_count", {"site": "lab"})
    # The lag is recorded as a probe starts, a round counted as it ends: at the moment of
    # reading, each target may have one probe in flight.
    assert lag_count is not None
    assert fast + slow <= lag_count <= fast + slow + 2
    lag_sum = registry.get_sample_value("netwatch_scheduler_lag_seconds_sum", {"site": "lab"})
    assert lag_sum is not None
    assert lag_sum / lag_count < 0.05


async def test_a_hung_probe_delays_no_other_target(tcp_upstream: int, hung_http_port: int) -> None:
    config = make_config(
        [
            {
                "name": "hung",
                "type": "http",
                "url": f"http://127.0.0.1:{hung_http_port}/",
                "interval": "200ms",
                "timeout": "1s",
            },
            {
                "name": "healthy",
                "type": "tcp",
                "host": "127.0.0.1",
                "port": tcp_upstream,
                "interval": "100ms",
            },
        ],
        link={"fail_after": 1, "recover_after": 1},
    )
    changes: list[LinkChanged] = []
    async with running(config) as (monitor, registry):
        monitor.add_listener(changes.append)
        await asyncio.sleep(2.6)
        healthy, hung = monitor.targets["healthy"], monitor.targets["hung"]
        assert 23 <= healthy.rounds <= 26
        # The hung target's rounds take its whole timeout, so it skips the ones due meanwhile.
        assert 1 <= hung.rounds <= 3
        assert hung.last is not None
        assert hung.last.error == "timeout"
        skipped = registry.get_sample_value("netwatch_scheduler_skipped_total", {"site": "lab"})
        assert skipped is not None
        assert skipped >= 3
    assert [c.new for c in changes if c.target == "hung"] == ["down"]
    assert [c.new for c in changes if c.target == "healthy"] == ["up"]


async def test_first_probes_are_spread_over_the_interval(tcp_upstream: int) -> None:
    targets = [
        {
            "name": f"t{i}",
            "type": "tcp",
            "host": "127.0.0.1",
            "port": tcp_upstream,
            "interval": "1s",
        }
        for i in range(40)
    ]
    first_seen: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    start = loop.time()

    def record(event: LinkChanged) -> None:
        first_seen.setdefault(event.target, loop.time() - start)

    async with running(make_config(targets)) as (monitor, _):
        monitor.add_listener(record)
        await asyncio.sleep(1.2)
    assert len(first_seen) == 40
    # With a random phase, the first rounds cover the interval instead of one burst.
    early = sum(1 for t in first_seen.values() if t < 0.5)
    assert 8 <= early <= 32
    assert max(first_seen.values()) - min(first_seen.values()) > 0.5


async def test_concurrency_bound_holds(tcp_upstream: int, hung_http_port: int) -> None:
    targets = [
        {
            "name": f"h{i}",
            "type": "http",
            "url": f"http://127.0.0.1:{hung_http_port}/",
            "interval": "100ms",
            "timeout": "500ms",
        }
        for i in range(6)
    ]
    config = make_config(targets, scheduler={"max_concurrency": 2})
    async with running(config) as (monitor, _):
        await asyncio.sleep(1.3)
        rounds = sum(rt.rounds for rt in monitor.targets.values())
    # Two probe slots, each round holding one for its 0.5 s timeout: about 2 x 1.3 / 0.5.
    assert 2 <= rounds <= 6
