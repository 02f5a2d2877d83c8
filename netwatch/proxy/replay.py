"""Drains the durable queue upstream: in order per order key, paced, with backoff.

One dispatcher asks the queue for the heads of the order keys (``ready``), takes a token
from a token bucket for each, and hands it to a worker task. Several requests are in
flight at once, but never two of one order key: the queue only offers a key's head, and
the dispatcher skips keys already in flight. That is what keeps per-key order exact while
the whole drain can still reach thousands of requests a second.

Verdicts: 2xx/3xx delivered; 408/425/429/5xx and network errors retried later (jittered
exponential backoff, never earlier than the upstream's ``Retry-After``), in doubt after a
502 or 504 (a gateway's answer: its origin may have applied the write); any other 4xx a
dead letter keeping the upstream's answer. A network error also tells the mode machine,
which stops the replay until the link is back.

In doubt (see ``dedupe.py``): the batch read from the queue is claimed in the same writer job
that records its attempts (sharing the group commit of the deliveries around it), so a proxy
killed mid-attempt knows on restart which entries may have been applied.
A failure after the request may have been written leaves the entry in doubt; its next turn
follows its rule's strategy: re-sent (``idempotency-key``), looked up first (``lookup``, no
sooner than ``settle`` seconds after the doubtful attempt, so a slow upstream has finished
applying it), or held for an operator (``hold``).

Time: pacing runs on the monotonic clock; the times written to the queue file (retry
waits) come from a ``FileTime``, which a wall clock step does not move (the station shifts
the file's times by the step, then resyncs it), so a step neither freezes nor rushes a wait.

An entry the queue cannot read back is set aside (``quarantine``: a dead letter, reason
``unreadable``) instead of sent. An outcome the queue cannot record (disk full) is retried
as a write, never as a send, and no new send starts until it is recorded: replay pauses.
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
from netwatch.config.schema import Dedupe, Lookup, Replay
from netwatch.errors import QueueError
from netwatch.proxy.dedupe import LookupImpossible, parse_template, render, verdict
from netwatch.proxy.forward import GATEWAY_IN_DOUBT, Reply, UpstreamFailure
from netwatch.proxy.queue import DurableQueue, Entry

log = structlog.get_logger("netwatch.proxy.replay")

# found: settled by a lookup (the upstream had it); held: left for an operator.
Outcome = Literal["delivered", "retried", "dead", "found", "held"]
RETRY_STATUSES = frozenset({408, 425, 429})
# A Retry-After is honoured, but not one that would park an entry for more than a day.
RETRY_AFTER_CAP = 24 * 3600.0
DEAD_BODY_LIMIT = 64 * 1024
RECORD_RETRY_MAX = 5.0  # seconds between tries to record an outcome the queue refused
CLAIM_AHEAD_S = 0.1


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
LookupSend = Callable[[Entry, Lookup, str], Awaitable[int]]  # (entry, lookup, path) -> status
OnResult = Callable[[Entry, Outcome, float], None]


def _always_key(_entry: Entry) -> Dedupe:
    return "idempotency-key"


async def _no_lookup(_entry: Entry, _lookup: Lookup, _path: str) -> int:
    raise AssertionError("no lookup sender given for a lookup strategy")


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
        strategy: Callable[[Entry], Dedupe] = _always_key,
        lookup: LookupSend = _no_lookup,
        settle: float = 0.0,
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
        self._strategy = strategy
        self._lookup = lookup
        self._settle = settle
        self.backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self.bucket = TokenBucket(self.rate, clock.monotonic())
        self._in_flight: set[str] = set()  # order keys
        self._unrecorded = 0  # attempts whose outcome the queue has not taken yet
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
                if not self._active() or free <= 0 or self._unrecorded:
                    await self._nap(self._poll)
                    continue
                batch = await self._next_batch(free)
                if not batch:
                    await self._nap(self._poll)
                    continue
                for index, entry in enumerate(batch):
                    wait = self.bucket.take(self._clock.monotonic())
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if not self._active():
                        # Claimed, never sent: their record only makes a lookup or a
                        # re-send of the upstream's answer happen if the proxy dies now.
                        await self._unclaim(batch[index:])
                        break
                    self._in_flight.add(entry.order_key)
                    workers.create_task(self._attempt(entry), name=f"replay-{entry.id}")

    def _sends_at_once(self, entry: Entry) -> bool:
        """Whether the entry's turn begins with sending it (not with a lookup or a hold)."""
        return not entry.doubt or self._strategy(entry) == "idempotency-key"

    async def _unclaim(self, entries: list[Entry]) -> None:
        now = self._file_time.now()
        for entry in entries:
            if self._sends_at_once(entry):
                await self._queue.mark_retry(
                    entry.id, status=None, next_attempt_at=now, now=now, attempt=False
                )

    async def _next_batch(self, free: int) -> list[Entry]:
        # Claimed in a writer job: an attempt that settled before it is never offered
        # again, and one still settling has its key in flight (skipped).
        busy = frozenset(self._in_flight)
        # Paced, claim only what goes within CLAIM_AHEAD_S: a proxy killed meanwhile
        # leaves few entries needlessly in doubt.
        wanted = min(free, max(1, int(self.rate() * CLAIM_AHEAD_S)))
        taken = 0

        def skip(entry: Entry) -> bool:  # runs on the writer thread: frozen state only
            nonlocal taken
            if entry.order_key in busy or taken >= wanted:
                return True
            taken += 1
            return False

        try:
            return await self._queue.claim(
                now=self._file_time.now(),
                limit=len(busy) + wanted,
                skip=skip,
                sends=self._sends_at_once,
            )
        except QueueError:
            log.exception("replay_queue_read_failed")
            return []

    async def _attempt(self, entry: Entry) -> None:
        try:
            await self._deliver(entry)
        except QueueError:
            # The entry stays queued; the next round tries again. Never lose, never crash.
            log.exception("replay_queue_write_failed", ticket=entry.id)
            await asyncio.sleep(self._poll)
        finally:
            self._in_flight.discard(entry.order_key)
            self._wake.set()

    async def _deliver(self, entry: Entry) -> None:
        if entry.unreadable is not None:
            await self._queue.quarantine(entry.seq)
            log.warning("replay_unreadable", ticket=entry.id, seq=entry.seq, why=entry.unreadable)
            self._on_result(entry, "dead", self._file_time.now())
            return
        strategy = self._strategy(entry)
        if not self._sends_at_once(entry):
            if isinstance(strategy, str):  # hold (idempotency-key sends at once)
                await self._hold(entry, "in doubt: awaiting an operator", in_doubt=False)
                return
            if await self._settled_by_lookup(entry, strategy.lookup):
                return
            # The upstream does not have it: send it, recording the attempt first.
            await self._queue.mark_attempting([entry.id], now=self._file_time.now())
        try:
            reply = await self._send(entry)
        except UpstreamFailure as failure:
            self._on_network_error(failure.reason)
            if failure.in_doubt and strategy == "hold":
                await self._hold(entry, f"in doubt: {failure.reason}", in_doubt=True)
                return
            await self._retry(entry, None, None, in_doubt=failure.in_doubt)
            log.info(
                "replay_retry", ticket=entry.id, reason=failure.reason, in_doubt=failure.in_doubt
            )
            self._on_result(entry, "retried", self._file_time.now())
            return
        now = self._file_time.now()
        verdict = classify(reply.status)
        if verdict == "delivered":
            status = reply.status
            await self._record(
                entry, lambda: self._queue.mark_delivered(entry.id, status=status, now=now)
            )
        elif verdict == "retried":
            # An HTTP-date is the upstream's wall clock: compared with ours, not the file's.
            retry_after = parse_retry_after(reply.retry_after, self._clock.now())
            doubt = reply.status in GATEWAY_IN_DOUBT  # the origin may have applied it
            await self._retry(entry, reply.status, retry_after, in_doubt=doubt)
            log.info("replay_retry", ticket=entry.id, status=reply.status, in_doubt=doubt)
        else:
            await self._record(
                entry,
                lambda: self._queue.mark_dead(
                    entry.id,
                    reason="rejected",
                    status=reply.status,
                    body=reply.body[:DEAD_BODY_LIMIT],
                    now=now,
                ),
            )
            log.warning("replay_rejected", ticket=entry.id, status=reply.status)
        self._on_result(entry, verdict, now)

    async def _retry(
        self,
        entry: Entry,
        status: int | None,
        retry_after: float | None,
        *,
        in_doubt: bool = False,
    ) -> None:
        now = self._file_time.now()
        delay = self.backoff.delay(entry.attempts + 1, retry_after=retry_after, rand=self._rand)
        await self._record(
            entry,
            lambda: self._queue.mark_retry(
                entry.id, status=status, next_attempt_at=now + delay, now=now, in_doubt=in_doubt
            ),
        )

    async def _record(self, entry: Entry, write: Callable[[], Awaitable[None]]) -> None:
        """Record a sent entry's outcome. If the queue refuses (disk full), the entry must
        not look unsent: it keeps its order key busy, no new send starts, and the same
        write is tried again until the queue takes it."""
        try:
            await write()
        except QueueError as exc:
            error = str(exc)
        else:
            return
        self._unrecorded += 1
        log.error("replay_paused", ticket=entry.id, error=error)
        delay = self._poll
        try:
            while True:
                await asyncio.sleep(delay)
                delay = min(2 * delay, RECORD_RETRY_MAX)
                with contextlib.suppress(QueueError):
                    await write()
                    log.info("replay_resumed", ticket=entry.id)
                    return
        finally:
            self._unrecorded -= 1

    async def _hold(self, entry: Entry, reason: str, *, in_doubt: bool) -> None:
        now = self._file_time.now()
        await self._record(
            entry,
            lambda: self._queue.mark_held(entry.id, reason=reason, in_doubt=in_doubt, now=now),
        )
        log.warning("replay_held_in_doubt", ticket=entry.id, reason=reason)
        self._on_result(entry, "held", now)

    async def _settled_by_lookup(self, entry: Entry, lookup: Lookup) -> bool:
        """Ask the upstream about an entry in doubt. True when this turn is over (found,
        held, or to be asked again later); False when it is absent: send it."""
        now = self._file_time.now()
        ready_at = (entry.attempt_at or 0.0) + self._settle
        if ready_at > now:
            await self._queue.mark_retry(
                entry.id, status=None, next_attempt_at=ready_at, now=now, attempt=False
            )
            return True
        try:
            path = render(parse_template(lookup.url), entry)
        except LookupImpossible as exc:
            await self._hold(entry, f"lookup impossible: {exc}", in_doubt=False)
            return True
        try:
            status = await self._lookup(entry, lookup, path)
        except UpstreamFailure as failure:
            self._on_network_error(failure.reason)
            status = None
        found = "unknown" if status is None else verdict(lookup, status)
        now = self._file_time.now()
        if found == "absent":
            log.info("replay_lookup_absent", ticket=entry.id)
            return False
        if found == "applied":
            assert status is not None
            found_status = status
            await self._record(
                entry,
                lambda: self._queue.mark_delivered(
                    entry.id, status=found_status, now=now, reason="found by lookup"
                ),
            )
            log.info("replay_found_by_lookup", ticket=entry.id, status=status)
            self._on_result(entry, "found", now)
            return True
        # No verdict (a network error, or a status that is neither): ask again later.
        await self._retry(entry, None, None)
        log.info("replay_lookup_unsettled", ticket=entry.id, status=status)
        self._on_result(entry, "retried", now)
        return True
