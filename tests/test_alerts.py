"""The alert machine, driven by events and explicit times only (no clock, no asyncio)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from netwatch.alerting.alerts import AlertEvent, AlertPolicy, AlertState
from netwatch.clock import FakeClock, Instant
from netwatch.events import LinkChanged, QueueStats

T0 = datetime(2026, 11, 23, 1, 0, tzinfo=UTC)  # 08:00 in Ho Chi Minh City
HOLD = 30.0
MONO0 = 5000.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def now(seconds: float) -> Instant:
    """Both clocks ``seconds`` after the start, when nobody has stepped the wall clock."""
    return Instant(at(seconds), MONO0 + seconds)


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
    [event] = s.on_link(link("down", 0), now(0))
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
    assert s.on_link(link("down", 5), now(5)) == []


def test_resolved_only_after_the_link_stays_up_for_hold_down() -> None:
    s = state()
    s.on_link(link("down", 0), now(0))
    assert s.on_link(link("up", 100, peak=False), now(100)) == []
    assert s.tick(now(100 + HOLD - 0.001)) == []
    [resolved] = s.tick(now(100 + HOLD))
    assert brief([resolved]) == [("LinkDown", "resolved", "popdb-api")]
    assert resolved.since == at(100)
    assert resolved.peak is False
    assert "lasted 1m" in resolved.summary
    assert "kéo dài 1m" in resolved.summary_vi
    assert s.tick(now(1000)) == []
    assert s.firing == frozenset()


def test_flap_within_hold_down_sends_no_resolved_and_no_second_firing() -> None:
    s = state()
    out = s.on_link(link("down", 0), now(0))
    for t in range(10, 200, 10):  # up, down, up, down... every 10 s, hold-down is 30 s
        out += s.on_link(link("up" if t % 20 else "down", t), now(t))
        out += s.tick(now(t + 5))
    assert brief(out) == [("LinkDown", "firing", "popdb-api")]
    out = s.on_link(link("up", 200), now(200)) + s.tick(now(231))
    assert brief(out) == [("LinkDown", "resolved", "popdb-api")]


def test_a_late_event_releases_an_elapsed_resolution_without_waiting_for_tick() -> None:
    s = state()
    s.on_link(link("down", 0), now(0))
    s.on_link(link("up", 10), now(10))
    out = s.on_link(link("down", 100), now(100))  # nobody called tick() in between
    assert brief(out) == [
        ("LinkDown", "resolved", "popdb-api"),
        ("LinkDown", "firing", "popdb-api"),
    ]


def test_degraded_then_down_holds_degraded_and_up_resolves_both() -> None:
    s = state()
    [degraded] = s.on_link(link("degraded", 0), now(0))
    assert degraded.alert == "LinkDegraded"
    assert "latency 950 ms, loss 25%" in degraded.summary
    assert brief(s.on_link(link("down", 10), now(10))) == [("LinkDown", "firing", "popdb-api")]
    assert s.tick(now(500)) == []  # down does not clear degraded: it is worse, not better
    s.on_link(link("up", 600), now(600))
    assert sorted(brief(s.tick(now(600 + HOLD)))) == [
        ("LinkDegraded", "resolved", "popdb-api"),
        ("LinkDown", "resolved", "popdb-api"),
    ]


def test_targets_are_independent() -> None:
    s = state()
    s.on_link(link("down", 0, target="a"), now(0))
    out = s.on_link(link("down", 1, target="b"), now(1))
    assert brief(out) == [("LinkDown", "firing", "b")]
    s.on_link(link("up", 2, target="a"), now(2))
    assert brief(s.tick(now(40))) == [("LinkDown", "resolved", "a")]
    assert s.firing == frozenset({("LinkDown", "b")})


def test_start_up_in_a_good_state_sends_nothing() -> None:
    s = state()
    assert s.on_link(link("up", 0), now(0)) == []
    assert s.tick(now(1000)) == []


def test_queue_backlog_and_dead_letters_fire_and_resolve() -> None:
    s = state()
    assert s.on_queue(queue(5, 60, 0), now(0)) == []
    [backlog] = s.on_queue(queue(42, 16 * 60, 0), now(10), peak=True)
    assert (backlog.alert, backlog.status, backlog.target) == ("QueueBacklog", "firing", "queue")
    assert backlog.since == at(10 - 16 * 60)
    assert "42 station requests queued, oldest waiting 16m during peak hours" in backlog.summary
    assert s.on_queue(queue(43, 17 * 60, 0), now(70)) == []
    [dead] = s.on_queue(queue(43, 17 * 60, 3), now(80))
    assert dead.alert == "DeadLetters"
    assert "3 queued requests failed" in dead.summary
    assert s.on_queue(queue(0, 0, 0), now(90)) == []
    assert sorted(brief(s.tick(now(90 + HOLD)))) == [
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
        out += s.on_link(link(new, t), now(t))
    last = steps[-1][1] if steps else "up"
    out += s.on_link(link("up", t + 1), now(t + 1)) + s.tick(now(t + 1 + HOLD))
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


# --- wall clock steps: hold-downs and durations run on the monotonic clock ----------------


def stepped_link(new: str, clock: FakeClock) -> LinkChanged:
    """A link change stamped, as the monitor does, with the wall clock as it reads now."""
    return LinkChanged("q1", "popdb-api", "http", "?", new, clock.now(), True, None, None, "x")


def test_wall_clock_stepped_back_an_hour_does_not_hold_the_resolution() -> None:
    clock, s = FakeClock(T0), state()
    s.on_link(stepped_link("down", clock), Instant.of(clock))
    clock.advance(90)
    s.on_link(stepped_link("up", clock), Instant.of(clock))
    cleared = clock.now()
    clock.step_wall(-3600)
    clock.advance(HOLD - 0.001)
    assert s.tick(Instant.of(clock)) == []
    clock.advance(0.001)
    [resolved] = s.tick(Instant.of(clock))
    assert resolved.status == "resolved"
    assert resolved.since == cleared  # the wall time it cleared, for humans
    assert "(lasted 1m)" in resolved.summary


def test_wall_clock_stepped_forward_does_not_cut_the_hold_down_short() -> None:
    clock, s = FakeClock(T0), state()
    s.on_link(stepped_link("down", clock), Instant.of(clock))
    clock.advance(10)
    s.on_link(stepped_link("up", clock), Instant.of(clock))
    clock.step_wall(7200)
    assert s.tick(Instant.of(clock)) == []
    clock.advance(HOLD - 0.001)
    assert s.tick(Instant.of(clock)) == []
    clock.advance(0.001)
    assert brief(s.tick(Instant.of(clock))) == [("LinkDown", "resolved", "popdb-api")]


def test_how_long_an_alert_lasted_ignores_steps_while_it_fired() -> None:
    clock, s = FakeClock(T0), state()
    s.on_link(stepped_link("down", clock), Instant.of(clock))
    clock.advance(150)
    clock.step_wall(-3600)  # the clock goes back while the link is down
    clock.advance(150)
    s.on_link(stepped_link("up", clock), Instant.of(clock))
    clock.advance(HOLD)
    [resolved] = s.tick(Instant.of(clock))
    assert "(lasted 5m)" in resolved.summary
    assert "(kéo dài 5m)" in resolved.summary_vi


def test_queue_backlog_age_is_not_taken_from_the_wall_clock() -> None:
    clock, s = FakeClock(T0), state()
    [backlog] = s.on_queue(queue(42, 16 * 60, 0), Instant.of(clock))
    assert backlog.since == T0 - timedelta(minutes=16)
    clock.step_wall(7200)
    clock.advance(60)
    s.on_queue(queue(0, 0, 0), Instant.of(clock))
    clock.advance(HOLD)
    [resolved] = s.tick(Instant.of(clock))
    assert "(lasted 17m)" in resolved.summary


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 60.0), st.floats(-7200.0, 7200.0), STATES), min_size=1, max_size=40
    )
)
def test_any_wall_steps_leave_the_alerts_of_a_sequence_unchanged(
    steps: list[tuple[float, float, str]],
) -> None:
    """Status sequence and resolution times depend on the monotonic clock only."""
    steady, stepped = FakeClock(T0), FakeClock(T0)
    a, b = state(), state()
    out_a: list[tuple[str, str, float]] = []
    out_b: list[tuple[str, str, float]] = []
    for dt, jump, new in [*steps, (1.0, 0.0, "up"), (HOLD + 1.0, 0.0, "up")]:
        for clock, machine, out in ((steady, a, out_a), (stepped, b, out_b)):
            clock.advance(dt)
            if clock is stepped:
                clock.step_wall(jump)
            events = machine.tick(Instant.of(clock))
            events += machine.on_link(stepped_link(new, clock), Instant.of(clock))
            out += [(e.alert, e.status, clock.monotonic()) for e in events]
    assert out_a == out_b
    assert a.firing == b.firing == frozenset()
