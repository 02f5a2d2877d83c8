"""The MQTT bridge: link states, proxy mode, queue and alerts out; operator commands in.

Topics (``{p}`` = ``{prefix}/{site}``; JSON, QoS 1; see CONTRACT.md)::

    {p}/status        retained, also the last will   {"online", "version", "since", ...}
    {p}/link/{target} retained                       {"state", "since", "latency_ms", ...}
    {p}/mode          retained                       {"mode", "reason", "since"}
    {p}/queue         retained                       {"depth", "oldest_age_s", "dead"}
    {p}/alerts        not retained                   AlertEvent.to_payload()
    {p}/cmd/mode      in                             {"mode": "offline"|"online"|"auto"}

The ``publish_*`` methods never block and never fail: they only record state. Retained topics
keep their latest payload (a broker outage coalesces a thousand link flaps into one message
per target) and alerts wait in a bounded deque (oldest dropped first, and counted). On every
(re)connect the bridge republishes all retained state, status first, then the buffered
alerts: a broker that restarted without persistence is whole again. The session is persistent
(MQTT 3.1.1, ``clean_session=False``, stable client id) so operator commands sent while the
daemon was away are still delivered. The station side,
which follows ``{p}/mode``, is ``netwatch.mqtt.follower``.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, NoReturn
from urllib.parse import urlsplit

import aiomqtt
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge

from netwatch.alerting.alerts import AlertEvent
from netwatch.config.schema import Mqtt
from netwatch.errors import ConfigError
from netwatch.events import LinkChanged, ModeChanged, QueueStats, SiteFaultChanged

log = structlog.get_logger(__name__)

COMMAND_MODES = frozenset({"offline", "online", "auto"})
PROXY_MODES = frozenset({"online", "offline", "replaying"})
# Publishes awaited together: one round trip for many messages, while a failure still
# tells exactly which ones the broker did not acknowledge.
_BATCH = 64


def _num(value: float | None) -> float | None:
    # NaN/inf would make the JSON invalid for strict parsers (and Grafana's).
    return value if value is not None and math.isfinite(value) else None


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def backoff_delay(failures: int, initial: float, cap: float) -> float:
    """Jittered exponential backoff: in ``[d/2, d]`` with ``d = min(cap, initial * 2**n)``."""
    ceiling = min(cap, initial * 2.0 ** max(failures - 1, 0))
    return ceiling * random.uniform(0.5, 1.0)


def client_options(settings: Mqtt) -> dict[str, Any]:
    """``aiomqtt.Client`` keyword arguments for the broker in ``settings`` (TLS, auth)."""
    url = urlsplit(settings.url)
    secure = url.scheme == "mqtts"
    tls: ssl.SSLContext | None = None
    if secure:
        key, path = "mqtt.ca_file", settings.ca_file
        try:
            tls = ssl.create_default_context(cafile=settings.ca_file)
            if settings.cert_file:
                key, path = "mqtt.cert_file", settings.cert_file
                tls.load_cert_chain(settings.cert_file, settings.key_file)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"{key}: cannot load {path}: {reason}") from None
    try:
        port = url.port or (8883 if secure else 1883)
    except ValueError as exc:
        raise ConfigError(f"mqtt.url: {exc}") from None
    return {
        "hostname": url.hostname or "127.0.0.1",
        "port": port,
        "username": settings.username,
        "password": settings.password,
        "tls_context": tls,
        "keepalive": max(1, round(settings.keepalive)),
        "protocol": aiomqtt.ProtocolVersion.V311,
        # Commands are tiny and rare: a flood must not grow memory without bound.
        "max_queued_incoming_messages": 1000,
        # Small messages, each awaited: Nagle + delayed ACK would add ~40 ms to many of them.
        "socket_options": ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    }


async def connect_forever(
    make_client: Callable[[], aiomqtt.Client],
    session: Callable[[aiomqtt.Client], Awaitable[None]],
    *,
    initial: float,
    cap: float,
    on_retry: Callable[[], None],
) -> NoReturn:
    """aiomqtt's reconnect loop: a session ends on any ``MqttError``; wait, then retry."""
    failures = 0
    loop = asyncio.get_running_loop()
    while True:
        client = make_client()
        started = loop.time()
        try:
            async with client:
                await session(client)
        except* aiomqtt.MqttError as group:
            log.warning("mqtt.disconnected", error=str(group.exceptions[0]))
        # Only a connection that held for a while resets the backoff: a broker that accepts
        # and drops at once must not be hammered.
        failures = 1 if loop.time() - started > cap else failures + 1
        on_retry()
        await asyncio.sleep(backoff_delay(failures, initial, cap))


