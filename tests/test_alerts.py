"""The alert machine, driven by events and explicit times only (no clock, no asyncio)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from netwatch.alerting.alerts import AlertEvent, AlertPolicy, AlertState
from netwatch.events import LinkChanged, QueueStats

T0 = datetime(2026, 11, 23, 1, 0, tzinfo=UTC)  # 08:00 in Ho Chi Minh City
HOLD = 30.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def link(new: str, t: float, *, target: str = "popdb-api", peak: bool = True) -> LinkChanged:
    return LinkChanged(
        site="q1",
        target=target,
        type="http",
        old="?",
        new=new,
        since=at(t),
        peak=peak,
        latency_ms=950.0 if new == "degraded" else None,
        loss=0.25 if new == "degraded" else None,
        reason="connect refused" if new == "down" else "",
    )


def queue(depth: int, age: float, dead: int) -> QueueStats:
    return QueueStats(site="q1", depth=depth, oldest_age_s=age, dead=dead)


def state() -> AlertState:
    return AlertState(AlertPolicy(hold_down=HOLD), site="q1")


def brief(events: list[AlertEvent]) -> list[tuple[str, str, str]]:
    return [(e.alert, e.status, e.target) for e in events]


def test_link_down_fires_once_with_both_languages_and_peak() -> None:
    s = state()
    [event] = s.on_link(link("down", 0), at(0))
    assert brief([event]) == [("LinkDown", "firing", "popdb-api")]
    assert event.peak is True
    assert event.since == at(0)
    assert "popdb-api is DOWN since 08:00 23/11 during peak hours" in event.summary
    assert "Mất kết nối tới popdb-api" in event.summary_vi
    assert "giờ cao điểm" in event.summary_vi
    assert event.to_payload() == {
        "alert": "LinkDown",
        "status": "firing",
        "target": "popdb-api",
        "since": "2026-11-23T01:00:00+00:00",
        "peak": True,
        "summary": event.summary,
        "summary_vi": event.summary_vi,
        "site": "q1",
    }
    assert s.on_link(link("down", 5), at(5)) == []


def test_resolved_only_after_the_link_stays_up_for_hold_down() -> None:
    s = state()
    s.on_link(link("down", 0), at(0))
    assert s.on_link(link("up", 100, peak=False), at(100)) == []
    assert s.tick(at(100 + HOLD - 0.001)) == []
    [resolved] = s.tick(at(100 + HOLD))
    assert brief([resolved]) == [("LinkDown", "resolved", "popdb-api")]
    assert resolved.since == at(100)
    assert resolved.peak is False
    assert "lasted 1m" in resolved.summary
    assert "kéo dài 1m" in resolved.summary_vi
    assert s.tick(at(1000)) == []
    assert s.firing == frozenset()


def test_flap_within_hold_down_sends_no_resolved_and_no_second_firing() -> None:
    s = state()
    out = s.on_link(link("down", 0), at(0))
    for t in range(10, 200, 10):  # up, down, up, down... every 10 s, hold-down is 30 s
        out += s.on_link(link("up" if t % 20 else "down", t), at(t))
        out += s.tick(at(t + 5))
    assert brief(out) == [("LinkDown", "firing", "popdb-api")]
    out = s.on_link(link("up", 200), at(200)) + s.tick(at(231))
    assert brief(out) == [("LinkDown", "resolved", "popdb-api")]


def test_a_late_event_releases_an_elapsed_resolution_without_waiting_for_tick() -> None:
    s = state()
    s.on_link(link("down", 0), at(0))
    s.on_link(link("up", 10), at(10))
    out = s.on_link(link("down", 100), at(100))  # nobody called tick() in between
    assert brief(out) == [
        ("LinkDown", "resolved", "popdb-api"),
        ("LinkDown", "firing", "popdb-api"),
    ]


def test_degraded_then_down_holds_degraded_and_up_resolves_both() -> None:
    s = state()
    [degraded] = s.on_link(link("degraded", 0), at(0))
    assert degraded.alert == "LinkDegraded"
    assert "latency 950 ms, loss 25%" in degraded.summary
    assert brief(s.on_link(link("down", 10), at(10))) == [("LinkDown", "firing", "popdb-api")]
    assert s.tick(at(500)) == []  # down does not clear degraded: it is worse, not better
    s.on_link(link("up", 600), at(600))
    assert sorted(brief(s.tick(at(600 + HOLD)))) == [
        ("LinkDegraded", "resolved", "popdb-api"),
        ("LinkDown", "resolved", "popdb-api"),
    ]


def test_targets_are_independent() -> None:
    s = state()
    s.on_link(link("down", 0, target="a"), at(0))
    out = s.on_link(link("down", 1, target="b"), at(1))
    assert brief(out) == [("LinkDown", "firing", "b")]
    s.on_link(link("up", 2, target="a"), at(2))
    assert brief(s.tick(at(40))) == [("LinkDown", "resolved", "a")]
    assert s.firing == frozenset({("LinkDown", "b")})


def test_start_up_in_a_good_state_sends_nothing() -> None:
    s = state()
    assert s.on_link(link("up", 0), at(0)) == []
    assert s.tick(at(1000)) == []


def test_queue_backlog_and_dead_letters_fire_and_resolve() -> None:
    s = state()
    assert s.on_queue(queue(5, 60, 0), at(0)) == []
    [backlog] = s.on_queue(queue(42, 16 * 60, 0), at(10), peak=True)
    assert (backlog.alert, backlog.status, backlog.target) == ("QueueBacklog", "firing", "queue")
    assert backlog.since == at(10 - 16 * 60)
    assert "42 station requests queued, oldest waiting 16m during peak hours" in backlog.summary
    assert s.on_queue(queue(43, 17 * 60, 0), at(70)) == []
    [dead] = s.on_queue(queue(43, 17 * 60, 3), at(80))
    assert dead.alert == "DeadLetters"
    assert "3 queued requests failed" in dead.summary
    assert s.on_queue(queue(0, 0, 0), at(90)) == []
    assert sorted(brief(s.tick(at(90 + HOLD)))) == [
        ("DeadLetters", "resolved", "queue"),
        ("QueueBacklog", "resolved", "queue"),
    ]


STATES = st.sampled_from(["up", "degraded", "down"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 90.0), STATES), max_size=80))
def test_any_flapping_sequence_yields_bounded_alternating_alerts(
    steps: list[tuple[float, str]],
) -> None:
    s = state()
    t = 0.0
    out: list[AlertEvent] = []
    for dt, new in steps:
        t += dt
        out += s.on_link(link(new, t), at(t))
    last = steps[-1][1] if steps else "up"
    out += s.on_link(link("up", t + 1), at(t + 1)) + s.tick(at(t + 1 + HOLD))
    end = t + 1 + HOLD

    for name in ("LinkDown", "LinkDegraded"):
        statuses = [e.status for e in out if e.alert == name]
        # Strictly firing, resolved, firing, resolved... and everything ends resolved.
        assert statuses == ["firing", "resolved"] * (len(statuses) // 2)
        # Every firing/resolved pair needs a clear period of hold_down: a flap storm is
        # bounded by elapsed time, not by the number of state changes.
        assert len(statuses) // 2 <= 1 + end / HOLD
        if last == "down" and name == "LinkDown":
            assert statuses
    counts = Counter((e.alert, e.status) for e in out)
    assert counts[("LinkDown", "firing")] <= 1 + sum(1 for _, n in steps if n == "down")
    assert s.firing == frozenset()
