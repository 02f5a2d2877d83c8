"""Drains the durable queue upstream: in order per order key, paced, with backoff.

One dispatcher asks the queue for the heads of the order keys (``ready``), takes a token
from a token bucket for each, and hands it to a worker task. Several requests are in
flight at once, but never two of one order key: the queue only offers a key's head, and
the dispatcher skips keys already in flight. That is what keeps per-key order exact while
the whole drain can still reach thousands of requests a second.

Verdicts: 2xx/3xx delivered; 408/425/429/5xx and network errors retried later (jittered
exponential backoff, never earlier than the upstream's ``Retry-After``); any other 4xx a
dead letter keeping the upstream's answer. A network error also tells the mode machine,
which stops the replay until the link is back.

Time: pacing runs on the monotonic clock; the times written to the queue file (retry
waits) come from a ``FileTime``, which a wall clock step does not move (the station shifts
the file's times by the step, then resyncs it), so a step neither freezes nor rushes a wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal

import structlog

from netwatch.clock import Clock, FileTime
from netwatch.config.schema import Replay
from netwatch.errors import QueueError
from netwatch.proxy.forward import Reply, UpstreamFailure
from netwatch.proxy.queue import DurableQueue, Entry

log = structlog.get_logger("netwatch.proxy.replay")

Outcome = Literal["delivered", "retried", "dead"]
RETRY_STATUSES = frozenset({408, 425, 429})
# A Retry-After is honoured, but not one that would park an entry for more than a day.
RETRY_AFTER_CAP = 24 * 3600.0
DEAD_BODY_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Backoff:
    """Jittered exponential backoff: ``initial * 2**(n-1)`` capped at ``maximum``, minus up
    to ``jitter`` of itself at random (so a fleet of entries does not retry in lockstep)."""

    initial: float
    maximum: float
    jitter: float = 0.5

    def delay(
        self,
        attempts: int,
        *,
        retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
        base = min(self.maximum, self.initial * 2.0 ** max(0, attempts - 1))
        delay = base * (1.0 - self.jitter * rand())
        if retry_after is not None:
            delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
        return delay


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` as seconds from ``now``: delta-seconds or an HTTP-date; None if bad."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


class TokenBucket:
    """Paces sends at ``rate()`` per second (re-read on every take, so peak hours apply at
    once). Tokens may go negative: a take then returns how long to wait, which keeps the
    long-run rate exact even when sleeps overshoot."""

    def __init__(self, rate: Callable[[], float], now: float, *, burst: float = 0.05) -> None:
        self._rate = rate
        self._burst = burst  # seconds' worth of tokens that may pile up while idle
        self._tokens = 1.0
        self._at = now

    def take(self, now: float) -> float:
        rate = self._rate()
        capacity = max(1.0, rate * self._burst)
        self._tokens = min(capacity, self._tokens + (now - self._at) * rate)
        self._at = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / rate


def classify(status: int) -> Outcome:
    if 200 <= status < 400:
        return "delivered"
    if status in RETRY_STATUSES or status >= 500:
        return "retried"
    return "dead"


Send = Callable[[Entry], Awaitable[Reply]]
OnResult = Callable[[Entry, Outcome, float], None]


class Replayer:
    """Run ``await replayer.run()`` in the daemon's TaskGroup; ``wake()`` on new work."""

    def __init__(
        self,
        queue: DurableQueue,
        send: Send,
        settings: Replay,
        *,
        clock: Clock,
        is_peak: Callable[[], bool],
        active: Callable[[], bool],
        on_result: OnResult,
        on_network_error: Callable[[str], None],
        concurrency: int = 32,
        poll: float = 0.25,
        rand: Callable[[], float] = random.random,
        file_time: FileTime | None = None,
    ) -> None:
        self._queue = queue
        self._file_time = file_time or FileTime(clock)
        self._send = send
        self._settings = settings
        self._clock = clock
        self._is_peak = is_peak
        self._active = active
        self._on_result = on_result
        self._on_network_error = on_network_error
        self._concurrency = concurrency
        self._poll = poll
        self._rand = rand
        self.backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self.bucket = TokenBucket(self.rate, clock.monotonic())
        self._in_flight: set[str] = set()  # order keys
        self._settled: set[str] = set()  # ids settled since the current ready() began
        self._wake = asyncio.Event()

    def rate(self) -> float:
        return self._settings.peak_rate if self._is_peak() else self._settings.rate

    def wake(self) -> None:
        """New entries or a mode change: look at the queue now rather than at the next poll."""
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def _nap(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        self._wake.clear()

    async def run(self) -> None:
        """Dispatch forever; worker tasks live in this method's own TaskGroup."""
        async with asyncio.TaskGroup() as workers:
            while True:
                free = self._concurrency - len(self._in_flight)
                if not self._active() or free <= 0:
                    await self._nap(self._poll)
                    continue
                batch = await self._next_batch(free)
                if not batch:
                    await self._nap(self._poll)
                    continue
                for entry in batch:
                    wait = self.bucket.take(self._clock.monotonic())
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if not self._active():
                        break
                    self._in_flight.add(entry.order_key)
                    workers.create_task(self._attempt(entry), name=f"replay-{entry.id}")

    async def _next_batch(self, free: int) -> list[Entry]:
        # An attempt that settles while this read runs may still show up in its snapshot,
        # as a head whose key is no longer in flight: skip those ids, or it would be sent
        # twice (and its retry backoff skipped).
        self._settled.clear()
        try:
            heads = await self._queue.ready(
                now=self._file_time.now(), limit=len(self._in_flight) + free
            )
        except QueueError:
            log.exception("replay_queue_read_failed")
            return []
        fresh = [
            e for e in heads if e.order_key not in self._in_flight and e.id not in self._settled
        ]
        return fresh[:free]

    async def _attempt(self, entry: Entry) -> None:
        try:
            await self._deliver(entry)
        except QueueError:
            # The entry stays queued; the next round tries again. Never lose, never crash.
            log.exception("replay_queue_write_failed", ticket=entry.id)
            await asyncio.sleep(self._poll)
        finally:
            self._settled.add(entry.id)
            self._in_flight.discard(entry.order_key)
            self._wake.set()

    async def _deliver(self, entry: Entry) -> None:
        try:
            reply = await self._send(entry)
        except UpstreamFailure as failure:
            self._on_network_error(failure.reason)
            await self._retry(entry, None, None)
            log.info("replay_retry", ticket=entry.id, reason=failure.reason)
            self._on_result(entry, "retried", self._file_time.now())
            return
        now = self._file_time.now()
        verdict = classify(reply.status)
        if verdict == "delivered":
            await self._queue.mark_delivered(entry.id, status=reply.status, now=now)
        elif verdict == "retried":
            # An HTTP-date is the upstream's wall clock: compared with ours, not the file's.
            retry_after = parse_retry_after(reply.retry_after, self._clock.now())
            await self._retry(entry, reply.status, retry_after)
            log.info("replay_retry", ticket=entry.id, status=reply.status)
        else:
            await self._queue.mark_dead(
                entry.id,
                reason="rejected",
                status=reply.status,
                body=reply.body[:DEAD_BODY_LIMIT],
                now=now,
            )
            log.warning("replay_rejected", ticket=entry.id, status=reply.status)
        self._on_result(entry, verdict, now)

    async def _retry(self, entry: Entry, status: int | None, retry_after: float | None) -> None:
        now = self._file_time.now()
        delay = self.backoff.delay(entry.attempts + 1, retry_after=retry_after, rand=self._rand)
        await self._queue.mark_retry(entry.id, status=status, next_attempt_at=now + delay, now=now)