async def receive_messages(
    client: aiomqtt.Client, handle: Callable[[aiomqtt.Message], None]
) -> None:
    # The iterator raises MqttError when the connection drops: that ends the session.
    async for message in client.messages:
        handle(message)


class InvalidPayload(ValueError):
    """A message that is not what its topic promises; logged and counted, never raised out."""


def json_object(message: aiomqtt.Message, *, retained_ok: bool = True) -> dict[str, Any]:
    """The message's JSON object, or ``InvalidPayload``."""
    if message.retain and not retained_ok:
        raise InvalidPayload("retained message refused")
    payload = message.payload
    if not isinstance(payload, bytes | bytearray):
        raise InvalidPayload("empty or non-binary payload")
    try:
        data = json.loads(payload)
    except ValueError:  # both bad UTF-8 and bad JSON
        raise InvalidPayload("payload is not JSON") from None
    if not isinstance(data, dict):
        raise InvalidPayload("payload is not a JSON object")
    return data


def choice(data: dict[str, Any], key: str, allowed: frozenset[str]) -> str:
    value = data.get(key)
    if not isinstance(value, str) or value not in allowed:
        raise InvalidPayload(f"{key} must be one of {sorted(allowed)}, not {value!r}")
    return value


def flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key)
    if not isinstance(value, bool):
        raise InvalidPayload(f"{key} must be true or false, not {value!r}")
    return value


class _BridgeMetrics:
    def __init__(self, registry: CollectorRegistry, site: str) -> None:
        def metric(kind: type[Counter | Gauge], name: str, doc: str, *labels: str) -> Any:
            return kind(f"netwatch_mqtt_{name}", doc, ["site", *labels], registry=registry)

        self.connected = metric(Gauge, "connected", "Connected to the broker").labels(site)
        self.published = metric(Counter, "published", "Messages the broker acked").labels(site)
        dropped = metric(Counter, "dropped", "Dropped while the broker was away", "kind")
        self.dropped_alerts = dropped.labels(site, "alert")
        commands = metric(Counter, "commands", "Commands received on cmd/mode", "outcome")
        self.commands = {o: commands.labels(site, o) for o in ("applied", "invalid", "failed")}
        self.reconnects = metric(Counter, "reconnects", "Reconnection attempts").labels(site)


