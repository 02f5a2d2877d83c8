"""``netwatch demo``: a whole site on loopback, with a working day compressed into a minute.

A simulated population-database API has outages clustered at peak hours; the real daemon
probes it (peak-aware, on a clock that runs at the simulated time of day), and, when
stations are asked for, the real station proxy sits in front of it with simulated ID-card
stations sending numbered applications. The terminal shows a live view; the summary at the
end says what happened and checks that nothing a station was told is queued got lost.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from rich.console import Console
from rich.live import Live
from rich.table import Table

from netwatch.config.schema import Config
from netwatch.daemon import Daemon
from netwatch.demo.simulator import (
    DayClock,
    PopulationSimulator,
    SimulatorSettings,
    default_outage_plan,
)
from netwatch.demo.stations import StationFleet
from netwatch.events import LinkChanged
from netwatch.words import plural

TIMEZONE = "Asia/Ho_Chi_Minh"
START_HOUR = 6.0
GUARD = "popdb-api"


@dataclass(frozen=True, slots=True)
class DemoOptions:
    duration: float = 60.0
    seconds_per_hour: float = 4.0
    stations: int = 3
    seed: int = 7
    metrics_port: int = 0


@dataclass(slots=True)
class DemoSummary:
    duration_s: float
    simulated_hours: float
    outages_planned: int
    outages_seen: int
    outages_seen_peak: int
    detection_delays_s: list[float]
    availability: float
    stations: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.stations.get("lost", 0) == 0


class DemoClock:
    """Real monotonic time, but a wall clock that shows the simulated time of day."""

    def __init__(self, day: DayClock, date: datetime) -> None:
        self._day = day
        self._origin = date

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        simulated = self._day.elapsed() * 3600.0 / self._day.seconds_per_hour
        return self._origin + timedelta(seconds=simulated)


def _simulated_origin() -> datetime:
    """06:00 on the most recent weekday in the site's timezone (peak hours are mon-fri)."""
    local = datetime.now(ZoneInfo(TIMEZONE))
    while local.weekday() >= 5:
        local -= timedelta(days=1)
    start = local.replace(hour=int(START_HOUR), minute=0, second=0, microsecond=0)
    return start.astimezone(UTC)


def demo_config(sim_url: str, metrics_port: int, proxy_port: int | None, queue: Path) -> Config:
    host_port = sim_url.removeprefix("http://")
    host, _, port = host_port.rpartition(":")
    data: dict[str, Any] = {
        "site": {
            "id": "demo-ben-nghe",
            "name": "UBND phường Bến Nghé (demo)",
            "timezone": TIMEZONE,
        },
        "peak_hours": [
            {"days": ["mon-fri"], "start": "07:30", "end": "11:30"},
            {"days": ["mon-fri"], "start": "13:30", "end": "16:30"},
        ],
        "defaults": {"interval": "250ms", "timeout": "400ms"},
        "targets": [
            {"name": GUARD, "type": "http", "url": f"{sim_url}/health", "expect_status": [200]},
            {"name": "popdb-tcp", "type": "tcp", "host": host, "port": int(port)},
        ],
        "link": {"fail_after": 2, "recover_after": 2, "degraded_latency": "300ms"},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }
    if proxy_port is not None:
        data["proxy"] = {
            "listen": f"127.0.0.1:{proxy_port}",
            "upstream": sim_url,
            "guard": [GUARD],
            "queue": {"path": str(queue), "max_bytes": "64MiB", "max_age": "72h"},
            "replay": {"rate": "200/s", "peak_rate": "50/s"},
            "connect_timeout": "300ms",
            "request_timeout": "2s",
        }
    return Config.model_validate(data)


def _free_port() -> int:
    import socket  # noqa: PLC0415 - only the demo needs a spare port

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Timeline:
    """Link changes of the guard target, in real seconds since the demo began."""

    def __init__(self, day: DayClock) -> None:
        self.day = day
        self.changes: list[tuple[float, LinkChanged]] = []

    def __call__(self, event: LinkChanged) -> None:
        if event.target == GUARD:
            self.changes.append((self.day.elapsed(), event))

    def downs(self) -> list[tuple[float, LinkChanged]]:
        return [(t, e) for t, e in self.changes if e.new == "down"]

    def availability(self, until: float) -> float:
        up_time, state, since = 0.0, "unknown", 0.0
        first_known: float | None = None
        for at, event in self.changes:
            if state in ("up", "degraded"):
                up_time += at - since
            if first_known is None and event.new != "unknown":
                first_known = at
            state, since = event.new, at
        if state in ("up", "degraded"):
            up_time += until - since
        span = until - (first_known or 0.0)
        return up_time / span if span > 0 else 0.0


