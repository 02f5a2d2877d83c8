"""The station side of MQTT: a ``netwatch proxy`` follows its site daemon's mode.

It subscribes to ``{prefix}/{site}/status`` and ``{prefix}/{site}/mode``; the retained mode
is trusted only while the broker is reachable and the daemon's status says it is online,
because a dead daemon's last retained mode is stale.
"""

from __future__ import annotations

from collections.abc import Callable

import aiomqtt
import structlog
from prometheus_client import CollectorRegistry, Gauge

from netwatch.config.schema import Mqtt
from netwatch.mqtt.bridge import (
    PROXY_MODES,
    InvalidPayload,
    choice,
    client_options,
    connect_forever,
    flag,
    json_object,
    receive_messages,
)

log = structlog.get_logger(__name__)


class MqttModeFollower:
    """Station side: follows ``{p}/mode`` and calls ``on_mode(mode, reason)``.

    ``following`` is true only while the broker is reachable *and* the daemon's retained
    status says it is online: otherwise the retained mode may be stale, and the proxy should
    fall back to its own guard probe. ``on_following(bool)`` is told of every change.
    """

    def __init__(
        self,
        settings: Mqtt,
        site_id: str,
        on_mode: Callable[[str, str], None],
        *,
        on_following: Callable[[bool], None] | None = None,
        registry: CollectorRegistry | None = None,
        backoff_initial: float = 0.5,
        backoff_cap: float = 30.0,
    ) -> None:
        self.site = site_id
        self._options = client_options(settings)
        self._prefix = f"{settings.prefix.strip('/')}/{site_id}"
        self._on_mode = on_mode
        self._on_following = on_following
        self._backoff = (backoff_initial, backoff_cap)
        self._broker_up = False
        self._daemon_online = False
        self._following = False
        self.mode: str | None = None
        self._gauge: Gauge | None = None
        if registry is not None:
            self._gauge = Gauge(
                "netwatch_mqtt_follower_connected",
                "Following the daemon's mode over MQTT (broker up and daemon online)",
                ["site"],
                registry=registry,
            ).labels(site_id)

    @property
    def following(self) -> bool:
        return self._following

    async def run(self) -> None:
        """Follow forever, reconnecting on broker loss. Cancel to stop."""
        with structlog.contextvars.bound_contextvars(site=self.site, component="mqtt-follower"):
            await connect_forever(
                # Followers only need the retained values: a clean session, a random id.
                lambda: aiomqtt.Client(**self._options, clean_session=True),
                self._session,
                initial=self._backoff[0],
                cap=self._backoff[1],
                on_retry=lambda: None,
            )

    async def _session(self, client: aiomqtt.Client) -> None:
        self._update(broker_up=True)
        try:
            await client.subscribe(f"{self._prefix}/status", qos=1)
            await client.subscribe(f"{self._prefix}/mode", qos=1)
            await receive_messages(client, self._handle)
        finally:
            self._update(broker_up=False, daemon_online=False)

    def _handle(self, message: aiomqtt.Message) -> None:
        try:
            if message.topic.matches(f"{self._prefix}/status"):
                self._update(daemon_online=flag(json_object(message), "online"))
                return
            data = json_object(message)
            mode = choice(data, "mode", PROXY_MODES)
        except InvalidPayload as exc:
            log.warning("mqtt.follower_invalid", topic=str(message.topic), error=str(exc))
            return
        self.mode = mode
        self._on_mode(mode, str(data.get("reason", "")))

    def _update(self, *, broker_up: bool | None = None, daemon_online: bool | None = None) -> None:
        if broker_up is not None:
            self._broker_up = broker_up
        if daemon_online is not None:
            self._daemon_online = daemon_online
        following = self._broker_up and self._daemon_online
        if following != self._following:
            self._following = following
            if self._gauge is not None:
                self._gauge.set(int(following))
            log.info("mqtt.follower_state", following=following)
            if self._on_following is not None:
                self._on_following(following)
