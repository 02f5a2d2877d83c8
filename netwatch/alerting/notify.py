"""Webhook notifications: each alert is POSTed as JSON to every configured webhook.

``send()`` is a plain, non-blocking call: the alert goes into one bounded buffer per webhook
(oldest dropped first, and counted), so a dead webhook can slow neither the monitor nor the
other webhooks. ``run()`` delivers each webhook's alerts in order; each delivery is retried
by stamina with jittered exponential backoff on network errors, timeouts, 408/425/429 and
5xx, for a bounded number of attempts. Other 4xx are not retried: the receiver said the
request itself is wrong.

``netwatch_webhook_total{site,outcome}`` counts one per (alert, webhook): ``delivered``,
``failed`` (gave up) or ``dropped`` (buffer full).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import stamina
import stamina.instrumentation
import structlog
from prometheus_client import CollectorRegistry, Counter

from netwatch.alerting.alerts import AlertEvent
from netwatch.config.schema import Webhook

log = structlog.get_logger(__name__)

# stamina counts retries in prometheus_client's global registry by default; netwatch exports
# only its injected registry, so retries are logged instead. Set here, where retries are
# used, so that a daemon without webhooks never imports stamina (nor tenacity).
stamina.instrumentation.set_on_retry_hooks([stamina.instrumentation.StructlogOnRetryHook])

_RETRY_STATUSES = frozenset({408, 425, 429})


class _RejectedStatus(Exception):
    """The webhook answered with an error status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class _RetryableStatus(_RejectedStatus):
    """... one that may go away: worth another attempt."""


class _Outbox:
    def __init__(self, hook: Webhook) -> None:
        self.hook = hook
        self.where = urlsplit(hook.url).netloc  # the URL may carry a token: log only this
        self.pending: deque[AlertEvent] = deque()
        self.wakeup = asyncio.Event()


class WebhookNotifier:
    """Delivers alerts to webhooks in the background of ``run()``."""

    def __init__(
        self,
        webhooks: Sequence[Webhook],
        registry: CollectorRegistry,
        *,
        buffer: int = 1000,
        attempts: int = 5,
        timeout: float = 10.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
    ) -> None:
        self.webhooks = tuple(webhooks)
        self._buffer = buffer
        self._attempts = attempts
        self._timeout = timeout
        self._backoff = (backoff_initial, backoff_max)
        self._outboxes = [_Outbox(hook) for hook in self.webhooks]
        self._total = Counter(
            "netwatch_webhook",
            "Alert deliveries to webhooks, one per (alert, webhook)",
            ["site", "outcome"],
            registry=registry,
        )

    def send(self, alert: AlertEvent) -> None:
        """Queue ``alert`` for every webhook; never blocks (call from the event loop)."""
        for outbox in self._outboxes:
            outbox.pending.append(alert)
            if len(outbox.pending) > self._buffer:
                dropped = outbox.pending.popleft()
                self._total.labels(dropped.site, "dropped").inc()
                log.warning("webhook.dropped", webhook=outbox.where, alert=dropped.alert)
            outbox.wakeup.set()

    async def run(self) -> None:
        """Deliver forever; cancel to stop (alerts still buffered are not delivered)."""
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session, asyncio.TaskGroup() as tasks:
            for outbox in self._outboxes:
                tasks.create_task(self._drain(session, outbox))

    async def _drain(self, session: aiohttp.ClientSession, outbox: _Outbox) -> None:
        while True:
            outbox.wakeup.clear()
            while outbox.pending:
                await self._deliver(session, outbox, outbox.pending.popleft())
            await outbox.wakeup.wait()

    async def _deliver(
        self, session: aiohttp.ClientSession, outbox: _Outbox, alert: AlertEvent
    ) -> None:
        payload = alert.to_payload()
        where = outbox.where
        try:
            async for attempt in stamina.retry_context(
                on=(aiohttp.ClientError, TimeoutError, _RetryableStatus),
                attempts=self._attempts,
                timeout=None,
                wait_initial=self._backoff[0],
                wait_max=self._backoff[1],
                wait_jitter=self._backoff[0],
            ):
                with attempt:
                    await self._post(session, outbox.hook, payload)
        except (aiohttp.ClientError, TimeoutError, _RejectedStatus) as exc:
            self._total.labels(alert.site, "failed").inc()
            log.warning(
                "webhook.failed", webhook=where, alert=alert.alert, error=str(exc) or repr(exc)
            )
        else:
            self._total.labels(alert.site, "delivered").inc()
            log.info("webhook.delivered", webhook=where, alert=alert.alert, status=alert.status)

    @staticmethod
    async def _post(session: aiohttp.ClientSession, hook: Webhook, payload: dict[str, Any]) -> None:
        async with session.post(hook.url, json=payload, headers=hook.headers) as response:
            await response.read()
            if response.status in _RETRY_STATUSES or response.status >= 500:
                raise _RetryableStatus(response.status)
            if response.status >= 400:
                raise _RejectedStatus(response.status)