def _detection_delays(
    plan: list[tuple[float, float]], downs: list[tuple[float, Any]]
) -> list[float]:
    delays = []
    for at, _ in downs:
        started = [s for s, e in plan if s <= at <= e + 2.0]
        if started:
            delays.append(at - max(started))
    return delays


def _view(
    day: DayClock, daemon: Daemon, fleet: StationFleet | None, sim: PopulationSimulator
) -> Table:
    now = day.time_at(day.elapsed())
    peak = daemon.is_peak()
    title = (
        f"netwatch demo  {now:%H:%M} simulated ({TIMEZONE})  {'PEAK HOURS' if peak else 'off-peak'}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("what")
    table.add_column("state")
    styles = {"up": "green", "degraded": "yellow", "down": "bold red", "unknown": "dim"}
    for name, state in daemon.monitor.states().items():
        table.add_row(f"link {name}", f"[{styles.get(state, '')}]{state}[/]")
    table.add_row("database", "[bold red]OUTAGE[/]" if sim.in_outage() else "[green]serving[/]")
    extra = daemon.extras.status().get("proxy")
    if extra:
        dead = (extra.get("queue") or {}).get("dead", 0)
        table.add_row("proxy mode", str(extra.get("mode")))
        table.add_row("queue", f"{extra.get('backlog', 0)} waiting, {dead} dead")
    if fleet is not None:
        c = fleet.counts
        table.add_row(
            "stations",
            f"sent {c['sent']}  forwarded {c['forwarded']}  queued so far {c['queued']}  "
            f"refused {c['refused']}",
        )
    return table


async def run_demo(options: DemoOptions, console: Console | None = None) -> DemoSummary:
    console = console or Console(stderr=False)
    day = DayClock(options.seconds_per_hour, START_HOUR)
    plan = default_outage_plan(
        day,
        options.duration,
        seed=options.seed,
        peak_rate_per_hour=0.9,
        off_peak_rate_per_hour=0.1,
        min_minutes=20.0,
        max_minutes=50.0,
    )

    def in_outage(_: float) -> bool:
        now = day.elapsed()
        return any(start <= now < end for start, end in plan)

    settings = SimulatorSettings(
        latency_ms=8.0, jitter_ms=4.0, outages=in_outage, seed=options.seed
    )
    with tempfile.TemporaryDirectory(prefix="netwatch-demo-") as tmp:
        async with PopulationSimulator(settings) as sim:
            metrics_port = options.metrics_port or _free_port()
            proxy_port = _free_port() if options.stations > 0 else None
            config = demo_config(sim.url, metrics_port, proxy_port, Path(tmp) / "queue.db")
            daemon = Daemon(config, clock=DemoClock(day, _simulated_origin()))
            timeline = _Timeline(day)
            daemon.link_listener(timeline)
            console.print(
                f"[bold]netwatch demo[/]: {options.duration:.0f}s, one simulated hour every "
                f"{options.seconds_per_hour:g}s, {plural(len(plan), 'outage')} planned\n"
                f"  times below are simulated, in the site's time zone ({TIMEZONE})\n"
                f"  population-database simulator  {sim.url}\n"
                f"  metrics                         http://127.0.0.1:{metrics_port}/metrics\n"
                f"  status                          netwatch status --url "
                f"http://127.0.0.1:{metrics_port}"
                + (
                    f"\n  station proxy                   http://127.0.0.1:{proxy_port}"
                    f"\n  counter staff page              http://127.0.0.1:{proxy_port}/_netwatch/"
                    if proxy_port
                    else ""
                )
            )
            fleet = (
                StationFleet(f"http://127.0.0.1:{proxy_port}", options.stations, seed=options.seed)
                if proxy_port
                else None
            )
            async with asyncio.TaskGroup() as tg:
                runner = tg.create_task(daemon.run(), name="daemon")
                await asyncio.sleep(0.5)
                fleet_task = tg.create_task(fleet.run(), name="stations") if fleet else None
                await _show(
                    console,
                    day=day,
                    daemon=daemon,
                    fleet=fleet,
                    sim=sim,
                    duration=options.duration,
                    runner=runner,
                )
                stations: dict[str, int] = {}
                if fleet is not None and fleet_task is not None:
                    fleet.stop()
                    await fleet_task
                    sim.set_outage(False)
                    await _drain(daemon, timeout=max(10.0, options.duration / 3))
                    stations = await fleet.reconcile(sim.applied)
                daemon.stop()
            elapsed = day.elapsed()
            downs = timeline.downs()
            summary = DemoSummary(
                duration_s=elapsed,
                simulated_hours=elapsed / options.seconds_per_hour,
                outages_planned=len(plan),
                outages_seen=len(downs),
                outages_seen_peak=sum(1 for _, e in downs if e.peak),
                detection_delays_s=_detection_delays(plan, downs),
                availability=timeline.availability(elapsed),
                stations=stations,
            )
    _print_summary(console, summary)
    return summary


async def _show(
    console: Console,
    *,
    day: DayClock,
    daemon: Daemon,
    fleet: StationFleet | None,
    sim: PopulationSimulator,
    duration: float,
    runner: asyncio.Task[None],
) -> None:
    """The live view on a terminal; a progress line every few seconds elsewhere."""
    deadline = time.monotonic() + duration
    if console.is_terminal:
        with Live(_view(day, daemon, fleet, sim), console=console, refresh_per_second=4) as live:
            while time.monotonic() < deadline and not runner.done():
                await asyncio.sleep(0.25)
                live.update(_view(day, daemon, fleet, sim))
        return
    last = 0.0
    while time.monotonic() < deadline and not runner.done():
        await asyncio.sleep(0.25)
        if time.monotonic() - last >= 5.0:
            last = time.monotonic()
            states = " ".join(f"{k}={v}" for k, v in daemon.monitor.states().items())
            clock = day.time_at(day.elapsed())
            line = f"[{clock:%H:%M}{' peak' if daemon.is_peak() else ''}] {states}"
            if fleet is not None:
                # The backlog waiting now, not everything ever queued.
                waiting = (daemon.extras.status().get("proxy") or {}).get("backlog", 0)
                line += f" stations sent={fleet.counts['sent']} waiting={waiting}"
            console.print(line)
            sys.stdout.flush()


async def _drain(daemon: Daemon, timeout: float) -> None:
    """Give the proxy time to replay what it queued once the link is back."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proxy = daemon.extras.status().get("proxy") or {}
        if proxy.get("backlog", 0) == 0 and proxy.get("mode") == "online":
            return
        await asyncio.sleep(0.25)


def _print_summary(console: Console, s: DemoSummary) -> None:
    delays = s.detection_delays_s
    delay = f"{sum(delays) / len(delays):.2f}s average, {max(delays):.2f}s worst" if delays else "-"
    console.print("\n[bold]summary[/]")
    console.print(f"  ran {s.duration_s:.0f}s = {s.simulated_hours:.1f} simulated hours")
    console.print(
        f"  outages planned {s.outages_planned}, seen {s.outages_seen} "
        f"({s.outages_seen_peak} at peak hours, {s.outages_seen - s.outages_seen_peak} off-peak)"
    )
    console.print(f"  detection delay {delay}")
    console.print(f"  availability of {GUARD}: {s.availability:.1%}")
    if s.stations:
        st = s.stations
        # One short line per idea: a terminal (or a log at 80 columns) never cuts one.
        console.print(f"  station requests sent {st['sent']}")
        console.print(
            f"    forwarded {st['forwarded']}, queued {st['queued']}, "
            f"rejected by the database {st['rejected']}, refused {st['refused']}"
        )
        console.print(
            f"    of the queued: replayed {st['replayed']}, dead {st['dead']}, "
            f"[bold]lost {st['lost']}[/]"
        )
    console.print("  [green]ok[/]" if s.ok else "  [bold red]requests were lost[/]")
