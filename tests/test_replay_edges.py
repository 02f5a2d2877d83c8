"""Edges of the replay that mutation testing (``make mutation``) found unguarded: the backoff's
first steps as configured, the upstream status kept on a retried ticket, and a Retry-After
date given with the ``-0000`` zone."""

from __future__ import annotations

import time
from pathlib import Path

from helpers.servers import wait_until
from test_replay import NOW, fill, replaying, watched

from netwatch.proxy.forward import Reply
from netwatch.proxy.queue import Entry
from netwatch.proxy.replay import parse_retry_after


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