class MqttBridge:
    """Publishes the site's state to MQTT and applies operator mode commands."""

    def __init__(
        self,
        settings: Mqtt,
        site_id: str,
        version: str,
        registry: CollectorRegistry,
        on_mode_command: Callable[[str], None] | None = None,
        *,
        backoff_initial: float = 0.5,
        backoff_cap: float = 30.0,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.site = site_id
        # City view: the status carries the site's labels and, while online, its fault.
        self._labels = dict(labels or {})
        self._fault: tuple[str, datetime | None] = ("none", None)
        self.version = version
        self.client_id = settings.client_id or f"netwatch-{site_id}"
        self._options = client_options(settings)
        self._prefix = f"{settings.prefix.strip('/')}/{site_id}"
        self._on_mode_command = on_mode_command
        self._backoff = (backoff_initial, backoff_cap)
        self._metrics = _BridgeMetrics(registry, site_id)
        self._retained: dict[str, bytes] = {}
        self._dirty: dict[str, None] = {}  # retained topics not yet acknowledged, in order
        self._alerts: deque[bytes] = deque()
        self._alert_limit = settings.alert_buffer
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected_since: datetime | None = None
        self._attempt_at = datetime.now(UTC)

    def topic(self, *parts: str) -> str:
        return "/".join((self._prefix, *parts))

    @property
    def connected(self) -> bool:
        return self._connected_since is not None

    # --- what the daemon calls: plain, non-blocking ---------------------------------------

    def publish_link(self, event: LinkChanged) -> None:
        payload = {
            "state": event.new,
            "since": event.since.isoformat(),
            "latency_ms": _num(event.latency_ms),
            "loss": _num(event.loss),
            "peak": event.peak,
            "type": event.type,
            "reason": event.reason,
        }
        self._submit(lambda: self._set_retained(self.topic("link", event.target), payload))

    def publish_mode(self, event: ModeChanged) -> None:
        payload = {"mode": event.mode, "reason": event.reason, "since": event.since.isoformat()}
        self._submit(lambda: self._set_retained(self.topic("mode"), payload))

    def publish_queue(self, stats: QueueStats) -> None:
        age = round(stats.oldest_age_s, 1)
        payload = {"depth": stats.depth, "oldest_age_s": age, "dead": stats.dead}
        self._submit(lambda: self._set_retained(self.topic("queue"), payload))

    def publish_alert(self, alert: AlertEvent) -> None:
        self._submit(lambda: self._add_alert(_dumps(alert.to_payload())))

    def _submit(self, update: Callable[[], None]) -> None:
        # State lives on the loop's thread; a call from another thread is handed over to it.
        loop = self._loop
        if loop is not None and loop.is_running() and _running_loop() is not loop:
            loop.call_soon_threadsafe(update)
        else:
            update()

    def _set_retained(self, topic: str, payload: dict[str, Any]) -> None:
        data = _dumps(payload)
        if self._retained.get(topic) == data:
            return
        self._retained[topic] = data
        self._dirty[topic] = None
        self._wakeup.set()

    def _add_alert(self, data: bytes) -> None:
        self._alerts.append(data)
        self._trim_alerts()
        self._wakeup.set()

    def _trim_alerts(self) -> None:
        while len(self._alerts) > self._alert_limit:
            self._alerts.popleft()
            self._metrics.dropped_alerts.inc()
            log.warning("mqtt.alert_dropped", reason="buffer full")

    # --- the connection -------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, publish, reconnect, forever. Cancel to stop (publishes ``online: false``)."""
        self._loop = asyncio.get_running_loop()
        with structlog.contextvars.bound_contextvars(site=self.site, component="mqtt"):
            await connect_forever(
                self._new_client,
                self._session,
                initial=self._backoff[0],
                cap=self._backoff[1],
                on_retry=self._metrics.reconnects.inc,
            )

    def publish_fault(self, event: SiteFaultChanged) -> None:
        self._submit(lambda: self._set_fault(event.fault, event.since))

    def _set_fault(self, fault: str, since: datetime) -> None:
        self._fault = (fault, since)
        if self._connected_since is not None:
            status = self.topic("status")
            data = self._status(True, self._connected_since, "connected")
            if self._retained.get(status) != data:
                self._retained[status] = data
                self._dirty[status] = None
                self._wakeup.set()

    def _status(self, online: bool, since: datetime, reason: str) -> bytes:
        # Offline (the will, a shutdown) the site cannot tell where its fault is: null.
        fault, fault_since = self._fault if online else (None, None)
        return _dumps(
            {
                "online": online,
                "version": self.version,
                "since": since.isoformat(),
                "reason": reason,
                "fault": fault,
                "fault_since": None if fault_since is None else fault_since.isoformat(),
                "district": self._labels.get("district", ""),
                "isp": self._labels.get("isp", ""),
            }
        )

    def _new_client(self) -> aiomqtt.Client:
        # A client per attempt, so that the will carries this connection's "since".
        self._attempt_at = datetime.now(UTC)
        will = aiomqtt.Will(
            self.topic("status"),
            self._status(False, self._attempt_at, "connection lost"),
            qos=1,
            retain=True,
        )
        client = aiomqtt.Client(
            **self._options, identifier=self.client_id, clean_session=False, will=will
        )
        client.pending_calls_threshold = _BATCH * 2
        return client

    async def _session(self, client: aiomqtt.Client) -> None:
        try:
            if self._on_mode_command is not None:
                await client.subscribe(self.topic("cmd", "mode"), qos=1)
            # "Connected" once commands can be received, too.
            self._connected_since = self._attempt_at
            self._metrics.connected.set(1)
            log.info("mqtt.connected", client_id=self.client_id)
            status = self.topic("status")
            self._retained[status] = self._status(True, self._attempt_at, "connected")
            self._dirty = dict.fromkeys([status, *self._retained])
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._send_forever(client))
                tasks.create_task(receive_messages(client, self._handle_command))
        except asyncio.CancelledError:
            await self._goodbye(client)
            raise
        finally:
            self._connected_since = None
            self._metrics.connected.set(0)

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        # A clean disconnect suppresses the will, so say "offline" ourselves.
        payload = self._status(False, datetime.now(UTC), "shutdown")
        try:
            await client.publish(self.topic("status"), payload, qos=1, retain=True, timeout=2)
        except aiomqtt.MqttError as exc:
            log.warning("mqtt.goodbye_failed", error=str(exc))

    async def _send_forever(self, client: aiomqtt.Client) -> None:
        while True:
            self._wakeup.clear()
            await self._send_retained(client)
            await self._send_alerts(client)
            await self._wakeup.wait()

    async def _send_retained(self, client: aiomqtt.Client) -> None:
        while self._dirty:
            batch = [(t, self._retained[t]) for t in list(self._dirty)[:_BATCH]]
            results = await asyncio.gather(
                *(client.publish(t, p, qos=1, retain=True) for t, p in batch),
                return_exceptions=True,
            )
            for (topic, payload), result in zip(batch, results, strict=True):
                # Only a success for the *current* value settles the topic.
                if not isinstance(result, BaseException):
                    self._metrics.published.inc()
                    if self._retained[topic] is payload:
                        self._dirty.pop(topic, None)
            _raise_first(results)

    async def _send_alerts(self, client: aiomqtt.Client) -> None:
        while self._alerts:
            batch = [self._alerts.popleft() for _ in range(min(_BATCH, len(self._alerts)))]
            unsent = batch
            try:
                results = await asyncio.gather(
                    *(client.publish(self.topic("alerts"), p, qos=1) for p in batch),
                    return_exceptions=True,
                )
                unsent = [p for p, r in zip(batch, results, strict=True) if r is not None]
                for _ in range(len(batch) - len(unsent)):
                    self._metrics.published.inc()
                _raise_first(results)
            finally:
                # Back to the front, in order, for the next connection (at-least-once).
                self._alerts.extendleft(reversed(unsent))
                self._trim_alerts()

    def _handle_command(self, message: aiomqtt.Message) -> None:
        if self._on_mode_command is None:
            return
        try:
            # A retained command would be re-applied at every reconnect, long after the
            # operator forgot it: the contract says commands are not retained.
            mode = choice(json_object(message, retained_ok=False), "mode", COMMAND_MODES)
        except InvalidPayload as exc:
            self._metrics.commands["invalid"].inc()
            log.warning("mqtt.command_invalid", topic=str(message.topic), error=str(exc))
            return
        try:
            self._on_mode_command(mode)
        except Exception:
            self._metrics.commands["failed"].inc()
            log.exception("mqtt.command_failed", mode=mode)
        else:
            self._metrics.commands["applied"].inc()
            log.info("mqtt.command_applied", mode=mode)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _raise_first(results: list[Any]) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise result
