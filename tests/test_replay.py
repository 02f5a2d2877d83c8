"""Replay policy (backoff, Retry-After, pacing, verdicts) and the Replayer against a real
SQLite queue with an injected ``send``."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers.servers import wait_until

from netwatch.clock import SystemClock
from netwatch.config.schema import Replay
from netwatch.proxy.forward import Reply, UpstreamFailure
from netwatch.proxy.queue import DurableQueue, Entry, NewEntry
from netwatch.proxy.replay import (
    Backoff,
    Outcome,
    Replayer,
    Send,
    TokenBucket,
    classify,
    parse_retry_after,
)

NOW = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter() -> None:
    backoff = Backoff(initial=0.5, maximum=60.0, jitter=0.5)
    no_jitter = [backoff.delay(n, rand=lambda: 0.0) for n in range(1, 10)]
    assert no_jitter == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert backoff.delay(3, rand=lambda: 1.0) == 1.0  # at most half taken off
    assert backoff.delay(1, retry_after=30.0, rand=lambda: 0.0) == 30.0
    assert backoff.delay(1, retry_after=10**9, rand=lambda: 0.0) == 24 * 3600.0


def test_retry_after_in_seconds_or_http_date() -> None:
    assert parse_retry_after("120", NOW) == 120.0
    assert parse_retry_after("Mon, 23 Nov 2026 08:00:30 GMT", NOW) == 30.0
    assert parse_retry_after("Mon, 23 Nov 2026 07:00:00 GMT", NOW) == 0.0
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after(None, NOW) is None


def test_verdicts_by_status() -> None:
    assert [classify(s) for s in (200, 201, 204, 301, 304)] == ["delivered"] * 5
    assert [classify(s) for s in (408, 425, 429, 500, 502, 503, 504)] == ["retried"] * 7
    assert [classify(s) for s in (400, 401, 404, 409, 413, 422)] == ["dead"] * 6


def test_token_bucket_paces_at_the_current_rate() -> None:
    rate = [10.0]
    bucket = TokenBucket(lambda: rate[0], now=0.0)
    waits = [bucket.take(0.0) for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3])
    # Idle time refills at most a small burst, never a flood.
    assert bucket.take(100.0) == 0.0
    assert bucket.take(100.0) > 0.0
    rate[0] = 1000.0  # peak hours over: the new rate applies at the next take
    assert bucket.take(200.0) == 0.0
    assert sum(bucket.take(200.0) == 0.0 for _ in range(100)) == 49


# --- the Replayer against a real queue --------------------------------------------------------


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[WatchedReads]:
    async with watched(tmp_path / "q.db") as q:
        yield q


async def fill(queue: DurableQueue, keys: list[str], per_key: int) -> None:
    for i in range(per_key):
        for key in keys:
            new = NewEntry("POST", "/api/x", "", (), f"{key}:{i}".encode(), f"{key}-{i}", key)
            await queue.enqueue(new, now=time.time())


@asynccontextmanager
async def replaying(
    queue: DurableQueue,
    send: Send,
    *,
    rate: float = 1e6,
    active: Callable[[], bool] = lambda: True,
    network_errors: list[str] | None = None,
    rand: Callable[[], float] = random.random,
) -> AsyncIterator[list[tuple[str, Outcome]]]:
    results: list[tuple[str, Outcome]] = []
    errors = network_errors if network_errors is not None else []
    replayer = Replayer(
        queue,
        send,
        Replay(rate=rate, peak_rate=rate, backoff_initial=0.05, backoff_max=0.2),
        clock=SystemClock(),
        is_peak=lambda: False,
        active=active,
        on_result=lambda entry, outcome, _now: results.append((entry.id, outcome)),
        on_network_error=errors.append,
        concurrency=8,
        poll=0.02,
        rand=rand,
    )
    task = asyncio.get_running_loop().create_task(replayer.run())
    try:
        yield results
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_one_in_flight_per_order_key_many_across_keys(queue: WatchedReads) -> None:
    keys = [f"st-{i}" for i in range(20)]
    await fill(queue, keys, per_key=15)
    in_flight: Counter[str] = Counter()
    peak_per_key = 0
    peak_total = 0
    sent: list[bytes] = []

    async def send(entry: Entry) -> Reply:
        nonlocal peak_per_key, peak_total
        in_flight[entry.order_key] += 1
        peak_per_key = max(peak_per_key, in_flight[entry.order_key])
        peak_total = max(peak_total, in_flight.total())
        await asyncio.sleep(0.001 * (hash(entry.id) % 3))
        sent.append(entry.body)
        in_flight[entry.order_key] -= 1
        return Reply(201, None, b"")

    async with replaying(queue, send) as results:
        await wait_until(lambda: len(results) >= 300, timeout=20)
        await queue.looked_again()
    assert len(sent) == len(set(sent)) == 300  # each entry sent exactly once
    assert peak_per_key == 1
    assert peak_total > 1
    for key in keys:
        assert [b for b in sent if b.split(b":")[0] == key.encode()] == [
            f"{key}:{i}".encode() for i in range(15)
        ]
    assert (await queue.stats(now=time.time())).depth == 0


class WatchedReads(DurableQueue):
    """A queue that records how many heads each read for the dispatcher (``ready`` or
    ``claim``) returned: an empty read after the last result is the positive sign that the
    dispatcher looked again and found nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[int] = []

    async def ready(self, *, now: float, limit: int) -> Sequence[Entry]:
        heads = await super().ready(now=now, limit=limit)
        self.reads.append(len(heads))
        return heads

    async def claim(
        self,
        *,
        now: float,
        limit: int,
        skip: Callable[[Entry], bool],
        sends: Callable[[Entry], bool],
    ) -> list[Entry]:
        heads = await super().claim(now=now, limit=limit, skip=skip, sends=sends)
        self.reads.append(len(heads))
        return heads

    async def looked_again(self) -> None:
        """Wait until a read that began after this call returned no head at all."""
        start = len(self.reads)
        await wait_until(lambda: 0 in self.reads[start + 1 :], timeout=10)


