"""Wires the parts of a site together and owns their lifetimes.

Everything long-lived is entered in one ``AsyncExitStack`` (closed in reverse) and every
long-lived task belongs to one ``TaskGroup``. SIGTERM / SIGINT stop the daemon cleanly;
SIGHUP reloads the config (unchanged targets keep their state; an invalid new config is
logged and the old one kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Literal

import structlog
from prometheus_client import CollectorRegistry

from netwatch import __version__
from netwatch import loop as event_loop
from netwatch.clock import Clock, SystemClock
from netwatch.config.schema import Config, load_config
from netwatch.errors import ConfigError
from netwatch.events import EventHub, LinkChanged, SiteFaultChanged
from netwatch.gcpolicy import frozen_heap, refreeze
from netwatch.monitor import fault
from netwatch.monitor.city import CityCollector, SiteFault
from netwatch.monitor.httpd import SiteEndpoint, serve
from netwatch.monitor.metrics import MonitorMetrics, TimeCollector
from netwatch.monitor.runner import Monitor
from netwatch.monitor.schedule import PeakSchedule
from netwatch.wiring import Extras
from probes import close_shared_sessions

log = structlog.get_logger("netwatch.daemon")

Role = Literal["site", "proxy"]


class _Shutdown(Exception):
    """Raised inside the TaskGroup to unwind every task on a stop signal."""


class Daemon:
    """One site daemon (``role="site"``) or a stand-alone station proxy (``role="proxy"``)."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        role: Role = "site",
        clock: Clock | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.role = role
        self.clock = clock or SystemClock()
        self.registry = registry or CollectorRegistry()
        self.hub = EventHub()
        self.schedule = PeakSchedule.from_config(config)
        self.metrics = MonitorMetrics(self.registry, config.site.id, __version__)
        guard_only = config.proxy.guard if role == "proxy" and config.proxy else None
        self.monitor = Monitor(
            config,
            clock=self.clock,
            schedule=self.schedule,
            metrics=self.metrics,
            listeners=[self.hub.publish],
            only=guard_only,
        )
        self.time_series = TimeCollector(config.site.id, self.is_peak, self.monitor.outage_totals)
        self.registry.register(self.time_series)
        self.fault = SiteFault(lambda: self.monitor.targets, self.clock.now)
        self.fault.add_listener(self._fault_changed)
        self.monitor.add_listener(self.fault.refresh)
        if role == "site":
            self.registry.register(
                CityCollector(lambda: self.config, lambda: self.monitor.targets, self.fault)
            )
        self.extras = Extras(self)
        self.started = time.monotonic()  # uptime is a duration: a wall clock step is not
        self._stop = asyncio.Event()
        self._reloads: asyncio.Queue[None] = asyncio.Queue()

    def is_peak(self) -> bool:
        return self.monitor.schedule.is_peak(self.clock.now())

    def fault_event(self) -> SiteFaultChanged:
        """The site's current fault verdict as an event (MQTT ``status`` carries it)."""
        status = self.fault.status
        verdict = status.verdict
        return SiteFaultChanged(
            self.config.site.id, verdict.fault.value, status.since, verdict.reason
        )

    def _fault_changed(self, _: fault.FaultStatus) -> None:
        self.hub.publish(self.fault_event())

    def status(self) -> dict[str, Any]:
        """What ``GET /api/v1/status`` and ``netwatch status`` show."""
        site = self.config.site
        labels = {"district": site.district, "isp": site.isp, "uplink": site.uplink}
        return {
            "site": {"id": site.id, "name": site.name, "timezone": site.timezone, **labels},
            "fault": self.fault.view(),
            "version": __version__,
            "role": self.role,
            "peak": self.is_peak(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "targets": self.monitor.snapshot(),
            **self.extras.status(),
        }

    def stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reloads.put_nowait(None)

    async def run(self) -> None:
        """Run until ``stop()`` (or a signal): exits normally on a clean stop."""
        loop = asyncio.get_running_loop()
        handlers: list[signal.Signals] = []
        for sig, action in (
            (signal.SIGTERM, self.stop),
            (signal.SIGINT, self.stop),
            (signal.SIGHUP, self.request_reload),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, action)
                handlers.append(sig)
        try:
            async with AsyncExitStack() as stack:
                stack.push_async_callback(close_shared_sessions)
                await self.extras.enter(stack)
                if self.role == "site":
                    app = SiteEndpoint(
                        self.registry,
                        self.status,
                        (self.metrics.targets, self.time_series),
                        token=self.config.metrics.token,
                    )
                    await stack.enter_async_context(serve(app, self.config.metrics.listen))
                    log.info(
                        "metrics_listening",
                        url=f"http://{self.config.metrics.listen}/metrics",
                    )
                try:
                    async with asyncio.TaskGroup() as tg:
                        self.monitor.start(tg)
                        self.extras.start(tg)
                        tg.create_task(self._reload_loop(), name="reload")
                        tg.create_task(self._wait_stop(), name="stop")
                        stack.enter_context(frozen_heap())
                        log.info(
                            "daemon_started",
                            role=self.role,
                            site=self.config.site.id,
                            targets=len(self.monitor.targets),
                            version=__version__,
                            loop=event_loop.current(),
                        )
                except* _Shutdown:
                    pass
        finally:
            for handled in handlers:
                loop.remove_signal_handler(handled)
        log.info("daemon_stopped", site=self.config.site.id)

    async def _wait_stop(self) -> None:
        await self._stop.wait()
        log.info("daemon_stopping", site=self.config.site.id)
        raise _Shutdown

    async def _reload_loop(self) -> None:
        while True:
            await self._reloads.get()
            self.reload()

    def reload(self) -> bool:
        """Re-read the config file; keep the old config when the new one is invalid."""
        if self.config_path is None:
            log.warning("config_reload_skipped", reason="no config file")
            return False
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error(  # noqa: TRY400 - the problems are the message; a traceback adds nothing
                "config_reload_failed", problems=exc.problems, kept="previous config"
            )
            return False
        diff = self.monitor.reload(new)
        self.extras.reload(new)
        self.config = self.monitor.config
        self.fault.refresh()
        refreeze()  # what the old config held may be frozen: collect it now
        log.info("config_reloaded", **{k: v for k, v in diff.items() if v})
        return True

    def link_listener(self, callback: Callable[[LinkChanged], None]) -> None:
        self.monitor.add_listener(callback)


async def run_daemon(config_path: Path, *, role: Role = "site") -> None:
    from netwatch.config.files import check_files  # noqa: PLC0415 - start-up only

    config = load_config(config_path)
    check_files(config, config_path)
    daemon = Daemon(config, config_path=config_path, role=role)
    await daemon.run()
