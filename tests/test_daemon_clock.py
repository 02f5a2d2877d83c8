"""Wall clock steps under the site daemon: the real ``netwatch run`` under libfaketime, and
the monitor's outage accounting driven by the fake clock.

The rule (docs/contract-notes.md, "Clock steps"): durations, holds and rates run on the
monotonic clock; the wall clock only says *when* for humans (``since``) and whether it is
peak time. So a step of the wall clock moves the peak gauge and the peak label of the time
that follows, and nothing else: outage seconds count the time really spent down, never run
backwards, and an alert's hold-down lasts ``hold_down`` seconds whichever way the clock
jumped. Each test steps the daemon's clock while a link it probes (through a loopback fault
relay) is down or in hold-down, and reads ``/metrics``, ``/api/v1/status`` and a loopback
webhook. The pure tests at the end feed probe results to ``Monitor.observe`` with a
``FakeClock`` whose wall clock steps.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.daemon import DaemonProcess, eventually, free_tcp_port, write_config
from helpers.faketime import WallClock
from helpers.relay import FaultRelay
from prometheus_client import CollectorRegistry
from test_notify import Receiver, serve

from netwatch.clock import FakeClock
from netwatch.config.schema import Config
from netwatch.monitor.metrics import MonitorMetrics, TimeCollector
from netwatch.monitor.runner import Monitor, TargetRuntime, build_probe
from netwatch.monitor.schedule import PeakSchedule
from probes import ProbeResult

TARGET = "popdb-gw"
# Two hours and five minutes: far enough to land inside the peak window the config puts
# two hours ahead of real time.
INTO_PEAK = 2 * 3600 + 5 * 60


def site_config(
    relay_port: int, metrics_port: int, *, webhook: str | None = None, hold_down: float = 5.0
) -> dict[str, Any]:
    """Peak hours from two to three hours ahead of real time: off-peak until a step."""
    now = datetime.now(UTC)
    start, end = now + timedelta(hours=2), now + timedelta(hours=3)
    config: dict[str, Any] = {
        "site": {"id": "q1-ben-nghe", "name": "UBND phường Bến Nghé", "timezone": "UTC"},
        "peak_hours": [
            {"days": ["mon-sun"], "start": start.strftime("%H:%M"), "end": end.strftime("%H:%M")}
        ],
        "defaults": {"interval": "200ms", "timeout": "300ms"},
        "targets": [{"name": TARGET, "type": "tcp", "host": "127.0.0.1", "port": relay_port}],
        "link": {"fail_after": 3, "recover_after": 2},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "notify": {"hold_down": f"{hold_down}s"},
    }
    if webhook is not None:
        config["notify"]["webhooks"] = [{"url": webhook}]
    return config


@asynccontextmanager
async def stepped_daemon(
    tmp_path: Path, config: dict[str, Any], clock: WallClock
) -> AsyncIterator[DaemonProcess]:
    path = write_config(tmp_path / "netwatch.yaml", config)
    url = f"http://{config['metrics']['listen']}"
    daemon = DaemonProcess(["run", "-c", str(path)], tmp_path / "netwatch.log", url, env=clock.env)
    try:
        await daemon.wait_healthy(30)
        yield daemon
    finally:
        daemon.kill()


async def state_is(daemon: DaemonProcess, state: str) -> bool:
    targets = (await daemon.status())["targets"]
    return any(t["name"] == TARGET and t["state"] == state for t in targets)


async def outage(daemon: DaemonProcess) -> tuple[float, float]:
    """``(off_peak, peak)`` outage seconds of the target, from ``/metrics``."""
    name = "netwatch_outage_seconds_total"
    off = await daemon.value(name, target=TARGET, peak="false")
    on = await daemon.value(name, target=TARGET, peak="true")
    assert off is not None, "no off-peak outage series in /metrics"
    assert on is not None, "no peak outage series in /metrics"
    return off, on


def alive(daemon: DaemonProcess) -> None:
    assert daemon.proc.poll() is None, f"daemon died:\n{daemon.log_path.read_text()[-3000:]}"


@pytest.mark.slow
async def test_forward_step_into_peak_moves_the_peak_label_but_adds_no_outage_time(
    tmp_path: Path, tcp_upstream: int
) -> None:
    clock = WallClock(tmp_path)
    async with FaultRelay("127.0.0.1", tcp_upstream) as relay:
        config = site_config(relay.port, free_tcp_port())
        async with stepped_daemon(tmp_path, config, clock) as daemon:
            await eventually(lambda: state_is(daemon, "up"), 20, "link up")
            assert await daemon.value("netwatch_peak_hours") == 0
            relay.mode = "refuse"
            down_at = time.monotonic()
            await eventually(lambda: state_is(daemon, "down"), 20, "link down")

            async def some_off_peak_outage() -> bool:
                return (await outage(daemon))[0] >= 0.5

            await eventually(some_off_peak_outage, 20, "off-peak outage seconds")

            clock.step_to(INTO_PEAK)

            async def peak_now() -> bool:
                return await daemon.value("netwatch_peak_hours") == 1

            await eventually(peak_now, 20, "the daemon inside peak hours after the step")

            async def peak_outage_grows() -> bool:
                return (await outage(daemon))[1] >= 0.5

            await eventually(peak_outage_grows, 20, "outage seconds counted as peak")
            off, on = await outage(daemon)
            really_down = time.monotonic() - down_at
            # The outage lasted seconds, not the two hours the clock jumped.
            assert off + on <= really_down + 1.0, (off, on, really_down)

            # The probe schedule runs on the monotonic clock: two hours ahead on the wall
            # clock are not 36 000 missed rounds of 200 ms.
            skipped = await daemon.value("netwatch_scheduler_skipped_total")
            assert skipped is not None
            assert skipped < 10

            relay.mode = "pass"
            await eventually(lambda: state_is(daemon, "up"), 20, "link back up")
            off_after, on_after = await outage(daemon)
            assert off_after >= off
            assert on_after >= on
            assert off_after + on_after <= time.monotonic() - down_at + 1.0
            # The outage began before the step: off-peak, once.
            assert await daemon.value("netwatch_outages_total", target=TARGET, peak="false") == 1
            assert await daemon.value("netwatch_outages_total", target=TARGET, peak="true") == 0
            # ``since`` is for humans: it follows the stepped wall clock.
            [row] = (await daemon.status())["targets"]
            since = datetime.fromisoformat(row["since"])
            assert since - datetime.now(UTC) > timedelta(hours=2)
            alive(daemon)


@pytest.mark.slow
async def test_backward_step_during_an_outage_keeps_counting_and_never_runs_the_counter_back(
    tmp_path: Path, tcp_upstream: int
) -> None:
    clock = WallClock(tmp_path)
    async with FaultRelay("127.0.0.1", tcp_upstream) as relay:
        config = site_config(relay.port, free_tcp_port())
        async with stepped_daemon(tmp_path, config, clock) as daemon:
            await eventually(lambda: state_is(daemon, "up"), 20, "link up")
            relay.mode = "refuse"
            down_at = time.monotonic()
            await eventually(lambda: state_is(daemon, "down"), 20, "link down")

            async def some_outage() -> float:
                return sum(await outage(daemon))

            before = await eventually(lambda: _at_least(some_outage, 0.5), 20, "outage seconds")
            clock.step_to(-3600)

            async def stepped_back() -> bool:
                [row] = (await daemon.status())["targets"]
                last_probe = datetime.fromisoformat(row["last"]["at"])
                return last_probe < datetime.now(UTC) - timedelta(minutes=50)

            await eventually(stepped_back, 20, "the daemon's wall clock an hour back")
            # Still down, still counting: the counter goes on from where it was.
            grown = await eventually(lambda: _at_least(some_outage, before + 0.5), 20, "growth")
            assert grown <= time.monotonic() - down_at + 1.0

            relay.mode = "pass"
            await eventually(lambda: state_is(daemon, "up"), 20, "link back up")
            alive(daemon)
            final = await some_outage()
            assert grown <= final <= time.monotonic() - down_at + 1.0
            changes = [e for e in daemon.log_events() if e.get("event") == "link_state_changed"]
            assert [(e["old"], e["new"]) for e in changes][-2:] == [("up", "down"), ("down", "up")]
            [row] = (await daemon.status())["targets"]
            assert row["state"] == "up"
            assert (await daemon.status())["uptime_s"] >= 0


async def _at_least(read: Any, floor: float) -> float | None:
    value: float = await read()
    return value if value >= floor else None


@pytest.mark.slow
@pytest.mark.parametrize("step", [-3600, 7200], ids=["back_1h", "forward_2h"])
async def test_alert_hold_down_lasts_its_seconds_whichever_way_the_clock_steps(
    tmp_path: Path, tcp_upstream: int, step: int
) -> None:
    hold_down = 5.0
    clock = WallClock(tmp_path)
    # The first delivery is refused (503): its retry wait straddles the first step.
    receiver = Receiver([503])
    async with FaultRelay("127.0.0.1", tcp_upstream) as relay, serve(receiver) as hook:
        config = site_config(relay.port, free_tcp_port(), webhook=hook, hold_down=hold_down)
        async with stepped_daemon(tmp_path, config, clock) as daemon:
            await eventually(lambda: state_is(daemon, "up"), 20, "link up")
            relay.mode = "refuse"

            async def refused_once() -> bool:
                return receiver.calls >= 1

            await eventually(refused_once, 20, "the firing alert's first delivery refused")
            clock.step_to(step)

            async def received(status: str) -> list[dict[str, Any]]:
                return [p for p in receiver.received if p["status"] == status]

            [firing] = await eventually(lambda: received("firing"), 20, "firing, retried")
            assert (firing["alert"], firing["target"]) == ("LinkDown", TARGET)

            relay.mode = "pass"
            await eventually(lambda: state_is(daemon, "up"), 20, "link back up")
            up_at = time.monotonic()
            clock.step_to(2 * step)  # inside the hold-down
            [resolved] = await eventually(lambda: received("resolved"), 30, "resolved")
            took = time.monotonic() - up_at
            # A backward step must not hold the resolution for an hour, nor a forward one
            # cut the hold-down short.
            assert took >= hold_down - 1.0, took
            assert "lasted -" not in resolved["summary"]
            assert "lasted" in resolved["summary"]
            alive(daemon)


# --- pure: the monitor's outage accounting, fake clock ---------------------------------------

# Monday 2026-11-23 06:00 UTC; peak hours 08:00-10:00 UTC every day.
T0 = datetime(2026, 11, 23, 6, 0, tzinfo=UTC)


class Site:
    """A monitor with one target, fed probe verdicts by hand at fake-clock times."""

    def __init__(self) -> None:
        self.clock = FakeClock(T0)
        self.config = Config.model_validate(
            {
                "site": {"id": "q1", "timezone": "UTC"},
                "peak_hours": [{"days": ["mon-sun"], "start": "08:00", "end": "10:00"}],
                "targets": [{"name": TARGET, "type": "tcp", "host": "127.0.0.1", "port": 9}],
                "link": {"fail_after": 1, "recover_after": 1},
            }
        )
        self.registry = CollectorRegistry()
        metrics = MonitorMetrics(self.registry, "q1", "0")
        schedule = PeakSchedule.from_config(self.config)
        self.monitor = Monitor(self.config, clock=self.clock, schedule=schedule, metrics=metrics)
        spec = self.config.targets[0]
        self.rt = TargetRuntime(spec, build_probe(spec), 10.0, 1.0, metrics.children(TARGET, "tcp"))
        self.monitor.targets[TARGET] = self.rt
        self.registry.register(
            TimeCollector(
                "q1", lambda: schedule.is_peak(self.clock.now()), self.monitor.outage_totals
            )
        )

    def probe(self, success: bool, after: float = 10.0) -> None:
        self.clock.advance(after)
        result = ProbeResult(type="tcp", target="x", success=success, latency=0.001)
        self.monitor.observe(self.rt, result)

    def outage(self) -> tuple[float, float]:
        def get(peak: str) -> float:
            labels = {"site": "q1", "target": TARGET, "type": "tcp", "peak": peak}
            return self.registry.get_sample_value("netwatch_outage_seconds_total", labels) or 0.0

        return get("false"), get("true")


def test_outage_seconds_are_split_exactly_at_a_peak_boundary_without_steps() -> None:
    site = Site()
    site.probe(True, after=0)
    site.probe(False, after=7140)  # 07:59 down
    for _ in range(12):
        site.probe(False)  # rounds every 10 s to 08:01
    assert site.outage() == (60.0, 60.0)
    site.probe(True)  # 08:01:10 up
    assert site.outage() == (60.0, 70.0)


def test_forward_step_during_an_outage_adds_no_seconds_and_moves_the_peak_label() -> None:
    site = Site()
    site.probe(True, after=0)
    site.probe(False)  # 06:00:10 down, off-peak
    site.probe(False)
    assert site.outage() == (10.0, 0.0)
    site.clock.step_wall(2 * 3600)  # now 08:00:20: peak
    assert site.outage() == (10.0, 0.0)  # a scrape right after the step: nothing jumped
    site.probe(False)  # this round's 10 s straddle the step: placed before it
    site.probe(False)
    site.probe(True)
    assert site.outage() == (20.0, 20.0)


def test_backward_step_during_an_outage_never_runs_the_counter_back() -> None:
    site = Site()
    site.probe(True, after=0)
    site.probe(False, after=7200)  # 08:00:10 down, in peak
    site.probe(False)
    seen = site.outage()
    assert seen == (0.0, 10.0)
    site.clock.step_wall(-3600)  # 07:00:20: off-peak again
    totals = [site.outage()]
    for _ in range(3):
        site.probe(False)
        totals.append(site.outage())
    site.probe(True)
    totals.append(site.outage())
    for before, after in zip([seen, *totals], totals, strict=False):
        assert after[0] >= before[0], totals
        assert after[1] >= before[1], totals
    assert totals[-1] == (30.0, 20.0)
