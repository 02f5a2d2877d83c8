"""Webhook delivery against a real aiohttp server on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from netwatch.alerting.alerts import AlertEvent
from netwatch.alerting.notify import WebhookNotifier
from netwatch.config.schema import Webhook

SITE = "q1"


def alert(n: int = 0) -> AlertEvent:
    return AlertEvent(
        "LinkDown", "firing", f"t{n}", datetime(2026, 11, 23, tzinfo=UTC), True, "down", "mất", SITE
    )


class Receiver:
    """A webhook endpoint that answers from a script of statuses, then 200."""

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0) -> None:
        self.statuses = list(statuses or [])
        self.delay = delay
        self.calls = 0
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        await asyncio.sleep(self.delay)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.received.append(await request.json())
            self.headers.append(dict(request.headers))
        return web.json_response({"ok": status == 200}, status=status)


@asynccontextmanager
async def serve(receiver: Receiver) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running(notifier: WebhookNotifier) -> AsyncIterator[None]:
    async with asyncio.TaskGroup() as tasks:
        task = tasks.create_task(notifier.run())
        try:
            yield
        finally:
            task.cancel()


def notifier(urls: list[str], registry: CollectorRegistry, **options: Any) -> WebhookNotifier:
    hooks = [Webhook(url=url, headers={"Authorization": "Bearer t0ken"}) for url in urls]
    options = {"attempts": 4, "backoff_initial": 0.01, "backoff_max": 0.05, **options}
    return WebhookNotifier(hooks, registry, **options)


def total(registry: CollectorRegistry, outcome: str) -> float:
    return (
        registry.get_sample_value("netwatch_webhook_total", {"site": SITE, "outcome": outcome}) or 0
    )


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_failing_webhook_is_retried_until_delivered() -> None:
    receiver = Receiver([503, 500])
    registry = CollectorRegistry()
    async with serve(receiver) as url:
        n = notifier([url], registry)
        async with running(n):
            n.send(alert())
            await eventually(lambda: total(registry, "delivered") == 1)
    assert receiver.calls == 3
    assert receiver.received == [alert().to_payload()]
    assert receiver.headers[0]["Authorization"] == "Bearer t0ken"
    assert receiver.headers[0]["Content-Type"] == "application/json"
    assert total(registry, "failed") == 0


async def test_a_client_error_is_not_retried_and_attempts_are_bounded() -> None:
    rejecting, flaky = Receiver([400]), Receiver([503] * 10)
    registry = CollectorRegistry()
    async with serve(rejecting) as url1, serve(flaky) as url2:
        n = notifier([url1, url2], registry, attempts=3)
        async with running(n):
            n.send(alert())
            await eventually(lambda: total(registry, "failed") == 2)
    assert rejecting.calls == 1
    assert flaky.calls == 3


async def test_unreachable_webhook_fails_without_stalling_the_other() -> None:
    receiver = Receiver()
    registry = CollectorRegistry()
    async with serve(Receiver()) as dead_url:
        pass  # the port is closed now: connection refused
    async with serve(receiver) as url:
        n = notifier([dead_url, url], registry, backoff_initial=0.2, backoff_max=0.2)
        async with running(n):
            for i in range(3):
                n.send(alert(i))
            await eventually(lambda: total(registry, "delivered") == 3, timeout=1.0)
            await eventually(lambda: total(registry, "failed") == 3)
    assert [p["target"] for p in receiver.received] == ["t0", "t1", "t2"]


async def test_a_full_buffer_drops_the_oldest_and_counts_it() -> None:
    receiver = Receiver(delay=0.2)
    registry = CollectorRegistry()
    async with serve(receiver) as url:
        n = notifier([url], registry, buffer=2)
        async with running(n):
            n.send(alert(0))
            await eventually(lambda: receiver.calls == 1)  # t0 in flight, buffer empty
            for i in range(1, 5):
                n.send(alert(i))  # t1, t2 dropped: t3, t4 kept
            await eventually(lambda: total(registry, "delivered") == 3)
    assert total(registry, "dropped") == 2
    assert [p["target"] for p in receiver.received] == ["t0", "t3", "t4"]
