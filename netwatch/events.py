"""Values that flow out of the monitor and the proxy to their listeners (metrics, MQTT,
webhooks, the proxy's mode machine), and a small fan-out hub to deliver them.

Listeners never block the producer: each subscriber has its own bounded buffer and the
oldest event is dropped (and counted) when a slow subscriber falls behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class LinkChanged:
    """A target's link state changed (``old`` is ``"unknown"`` at start-up)."""

    site: str
    target: str
    type: str
    old: str
    new: str
    since: datetime
    peak: bool
    latency_ms: float | None
    loss: float | None
    reason: str


@dataclass(frozen=True, slots=True)
class ModeChanged:
    """The station proxy's mode changed."""

    site: str
    mode: str
    reason: str
    since: datetime


@dataclass(frozen=True, slots=True)
class QueueStats:
    """A snapshot of the station queue."""

    site: str
    depth: int
    oldest_age_s: float
    dead: int


@dataclass(frozen=True, slots=True)
class SiteFaultChanged:
    """Where along the site's path the fault is changed (``netwatch.monitor.fault``)."""

    site: str
    fault: str
    since: datetime
    reason: str


Event = LinkChanged | ModeChanged | QueueStats | SiteFaultChanged


class EventHub:
    """Fan-out of events to any number of async subscribers."""

    def __init__(self, buffer: int = 10_000) -> None:
        self._buffer = buffer
        self._queues: list[asyncio.Queue[Event]] = []
        self.dropped = 0

    def publish(self, event: Event) -> None:
        """Deliver to every subscriber without waiting (plain function, callable anywhere)."""
        for queue in self._queues:
            if queue.full():
                queue.get_nowait()
                self.dropped += 1
            queue.put_nowait(event)

    def subscribe(self) -> Subscription:
        """Events published from this call on (registered now, so nothing is missed
        between subscribing and the first ``async for``)."""
        queue: asyncio.Queue[Event] = asyncio.Queue(self._buffer)
        self._queues.append(queue)
        return Subscription(self, queue)

    def _unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        if queue in self._queues:
            self._queues.remove(queue)


class Subscription:
    """An async iterator over one subscriber's events; ``close()`` unsubscribes."""

    def __init__(self, hub: EventHub, queue: asyncio.Queue[Event]) -> None:
        self._hub = hub
        self._queue = queue

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        try:
            while True:
                yield await self._queue.get()
        finally:
            self.close()

    def close(self) -> None:
        self._hub._unsubscribe(self._queue)
