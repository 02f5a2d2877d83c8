"""A real MQTT subscriber that records every message, for end-to-end tests.

    async with watch(broker, "netwatch/v1/q1/#") as sub:
        status = await sub.wait_for(lambda: sub.latest("netwatch/v1/q1/status"), 10, "status")
        await sub.publish("netwatch/v1/q1/cmd/mode", {"mode": "offline"})

Messages are read by a background task into ``sub.received`` (oldest first), each with its
parsed JSON payload, its retain flag and the monotonic time it arrived, so a test can
assert on the whole sequence (how many alerts, in which order, how far apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiomqtt

from helpers.mosquitto import Broker

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Received:
    topic: str
    payload: Any  # the parsed JSON, or the raw bytes when it is not JSON
    retain: bool
    at: float  # time.monotonic() on arrival


class Subscriber:
    """What one subscription has received so far; see the module docstring."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.received: list[Received] = []
        self.reader: asyncio.Task[None] | None = None

    def on(self, topic: str) -> list[Received]:
        return [m for m in self.received if m.topic == topic]

    def latest(self, topic: str) -> Any:
        """The payload of the last message on ``topic``, or None."""
        messages = self.on(topic)
        return messages[-1].payload if messages else None

    async def publish(self, topic: str, payload: dict[str, Any] | bytes, **options: Any) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        await self.client.publish(topic, data, qos=1, **options)

    async def wait_for(self, predicate: Callable[[], T], timeout: float, what: str) -> T:
        """Poll ``predicate()`` until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.reader is not None and self.reader.done():
                self.reader.result()  # the connection failed: say why
                raise AssertionError(f"subscription ended while waiting for {what}")
            if time.monotonic() >= deadline:
                seen = [(m.topic, m.payload) for m in self.received[-10:]]
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; {seen}")
            await asyncio.sleep(0.02)

    async def _collect(self) -> None:
        async for message in self.client.messages:
            raw = message.payload
            payload: Any = raw
            if isinstance(raw, bytes | bytearray):
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = bytes(raw)
            self.received.append(
                Received(str(message.topic), payload, message.retain, time.monotonic())
            )


@asynccontextmanager
async def watch(
    broker: Broker, topic: str, *, username: str | None = None, password: str | None = None
) -> AsyncIterator[Subscriber]:
    """Connect a clean-session client to ``broker``, subscribe to ``topic`` at QoS 1."""
    async with aiomqtt.Client(
        broker.host,
        broker.port,
        username=username,
        password=password,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=True,
    ) as client:
        await client.subscribe(topic, qos=1)
        sub = Subscriber(client)
        # Not a TaskGroup: it would wrap a failing test's AssertionError in an ExceptionGroup.
        # A reader that fails surfaces through wait_for instead.
        sub.reader = asyncio.create_task(sub._collect())
        try:
            yield sub
        finally:
            sub.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await sub.reader