def watched(path: Path) -> WatchedReads:
    queue = WatchedReads.open(path, max_bytes=2**30, max_age=3600)
    assert isinstance(queue, WatchedReads)
    return queue


class StaleReads(WatchedReads):
    """A queue whose ``ready`` / ``claim`` snapshot ages before it is returned, as a slow
    disk's would."""

    async def ready(self, *, now: float, limit: int) -> Sequence[Entry]:
        heads = await super().ready(now=now, limit=limit)
        await asyncio.sleep(0.01)
        return heads

    async def claim(
        self,
        *,
        now: float,
        limit: int,
        skip: Callable[[Entry], bool],
        sends: Callable[[Entry], bool],
    ) -> list[Entry]:
        heads = await super().claim(now=now, limit=limit, skip=skip, sends=sends)
        await asyncio.sleep(0.01)
        return heads


async def test_an_attempt_settling_during_a_queue_read_is_not_sent_again(
    tmp_path: Path,
) -> None:
    sent: list[bytes] = []

    async def send(entry: Entry) -> Reply:
        sent.append(entry.body)
        return Reply(200, None, b"")

    stale = StaleReads.open(tmp_path / "q.db", max_bytes=2**30, max_age=3600)
    assert isinstance(stale, StaleReads)
    stale.reads = []
    async with stale as queue:
        await fill(queue, ["a", "b", "c", "d"], per_key=10)
        async with replaying(queue, send) as results:
            await wait_until(lambda: len(results) >= 40, timeout=20)
            await queue.looked_again()
    assert len(sent) == len(set(sent)) == 40


async def test_network_error_is_reported_and_the_entry_kept_for_later(
    queue: WatchedReads,
) -> None:
    await fill(queue, ["a"], per_key=2)
    active = [True]
    asked = [0]  # how often the dispatcher asked whether it may send
    errors: list[str] = []

    def may_send() -> bool:
        asked[0] += 1
        return active[0]

    async def send(entry: Entry) -> Reply:
        active[0] = False  # what the mode machine does on a passive failure
        raise UpstreamFailure("connection refused")

    async with replaying(queue, send, active=may_send, network_errors=errors) as results:
        await wait_until(lambda: results)
        # The dispatcher went round its loop a few times since, and each time held back.
        since = asked[0]
        await wait_until(lambda: asked[0] >= since + 3, timeout=10)
    assert errors == ["connection refused"]
    assert len(results) == 1  # nothing else is tried while offline
    (head,) = await queue.ready(now=time.time() + 60, limit=10)
    assert head.body == b"a:0"
    assert head.attempts == 1
    assert head.state == "queued"


async def test_throttled_replay_keeps_to_the_rate(queue: WatchedReads) -> None:
    await fill(queue, [f"k{i}" for i in range(10)], per_key=2)
    sent_at: list[float] = []

    async def send(entry: Entry) -> Reply:
        sent_at.append(time.monotonic())
        return Reply(200, None, b"")

    async with replaying(queue, send, rate=40.0) as results:
        await wait_until(lambda: len(results) == 20, timeout=10)
    # Measured between the sends themselves, not from a start-up whose cost varies with
    # the machine's load. The bucket may hold up to max(1, rate * 50 ms) = 2 tokens at the
    # start, so 20 sends take at least 18 intervals: never faster than the rate. A loaded
    # machine can only make it slower; the upper bound is generous for that.
    span = sent_at[-1] - sent_at[0]
    assert 18 / 40 - 0.01 <= span <= 19 / 40 * 3
