"""Edges of the replay that mutation testing (``make mutation``) found unguarded: the backoff's
first steps as configured, the upstream status kept on a retried ticket, and a Retry-After
date given with the ``-0000`` zone."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from pathlib import Path
from typing import cast

import pytest
from helpers.servers import wait_until
from test_replay import NOW, fill, replaying, watched

from netwatch.clock import SystemClock
from netwatch.config.schema import Replay
from netwatch.proxy.forward import Reply, UpstreamFailure
from netwatch.proxy.queue import DurableQueue, Entry
from netwatch.proxy.replay import Replayer, Send, parse_retry_after


def test_retry_after_http_date_without_a_zone_name_is_utc() -> None:
    # RFC 5322 "-0000" parses to a naive datetime: still UTC, never a crash.
    assert parse_retry_after("Mon, 23 Nov 2026 08:00:30 -0000", NOW) == 30.0


async def test_retries_back_off_from_backoff_initial_doubling_and_keep_the_status(
    tmp_path: Path,
) -> None:
    calls: list[tuple[float, Entry]] = []  # each attempt sees what the last one stored

    async def send(entry: Entry) -> Reply:
        calls.append((time.time(), entry))
        return Reply(503 if len(calls) < 3 else 201, None, b"")

    async with watched(tmp_path / "q.db") as queue:
        await fill(queue, ["a"], per_key=1)
        # backoff_initial is 50 ms in replaying(); without jitter the first retry waits
        # 50 ms, the second 100 ms.
        async with replaying(queue, send, rand=lambda: 0.0) as results:
            await wait_until(lambda: len(results) == 3, timeout=10)
    (first_at, _), (second_at, second), (_, third) = calls
    assert (second.attempts, second.upstream_status) == (1, 503)
    assert 0.05 <= second.next_attempt_at - first_at < 0.05 + 0.04
    assert (third.attempts, third.upstream_status) == (2, 503)
    assert 0.1 <= third.next_attempt_at - second_at < 0.1 + 0.04


async def test_a_retry_after_date_is_honoured_and_a_delivery_is_stamped(tmp_path: Path) -> None:
    calls: list[tuple[float, Entry]] = []

    async def send(entry: Entry) -> Reply:
        calls.append((time.time(), entry))
        if len(calls) == 1:
            return Reply(503, formatdate(time.time() + 2, usegmt=True), b"")
        return Reply(201, None, b"")

    async with watched(tmp_path / "q.db") as queue:
        await fill(queue, ["a"], per_key=1)
        async with replaying(queue, send, rand=lambda: 0.0) as results:
            await wait_until(lambda: len(results) == 2, timeout=10)
        (first_at, entry), (_, retried) = calls
        delivered = await queue.get(entry.id)
    # An HTTP-date has whole seconds: 2 s ahead is more than 1 s, never the 50 ms backoff.
    assert retried.next_attempt_at - first_at > 1.0
    assert [outcome for _, outcome in results] == ["retried", "delivered"]
    assert delivered is not None
    assert delivered.delivered_at is not None
    assert delivered.delivered_at == pytest.approx(time.time(), abs=5)


async def test_a_network_error_is_reported_as_retried_so_the_backlog_is_not_counted_down(
    tmp_path: Path,
) -> None:
    failures = [UpstreamFailure("connection reset")]

    async def send(entry: Entry) -> Reply:
        if failures:
            raise failures.pop()
        return Reply(201, None, b"")

    async with watched(tmp_path / "q.db") as queue:
        await fill(queue, ["a"], per_key=1)
        async with replaying(queue, send, rand=lambda: 0.0) as results:
            await wait_until(lambda: len(results) == 2, timeout=10)
    # The proxy counts its backlog down on every outcome but "retried" (station.py).
    assert [outcome for _, outcome in results] == ["retried", "delivered"]


async def test_a_rejected_entry_keeps_the_upstream_answer(tmp_path: Path) -> None:
    answer = b'{"error": "validation_failed", "detail": "citizen_id"}'

    async def send(entry: Entry) -> Reply:
        return Reply(422, None, answer)

    async with watched(tmp_path / "q.db") as queue:
        await fill(queue, ["a"], per_key=1)
        async with replaying(queue, send) as results:
            await wait_until(lambda: results, timeout=10)
        (dead,) = await queue.list(state="dead")
    assert (dead.reason, dead.upstream_status, dead.upstream_body) == ("rejected", 422, answer)


def test_the_rate_is_peak_rate_inside_peak_hours_and_rate_outside() -> None:
    peak = [True]
    replayer = Replayer(
        cast(DurableQueue, None),
        cast(Send, None),
        Replay(rate=50.0, peak_rate=5.0),
        clock=SystemClock(),
        is_peak=lambda: peak[0],
        active=lambda: True,
        on_result=lambda *_: None,
        on_network_error=lambda _: None,
    )
    assert replayer.rate() == 5.0
    peak[0] = False
    assert replayer.rate() == 50.0


async def test_in_flight_replays_reach_the_concurrency_and_never_pass_it(tmp_path: Path) -> None:
    in_flight, peak = [0], [0]
    release = asyncio.Event()

    async def send(entry: Entry) -> Reply:
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await release.wait()
        in_flight[0] -= 1
        return Reply(201, None, b"")

    asked = [0]  # the dispatcher asks at each turn of its loop

    def active() -> bool:
        asked[0] += 1
        return True

    async with watched(tmp_path / "q.db") as queue:
        await fill(queue, [f"k{n}" for n in range(20)], per_key=1)
        async with replaying(queue, send, active=active) as results:  # concurrency 8
            await wait_until(lambda: in_flight[0] >= 8, timeout=10)
            since = asked[0]  # a few more turns with all 8 busy: none sends a ninth
            await wait_until(lambda: asked[0] >= since + 3, timeout=10)
            release.set()
            await wait_until(lambda: len(results) == 20, timeout=10)
    assert peak[0] == 8
