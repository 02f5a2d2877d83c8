"""The proxy mode machine, driven by events only (no sockets, no asyncio)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from netwatch.proxy.mode import (
    BacklogChanged,
    GuardChanged,
    ModeEvent,
    ModeState,
    ModeSwitch,
    Override,
    PassiveFailure,
    RemoteMode,
    Tick,
    initial,
    step,
)

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)


def run(
    state: ModeState, *events: ModeEvent, dt: float = 1.0
) -> tuple[ModeState, list[ModeSwitch]]:
    """Feed events one second apart; collect every switch."""
    switches: list[ModeSwitch] = []
    now = state.since
    for event in events:
        now += timedelta(seconds=dt)
        state, effects = step(state, event, now, mono=mono_of(now))
        switches.extend(effects)
    return state, switches


def mono_of(now: datetime) -> float:
    """A monotonic clock that runs with the wall clock (no steps) in these tests."""
    return (now - T0).total_seconds() + 1000.0


def online() -> ModeState:
    state, _ = run(initial(T0), GuardChanged(all_ok=True))
    return state


def test_starts_online_without_backlog() -> None:
    assert initial(T0).mode == "online"


def test_starts_offline_with_backlog_and_replays_once_guard_is_ok() -> None:
    state = initial(T0, depth=3)
    assert (state.mode, state.reason) == ("offline", "awaiting guard")
    state, switches = run(state, GuardChanged(all_ok=True))
    assert state.mode == "replaying"
    assert [(s.old, s.mode) for s in switches] == [("offline", "replaying")]


def test_passive_failure_goes_offline_at_once_with_reason() -> None:
    state, switches = run(online(), PassiveFailure("connect refused"))
    assert state.mode == "offline"
    assert switches[0].reason == "passive: connect refused"


def test_guard_down_goes_offline_and_recovery_with_backlog_replays() -> None:
    state, _ = run(online(), GuardChanged(all_ok=False))
    assert (state.mode, state.reason) == ("offline", "guard down")
    state, _ = run(state, BacklogChanged(4), GuardChanged(all_ok=True))
    assert state.mode == "replaying"
    state, switches = run(state, BacklogChanged(0))
    assert state.mode == "online"
    assert switches[-1].reason == "link ok"


def test_recovery_without_backlog_goes_straight_online() -> None:
    state, _ = run(online(), GuardChanged(all_ok=False), GuardChanged(all_ok=True))
    assert state.mode == "online"


def test_replaying_goes_offline_on_passive_failure_or_guard_down() -> None:
    replaying, _ = run(online(), BacklogChanged(2))
    assert replaying.mode == "replaying"
    assert run(replaying, PassiveFailure("reset"))[0].mode == "offline"
    assert run(replaying, GuardChanged(all_ok=False))[0].mode == "offline"


def test_passive_failure_holds_until_guard_recovers_or_hold_expires() -> None:
    state, _ = run(online(), BacklogChanged(1), PassiveFailure("timeout"))
    # The guard still says ok (probes saw nothing): stay offline during the hold.
    state, _ = run(state, GuardChanged(all_ok=True), Tick(), dt=1.0)
    assert state.mode == "offline"
    state, _ = run(state, Tick(), dt=state.hold)
    assert state.mode == "replaying"
    # A real down -> ok recovery ends the hold early.
    state, _ = run(state, PassiveFailure("reset"), GuardChanged(all_ok=False))
    state, _ = run(state, GuardChanged(all_ok=True), dt=0.1)
    assert state.mode == "replaying"


def test_passive_hold_runs_on_the_monotonic_clock_not_the_wall_clock() -> None:
    state, _ = run(online(), BacklogChanged(1))
    wall, mono = state.since, 5000.0
    state, _ = step(state, PassiveFailure("timeout"), wall, mono=mono)
    assert state.mode == "offline"
    # The wall clock is stepped back an hour; the hold still ends after `hold` seconds.
    stepped_back = wall - timedelta(hours=1)
    state, _ = step(state, Tick(), stepped_back, mono=mono + state.hold - 0.1)
    assert state.mode == "offline"
    state, _ = step(state, Tick(), stepped_back, mono=mono + state.hold)
    assert state.mode == "replaying"
    # ... and a wall clock stepped forward does not end it early.
    state, _ = step(state, PassiveFailure("reset"), wall, mono=mono + 10)
    state, _ = step(state, Tick(), wall + timedelta(hours=2), mono=mono + 11)
    assert state.mode == "offline"


def test_operator_offline_pins_offline_whatever_the_guard_says() -> None:
    state, switches = run(online(), Override("offline"), GuardChanged(all_ok=True))
    assert (state.mode, state.reason) == ("offline", "operator")
    assert len(switches) == 1
    state, _ = run(state, Override("auto"))
    assert state.mode == "online"


def test_operator_online_ignores_guard_but_not_passive_failure() -> None:
    state, _ = run(online(), GuardChanged(all_ok=False))
    state, _ = run(state, Override("online"))
    assert (state.mode, state.reason) == ("online", "operator")
    state, _ = run(state, BacklogChanged(2))
    assert state.mode == "replaying"
    state, _ = run(state, PassiveFailure("upstream 503"))
    assert state.mode == "offline"
    state, _ = run(state, Override("auto"), Override("online"))
    assert state.mode == "replaying"


def test_remote_offline_counts_as_guard_down_and_lost_broker_is_ignored() -> None:
    state, _ = run(online(), RemoteMode("offline"))
    assert (state.mode, state.reason) == ("offline", "site daemon offline")
    state, _ = run(state, RemoteMode(None))
    assert state.mode == "online"


def test_no_effect_when_mode_does_not_change() -> None:
    _, switches = run(online(), BacklogChanged(0), Tick(), GuardChanged(all_ok=True))
    assert switches == []


events = st.one_of(
    st.builds(GuardChanged, st.booleans()),
    st.builds(PassiveFailure, st.sampled_from(["refused", "reset", "upstream 503"])),
    st.builds(BacklogChanged, st.integers(min_value=0, max_value=5)),
    st.builds(Override, st.sampled_from(["offline", "online", "auto"])),
    st.builds(RemoteMode, st.sampled_from(["online", "offline", "replaying", None])),
    st.just(Tick()),
)


@given(
    start_depth=st.integers(min_value=0, max_value=3),
    seq=st.lists(st.tuples(events, st.floats(min_value=0.0, max_value=10.0)), max_size=40),
)
def test_never_online_while_entries_wait(
    start_depth: int, seq: list[tuple[ModeEvent, float]]
) -> None:
    state = initial(T0, depth=start_depth)
    now = T0
    assert not (state.mode == "online" and state.depth > 0)
    for event, dt in seq:
        now += timedelta(seconds=dt)
        old = state.mode
        state, effects = step(state, event, now, mono=mono_of(now))
        assert not (state.mode == "online" and state.depth > 0)
        # Effects are exactly the mode changes, and the operator's pin always wins.
        assert bool(effects) == (state.mode != old)
        if state.override == "offline":
            assert state.mode == "offline"
        if state.suspect_until is not None:
            assert state.mode == "offline"
