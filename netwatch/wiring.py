"""The optional parts of a daemon (station proxy, MQTT bridge or follower, alerts, webhooks)
and how events flow between them. Only ``daemon.py`` uses this module; it sees the daemon
through the small ``Host`` protocol below, so the two modules do not import each other.

::

    monitor --LinkChanged--> hub --> MQTT link/{target}, alerts --> MQTT alerts, webhooks
       |                      ^
       +--> proxy guard / site mode --ModeChanged, QueueStats--+
    MQTT cmd/mode --> proxy override (or site mode override)
    MQTT {site}/mode --> a stand-alone proxy's remote mode (netwatch proxy)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Literal, Protocol

import structlog

from netwatch import __version__
from netwatch.alerting.alerts import AlertEvent, AlertPolicy, AlertState
from netwatch.events import LinkChanged, ModeChanged, QueueStats, SiteFaultChanged
from netwatch.proxy import mode as machine

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from netwatch.alerting.notify import WebhookNotifier
    from netwatch.clock import Clock
    from netwatch.config.schema import Config
    from netwatch.events import EventHub
    from netwatch.monitor.schedule import PeakSchedule
    from netwatch.mqtt.bridge import MqttBridge
    from netwatch.mqtt.follower import MqttModeFollower
    from netwatch.proxy.station import StationProxy

# The optional parts are imported only when configured (below): a site daemon without a
# proxy or a broker does not carry their libraries in memory.
# ruff: noqa: PLC0415

log = structlog.get_logger("netwatch.wiring")

ALERT_TICK = 1.0


class Host(Protocol):
    """What the optional parts need of the daemon that runs them."""

    config: Config
    role: Literal["site", "proxy"]
    clock: Clock
    registry: CollectorRegistry
    hub: EventHub
    schedule: PeakSchedule

    def is_peak(self) -> bool: ...

    def link_listener(self, callback: Callable[[LinkChanged], None]) -> None: ...

    def fault_event(self) -> SiteFaultChanged: ...


class SiteMode:
    """The site's mode when this daemon runs no proxy of its own: stations that follow the
    site over MQTT switch on it. Every target guards (any target down: offline)."""

    def __init__(self, daemon: Host) -> None:
        self._daemon = daemon
        self._down: set[str] = set()
        self._state = machine.initial(daemon.clock.now())
        self._feed(machine.GuardChanged(all_ok=True), announce=True)

    @property
    def mode(self) -> str:
        return self._state.mode

    @property
    def reason(self) -> str:
        return self._state.reason

    def on_link(self, event: LinkChanged) -> None:
        if event.new == "down":
            self._down.add(event.target)
        else:
            self._down.discard(event.target)
        self._feed(machine.GuardChanged(all_ok=not self._down))

    def override(self, mode: str) -> None:
        if mode not in ("offline", "online", "auto"):
            raise ValueError(f"override mode must be offline, online or auto, not {mode!r}")
        self._feed(machine.Override(mode))  # type: ignore[arg-type]

    def _feed(self, event: machine.ModeEvent, *, announce: bool = False) -> None:
        clock = self._daemon.clock
        self._state, effects = machine.step(self._state, event, clock.now(), mono=clock.monotonic())
        if effects or announce:
            log.info("site_mode_changed", mode=self._state.mode, reason=self._state.reason)
            self._daemon.hub.publish(
                ModeChanged(
                    self._daemon.config.site.id,
                    self._state.mode,
                    self._state.reason,
                    self._state.since,
                )
            )


class Extras:
    """Holds whatever optional components the config asks for."""

    def __init__(self, daemon: Host) -> None:
        self._daemon = daemon
        config = daemon.config
        site = config.site.id
        self.proxy: StationProxy | None = None
        self.site_mode: SiteMode | None = None
        self.bridge: MqttBridge | None = None
        self.follower: MqttModeFollower | None = None
        self.notifier: WebhookNotifier | None = None
        self._events = daemon.hub.subscribe()
        self.alerts = AlertState(
            AlertPolicy(hold_down=config.notify.hold_down, timezone=config.site.timezone), site
        )
        if config.notify.webhooks:
            from netwatch.alerting.notify import WebhookNotifier

            self.notifier = WebhookNotifier(config.notify.webhooks, daemon.registry)
        if config.mqtt is not None and daemon.role == "site":
            from netwatch.mqtt.bridge import MqttBridge

            self.bridge = MqttBridge(
                config.mqtt,
                site,
                __version__,
                daemon.registry,
                on_mode_command=self.command,
                labels={"district": config.site.district, "isp": config.site.isp},
            )
            self.bridge.publish_fault(daemon.fault_event())
        elif config.mqtt is not None:
            from netwatch.mqtt.follower import MqttModeFollower

            self.follower = MqttModeFollower(
                config.mqtt,
                site,
                self._remote_mode,
                on_following=self._following,
                registry=daemon.registry,
            )

    async def enter(self, stack: AsyncExitStack) -> None:
        """Open the components that own resources (the proxy's queue file and socket)."""
        daemon = self._daemon
        settings = daemon.config.proxy
        if settings is not None:
            from netwatch.proxy.crypto import load_key
            from netwatch.proxy.station import StationProxy

            key = load_key(settings.queue.key_file) if settings.queue.key_file else None
            self.proxy = await stack.enter_async_context(
                StationProxy(
                    settings,
                    daemon.config.site.id,
                    daemon.registry,
                    daemon.hub,
                    daemon.is_peak,
                    key,
                    clock=daemon.clock,
                    site_name=daemon.config.site.name,
                    timezone=daemon.config.site.timezone,
                )
            )
        elif daemon.role == "site":
            self.site_mode = SiteMode(daemon)
        daemon.link_listener(self._on_link)

    def start(self, tg: asyncio.TaskGroup) -> None:
        """Start their long-lived tasks in the daemon's TaskGroup."""
        if self.proxy is not None:
            tg.create_task(self.proxy.run(), name="proxy")
        if self.bridge is not None:
            tg.create_task(self.bridge.run(), name="mqtt")
        if self.follower is not None:
            tg.create_task(self.follower.run(), name="mqtt-follower")
        if self.notifier is not None:
            tg.create_task(self.notifier.run(), name="webhooks")
        tg.create_task(self._dispatch(), name="dispatch")
        tg.create_task(self._alert_ticks(), name="alert-ticks")

    def reload(self, config: Config) -> None:
        """Parts other than the monitor keep their settings until a restart."""
        old = self._daemon.config
        for section in ("proxy", "mqtt", "notify"):
            if getattr(old, section) != getattr(config, section):
                log.warning("config_section_needs_restart", section=section)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.proxy is not None:
            out["proxy"] = self.proxy.status()
        elif self.site_mode is not None:
            out["mode"] = {"mode": self.site_mode.mode, "reason": self.site_mode.reason}
        if self.bridge is not None:
            out["mqtt"] = {"connected": self.bridge.connected, "client_id": self.bridge.client_id}
        elif self.follower is not None:
            out["mqtt"] = {"following": self.follower.following, "mode": self.follower.mode}
        return out

    # --- flows ----------------------------------------------------------------------------

    def command(self, mode: str) -> None:
        """An operator's override from MQTT ``cmd/mode``."""
        log.info("operator_override", mode=mode)
        if self.proxy is not None:
            self.proxy.override(mode)
        elif self.site_mode is not None:
            self.site_mode.override(mode)

    def _on_link(self, event: LinkChanged) -> None:
        if self.proxy is not None:
            self.proxy.set_guard(event.target, event.new in ("up", "degraded"))
        elif self.site_mode is not None:
            self.site_mode.on_link(event)

    def _remote_mode(self, mode: str, reason: str) -> None:
        # While the daemon's status says offline (its will fired), the retained mode is its
        # last word before it died: obeying a stale "offline" would pin the proxy offline
        # with its own guard up. The live daemon republishes its mode right after its status.
        following = self.follower is not None and self.follower.following
        if self.proxy is not None and following:
            log.info("following_site_mode", mode=mode, reason=reason)
            self.proxy.remote_mode(mode)

    def _following(self, following: bool) -> None:
        # Broker or site daemon lost: forget the remote mode and rely on our own guard probe.
        if not following and self.proxy is not None:
            self.proxy.remote_mode(None)

    def _send_alerts(self, alerts: list[AlertEvent]) -> None:
        for alert in alerts:
            log.info("alert", alert=alert.alert, status=alert.status, target=alert.target)
            if self.bridge is not None:
                self.bridge.publish_alert(alert)
            if self.notifier is not None:
                self.notifier.send(alert)

    async def _dispatch(self) -> None:
        clock = self._daemon.clock
        async for event in self._events:
            if isinstance(event, LinkChanged):
                if self.bridge is not None:
                    self.bridge.publish_link(event)
                self._send_alerts(self.alerts.on_link(event, clock.now()))
            elif isinstance(event, ModeChanged):
                if self.bridge is not None:
                    self.bridge.publish_mode(event)
            elif isinstance(event, SiteFaultChanged):
                if self.bridge is not None:
                    self.bridge.publish_fault(event)
            elif isinstance(event, QueueStats):
                if self.bridge is not None:
                    self.bridge.publish_queue(event)
                now = clock.now()
                self._send_alerts(
                    self.alerts.on_queue(event, now, self._daemon.schedule.is_peak(now))
                )

    async def _alert_ticks(self) -> None:
        while True:
            await asyncio.sleep(ALERT_TICK)
            self._send_alerts(self.alerts.tick(self._daemon.clock.now()))
