"""Edges of the link and mode machines that mutation testing (``make mutation``) found
unguarded: each test here failed on a surviving mutant that broke a stated rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from test_proxy_mode import mono_of, online, run

from netwatch.monitor.link import Thresholds, explain
from netwatch.proxy.mode import (
    BacklogChanged,
    GuardChanged,
    ModeEvent,
    ModeSwitch,
    Override,
    PassiveFailure,
    RemoteMode,
    initial,
    step,
)

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
TH = Thresholds(fail_after=3, recover_after=3, degraded_latency=0.8, degraded_loss=0.2)


def test_explain_names_only_what_is_over_a_threshold_not_at_it() -> None:
    # "degraded: latency or loss past the thresholds" -- exactly at one is still good.
    assert explain(True, 0.8, 0.2, TH) == ""
    assert explain(True, 0.801, 0.2, TH) == "latency 801 ms over 800 ms"
    assert explain(True, 0.8, 0.21, TH) == "loss 21% over 20%"


@pytest.mark.parametrize(
    ("events", "mode", "reason"),
    [
        ([Override("offline")], "offline", "operator"),
        (
            [GuardChanged(all_ok=False), BacklogChanged(2), Override("online")],
            "replaying",
            "operator",
        ),
        ([GuardChanged(all_ok=False), Override("online")], "online", "operator"),
        ([GuardChanged(all_ok=False)], "offline", "guard down"),
        ([RemoteMode("offline")], "offline", "site daemon offline"),
        ([BacklogChanged(2)], "replaying", "backlog"),
        ([BacklogChanged(2), BacklogChanged(0)], "online", "link ok"),
    ],
)
def test_every_rule_names_its_reason(events: list[ModeEvent], mode: str, reason: str) -> None:
    # The reason is published with the mode (MQTT {site}/mode) and shown on the status page.
    state, switches = run(online(), *events)
    assert (state.mode, state.reason) == (mode, reason)
    assert (switches[-1].mode, switches[-1].reason) == (mode, reason)


def test_a_switch_says_when_it_happened() -> None:
    at = T0 + timedelta(seconds=7)
    state, effects = step(online(), PassiveFailure("reset"), at, mono=mono_of(at))
    assert effects == (
        ModeSwitch(mode="offline", old="online", reason="passive: reset", at=state.since),
    )
    assert state.since == T0 + timedelta(seconds=7)


def test_the_passive_failure_hold_is_the_one_given() -> None:
    state, _ = run(initial(T0, hold=1.5), GuardChanged(all_ok=True), PassiveFailure("reset"))
    assert state.suspect_until == mono_of(state.since) + 1.5  # the hold is monotonic


def test_only_a_forced_online_ends_a_passive_failure_hold_early() -> None:
    held, _ = run(online(), PassiveFailure("reset"))
    # "auto" or "offline" from the operator is no evidence the upstream is back.
    for command in ("auto", "offline"):
        state, _ = run(held, Override(command), Override("auto"))  # type: ignore[arg-type]
        assert (state.mode, state.reason) == ("offline", "passive: reset")
    # A forced "online" is: the operator takes the responsibility.
    state, _ = run(held, Override("online"))
    assert (state.mode, state.suspect_until) == ("online", None)
    # ... and a new passive failure after it still beats the operator's "online".
    state, _ = run(state, PassiveFailure("refused"))
    assert (state.mode, state.reason) == ("offline", "passive: refused")
