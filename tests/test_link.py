"""The link state machine, driven by verdicts and fake clock values only (no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netwatch.config.schema import Link
from netwatch.monitor.link import (
    TRANSITIONS,
    Effect,
    LinkStatus,
    OutageBegan,
    OutageEnded,
    Runs,
    State,
    Thresholds,
    Transition,
    Verdict,
    classify,
    explain,
    outage_seconds,
    step,
)

G, D, F = Verdict.GOOD, Verdict.DEGRADED, Verdict.FAILED
UNKNOWN, UP, DEGRADED, DOWN = State.UNKNOWN, State.UP, State.DEGRADED, State.DOWN
T0 = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)
INTERVAL = timedelta(seconds=5)
# fail_after and recover_after differ so that a test shows which one a rule uses.
TH = Thresholds(fail_after=3, recover_after=2, degraded_latency=0.8, degraded_loss=0.2)


def at(i: int) -> datetime:
    """The fake clock value of round ``i``."""
    return T0 + i * INTERVAL


@dataclass
class Trace:
    status: LinkStatus
    effects: list[tuple[int, Effect]]  # (round index, effect)

    @property
    def transitions(self) -> list[tuple[int, State, State, str]]:
        return [(i, e.old, e.new, e.reason) for i, e in self.effects if isinstance(e, Transition)]

    @property
    def states(self) -> list[State]:
        return [e.new for _, e in self.effects if isinstance(e, Transition)]


def run(
    verdicts: Sequence[Verdict],
    th: Thresholds = TH,
    peaks: Sequence[bool] | None = None,
    status: LinkStatus | None = None,
) -> Trace:
    status = status or LinkStatus.initial()
    effects: list[tuple[int, Effect]] = []
    for i, verdict in enumerate(verdicts):
        peak = peaks[i] if peaks is not None else False
        status, out = step(status, verdict, at(i), peak, th)
        effects += [(i, effect) for effect in out]
    return Trace(status, effects)


# --- classify --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("success", "latency", "loss", "verdict"),
    [
        (False, None, None, F),
        (False, 0.01, 0.0, F),
        (True, 0.1, 0.0, G),
        (True, 0.8, 0.2, G),  # at the threshold is still good: only "over" degrades
        (True, 0.95, 0.0, D),
        (True, 0.1, 0.4, D),
        (True, None, None, G),  # unknown latency and loss never degrade
        (True, None, 0.21, D),
    ],
)
def test_classify(
    success: bool, latency: float | None, loss: float | None, verdict: Verdict
) -> None:
    assert classify(success, latency, loss, TH) is verdict


def test_explain_names_the_cause() -> None:
    assert explain(True, 0.1, 0.0, TH) == ""
    assert explain(False, None, None, TH) == "probe failed"
    assert explain(True, 0.95, None, TH) == "latency 950 ms over 800 ms"
    assert explain(True, 0.95, 0.5, TH) == "latency 950 ms over 800 ms, loss 50% over 20%"


def test_thresholds_from_config() -> None:
    th = Thresholds.from_config(Link(fail_after=4, recover_after=5, degraded_latency=0.5))
    assert th == Thresholds(fail_after=4, recover_after=5, degraded_latency=0.5, degraded_loss=0.2)
    with pytest.raises(ValueError, match="at least 1"):
        Thresholds(fail_after=0, recover_after=1, degraded_latency=1.0, degraded_loss=0.1)


def test_initial_status() -> None:
    status = LinkStatus.initial()
    assert status.state is UNKNOWN
    assert status.since is None
    assert status.streak_verdict is None
    assert status.runs == Runs()
    assert status.outage_since is None


def test_runs_count_consecutive_rounds_of_each_kind() -> None:
    status = run([G, G, D, F, F]).status
    assert status.streak_verdict is F
    assert status.runs == Runs(failed=2, not_good=3, ok=0, good=0)
    assert run([F, D, G, G]).status.runs == Runs(failed=0, not_good=0, ok=3, good=2)


# --- every row of the table --------------------------------------------------------------

# (from, to) -> a verdict sequence whose last round makes exactly that change, and its reason.
ROWS: dict[tuple[State, State], tuple[list[Verdict], str]] = {
    (UNKNOWN, DOWN): ([F, F, F], "3 consecutive failures"),
    (UNKNOWN, UP): ([F, F, G], "first round good"),
    (UNKNOWN, DEGRADED): ([D], "first round degraded"),
    (UP, DOWN): ([G, G, F, F, F], "3 consecutive failures"),
    (UP, DEGRADED): ([G, F, F, D], "3 consecutive rounds not good"),
    (DEGRADED, DOWN): ([D, F, F, F], "3 consecutive failures"),
    (DEGRADED, UP): ([D, G, G], "2 consecutive good rounds"),
    (DOWN, UP): ([F, F, F, G, G], "2 consecutive good rounds"),
    (DOWN, DEGRADED): ([F, F, F, G, D], "2 consecutive ok rounds"),
}


def test_the_rows_cover_the_whole_table() -> None:
    table = {(state, rule.target) for state, rules in TRANSITIONS.items() for rule in rules}
    assert table == set(ROWS)
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize(("change", "row"), ROWS.items(), ids=[f"{a}->{b}" for a, b in ROWS])
def test_table_row(change: tuple[State, State], row: tuple[list[Verdict], str]) -> None:
    verdicts, reason = row
    last = len(verdicts) - 1
    before = run(verdicts[:-1]).status
    assert before.state is change[0]
    trace = run(verdicts)
    assert trace.transitions[-1] == (last, change[0], change[1], reason)
    assert trace.status.state is change[1]
    assert trace.status.since == at(last)


@pytest.mark.parametrize(
    ("verdicts", "state"),
    [
        ([F, F], UNKNOWN),  # not yet fail_after failures, and nothing good seen
        ([G, F, F], UP),
        ([G, F, F, G, F, F], UP),  # a good round in between resets the failures
        ([G, D, D, G, D, D], UP),
        ([D, F, F, D, F, F], DEGRADED),
        ([D, G, D, G], DEGRADED),  # recovery needs recover_after good rounds in a row
        ([F, F, F, G, F, G], DOWN),
        ([F, F, F, D], DOWN),
    ],
)
def test_hysteresis_holds_the_state(verdicts: list[Verdict], state: State) -> None:
    assert run(verdicts).status.state is state


def test_down_recovers_to_degraded_unless_all_recent_rounds_were_good() -> None:
    assert run([F, F, F, D, G]).states == [DOWN, DEGRADED]
    assert run([F, F, F, D, G, G]).states == [DOWN, DEGRADED, UP]


def test_up_to_degraded_needs_not_all_failures() -> None:
    assert run([G, F, F, F]).states == [UP, DOWN]
    assert run([G, F, D, F]).states == [UP, DEGRADED]


def test_detail_is_added_to_reasons_towards_worse_states() -> None:
    status = run([G, D, D]).status
    detail = explain(True, 0.95, None, TH)
    status, effects = step(status, D, at(3), False, TH, detail=detail)
    assert effects == (
        Transition(
            UP, DEGRADED, at(3), "3 consecutive rounds not good: latency 950 ms over 800 ms"
        ),
    )
    status, effects = step(status, G, at(4), False, TH, detail="ignored when it gets better")
    status, effects = step(status, G, at(5), False, TH, detail="ignored when it gets better")
    assert effects == (Transition(DEGRADED, UP, at(5), "2 consecutive good rounds"),)


def test_fail_after_one_and_singular_reasons() -> None:
    th = Thresholds(fail_after=1, recover_after=1, degraded_latency=0.8, degraded_loss=0.2)
    trace = run([G, F, G], th)
    assert [t[3] for t in trace.transitions] == [
        "first round good",
        "1 consecutive failure",
        "1 consecutive good round",
    ]


# --- outages ----------------------------------------------------------------------------


def test_outage_began_and_ended_carry_the_peak_flag_of_the_beginning() -> None:
    verdicts = [G, F, F, F, F, G, G]
    peaks = [False, False, False, True, False, False, False]
    trace = run(verdicts, peaks=peaks)
    assert [e for _, e in trace.effects] == [
        Transition(UNKNOWN, UP, at(0), "first round good"),
        Transition(UP, DOWN, at(3), "3 consecutive failures"),
        OutageBegan(at=at(3), peak=True),
        Transition(DOWN, UP, at(6), "2 consecutive good rounds"),
        OutageEnded(began=at(3), at=at(6), seconds=15.0, peak=True),
    ]
    assert trace.status.outage_since is None
    assert trace.status.outage_peak is False


def test_going_down_from_unknown_is_an_outage() -> None:
    trace = run([F, F, F], peaks=[True, True, False])
    assert [e for _, e in trace.effects][1:] == [OutageBegan(at=at(2), peak=False)]
    assert trace.status.outage_since == at(2)


def test_leaving_down_for_degraded_ends_the_outage() -> None:
    trace = run([F, F, F, D, D])
    assert trace.effects[-1] == (4, OutageEnded(began=at(2), at=at(4), seconds=10.0, peak=False))


def test_outage_seconds() -> None:
    assert outage_seconds(LinkStatus.initial(), at(9)) == 0.0
    down = run([F, F, F]).status
    assert outage_seconds(down, at(2)) == 0.0
    assert outage_seconds(down, at(14)) == 60.0
    assert outage_seconds(down, at(0)) == 0.0  # a clock stepping back never gives negatives


# --- properties: any verdict sequence ---------------------------------------------------

ALLOWED = {"failed": {F}, "not_good": {F, D}, "ok": {G, D}, "good": {G}}


def last_all(history: Sequence[Verdict], n: int, kind: str) -> bool:
    return len(history) >= n and all(v in ALLOWED[kind] for v in history[-n:])


def reference_state(history: Sequence[Verdict], fail_after: int, recover_after: int) -> State:
    """The same rules written as a plain ladder over the verdict history."""
    state = UNKNOWN
    for i in range(1, len(history) + 1):
        seen = history[:i]
        if state is not DOWN and last_all(seen, fail_after, "failed"):
            state = DOWN
        elif state is UNKNOWN:
            state = {G: UP, D: DEGRADED, F: UNKNOWN}[seen[-1]]
        elif state is UP and last_all(seen, fail_after, "not_good"):
            state = DEGRADED
        elif state in (DEGRADED, DOWN) and last_all(seen, recover_after, "good"):
            state = UP
        elif state is DOWN and last_all(seen, recover_after, "ok"):
            state = DEGRADED
    return state


thresholds = st.builds(
    Thresholds,
    fail_after=st.integers(1, 4),
    recover_after=st.integers(1, 4),
    degraded_latency=st.just(0.8),
    degraded_loss=st.just(0.2),
)
rounds = st.lists(st.tuples(st.sampled_from(Verdict), st.booleans()), max_size=80)


@settings(max_examples=400)
@given(th=thresholds, sequence=rounds)
def test_any_verdict_sequence_respects_hysteresis(
    th: Thresholds, sequence: list[tuple[Verdict, bool]]
) -> None:
    status = LinkStatus.initial()
    history: list[Verdict] = []
    open_outage: OutageBegan | None = None
    for i, (verdict, peak) in enumerate(sequence):
        history.append(verdict)
        status, effects = step(status, verdict, at(i), peak, th)
        for effect in effects:
            if isinstance(effect, Transition):
                assert effect.old is not effect.new
                assert effect.new is not UNKNOWN
                if effect.new is DOWN:  # (a)
                    assert last_all(history, th.fail_after, "failed")
                if effect.old is DOWN:  # (b)
                    assert last_all(history, th.recover_after, "ok")
                    assert (effect.new is UP) == last_all(history, th.recover_after, "good")
                if (effect.old, effect.new) == (UP, DEGRADED):  # (c)
                    assert last_all(history, th.fail_after, "not_good")
            elif isinstance(effect, OutageBegan):  # (d)
                assert open_outage is None
                assert effect == OutageBegan(at=at(i), peak=peak)
                open_outage = effect
            else:
                assert open_outage is not None
                assert effect.began == open_outage.at
                assert effect.peak is open_outage.peak
                assert effect.seconds == (effect.at - effect.began).total_seconds() >= 0
                open_outage = None
        assert (
            (status.state is DOWN) == (open_outage is not None) == (status.outage_since is not None)
        )
        assert outage_seconds(status, at(i)) >= 0
        assert status.state is reference_state(history, th.fail_after, th.recover_after)  # (e)
