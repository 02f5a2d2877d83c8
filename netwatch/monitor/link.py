"""The pure link state machine: ``step(status, verdict, now, peak, th) -> (status, effects)``.

No asyncio, no clock, no I/O: time comes in as an argument and what happened goes out as
effect values, so every transition is tested with plain events (the h11 ``_state.py``
design). Every transition lives in ``TRANSITIONS``; ``step`` only reads it.

Hysteresis comes from *runs*: how many rounds in a row ended with a verdict of a kind.
Four kinds are enough for every rule:

=========  =====================  ==========================================
run        extended by            drives
=========  =====================  ==========================================
failed     FAILED                 anything -> down
not_good   FAILED, DEGRADED       up -> degraded
ok         GOOD, DEGRADED         down -> degraded (unknown -> degraded)
good       GOOD                   down/degraded -> up (unknown -> up)
=========  =====================  ==========================================

Runs are never reset by a transition: they describe the verdict history only, so a rule
such as "down after 3 failures" means exactly "the last 3 verdicts were failures".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from netwatch.config.schema import Link


class State(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"


class Verdict(StrEnum):
    """What one probe round says about the link."""

    GOOD = "good"
    DEGRADED = "degraded"
    FAILED = "failed"


class Run(StrEnum):
    """A kind of consecutive-rounds counter; the value is the ``Runs`` field name."""

    FAILED = "failed"
    NOT_GOOD = "not_good"
    OK = "ok"
    GOOD = "good"


RUN_VERDICTS: Final[Mapping[Run, frozenset[Verdict]]] = {
    Run.FAILED: frozenset({Verdict.FAILED}),
    Run.NOT_GOOD: frozenset({Verdict.FAILED, Verdict.DEGRADED}),
    Run.OK: frozenset({Verdict.GOOD, Verdict.DEGRADED}),
    Run.GOOD: frozenset({Verdict.GOOD}),
}


class Need(StrEnum):
    """How long a run a rule needs: one round, or one of the configured thresholds."""

    FIRST = "first"
    FAIL_AFTER = "fail_after"
    RECOVER_AFTER = "recover_after"


@dataclass(frozen=True, slots=True)
class Thresholds:
    fail_after: int
    recover_after: int
    degraded_latency: float  # seconds
    degraded_loss: float  # ratio 0..1

    def __post_init__(self) -> None:
        if self.fail_after < 1 or self.recover_after < 1:
            raise ValueError("fail_after and recover_after must be at least 1")

    @classmethod
    def from_config(cls, link_settings: Link) -> Thresholds:
        return cls(
            fail_after=link_settings.fail_after,
            recover_after=link_settings.recover_after,
            degraded_latency=link_settings.degraded_latency,
            degraded_loss=link_settings.degraded_loss,
        )

    def rounds(self, need: Need) -> int:
        return {
            Need.FIRST: 1,
            Need.FAIL_AFTER: self.fail_after,
            Need.RECOVER_AFTER: self.recover_after,
        }[need]


def classify(success: bool, latency: float | None, loss: float | None, th: Thresholds) -> Verdict:
    """One probe result -> a verdict. Unknown latency or loss never degrades a link."""
    if not success:
        return Verdict.FAILED
    if (latency is not None and latency > th.degraded_latency) or (
        loss is not None and loss > th.degraded_loss
    ):
        return Verdict.DEGRADED
    return Verdict.GOOD


def explain(success: bool, latency: float | None, loss: float | None, th: Thresholds) -> str:
    """Why ``classify`` did not say GOOD, for humans (``""`` when it did).

    Pass it to ``step(..., detail=...)`` so that a transition's reason names the cause,
    e.g. ``"3 consecutive rounds not good: latency 950 ms over 800 ms"``.
    """
    if not success:
        return "probe failed"
    causes = []
    if latency is not None and latency > th.degraded_latency:
        causes.append(f"latency {latency * 1000:.0f} ms over {th.degraded_latency * 1000:.0f} ms")
    if loss is not None and loss > th.degraded_loss:
        causes.append(f"loss {loss:.0%} over {th.degraded_loss:.0%}")
    return ", ".join(causes)


@dataclass(frozen=True, slots=True)
class Runs:
    """Consecutive rounds, up to the latest one, of each ``Run`` kind."""

    failed: int = 0
    not_good: int = 0
    ok: int = 0
    good: int = 0

    def of(self, run: Run) -> int:
        return int(getattr(self, run.value))

    def after(self, verdict: Verdict) -> Runs:
        return Runs(
            **{run.value: self.of(run) + 1 if verdict in RUN_VERDICTS[run] else 0 for run in Run}
        )


@dataclass(frozen=True, slots=True)
class LinkStatus:
    state: State
    since: datetime | None  # when ``state`` was entered; None while UNKNOWN
    streak_verdict: Verdict | None  # the latest verdict
    runs: Runs = field(default_factory=Runs)
    outage_since: datetime | None = None  # set exactly while DOWN
    outage_peak: bool = False  # whether the open outage began inside peak hours

    @classmethod
    def initial(cls) -> LinkStatus:
        return cls(state=State.UNKNOWN, since=None, streak_verdict=None)


@dataclass(frozen=True, slots=True)
class Transition:
    old: State
    new: State
    at: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class OutageBegan:
    at: datetime
    peak: bool


@dataclass(frozen=True, slots=True)
class OutageEnded:
    began: datetime
    at: datetime
    seconds: float
    peak: bool  # the peak flag of the outage's beginning, so counters pair up


Effect = Transition | OutageBegan | OutageEnded


@dataclass(frozen=True, slots=True)
class Rule:
    """Go to ``target`` once the latest ``run`` is at least ``need`` rounds long."""

    run: Run
    need: Need
    target: State
    reason: str  # str.format template: {n} rounds, {s} plural suffix


# The whole machine. Per state, rules are tried in order and the first that holds wins,
# which is how "failures beat merely not-good" and "all good beats ok" are expressed.
TRANSITIONS: Final[Mapping[State, tuple[Rule, ...]]] = {
    State.UNKNOWN: (
        Rule(Run.FAILED, Need.FAIL_AFTER, State.DOWN, "{n} consecutive failure{s}"),
        # Nothing is known yet, so the first success is believed at once.
        Rule(Run.GOOD, Need.FIRST, State.UP, "first round good"),
        Rule(Run.OK, Need.FIRST, State.DEGRADED, "first round degraded"),
    ),
    State.UP: (
        Rule(Run.FAILED, Need.FAIL_AFTER, State.DOWN, "{n} consecutive failure{s}"),
        Rule(Run.NOT_GOOD, Need.FAIL_AFTER, State.DEGRADED, "{n} consecutive round{s} not good"),
    ),
    State.DEGRADED: (
        Rule(Run.FAILED, Need.FAIL_AFTER, State.DOWN, "{n} consecutive failure{s}"),
        Rule(Run.GOOD, Need.RECOVER_AFTER, State.UP, "{n} consecutive good round{s}"),
    ),
    State.DOWN: (
        Rule(Run.GOOD, Need.RECOVER_AFTER, State.UP, "{n} consecutive good round{s}"),
        Rule(Run.OK, Need.RECOVER_AFTER, State.DEGRADED, "{n} consecutive ok round{s}"),
    ),
}


def _matching_rule(state: State, runs: Runs, th: Thresholds) -> Rule | None:
    for rule in TRANSITIONS[state]:
        if runs.of(rule.run) >= th.rounds(rule.need):
            return rule
    return None


def step(
    status: LinkStatus,
    verdict: Verdict,
    now: datetime,
    peak: bool,
    th: Thresholds,
    *,
    detail: str = "",
) -> tuple[LinkStatus, tuple[Effect, ...]]:
    """Feed one round's verdict; return the new status and what happened, in order.

    ``peak`` is whether ``now`` is inside peak hours (only used when an outage begins);
    ``detail`` (see ``explain``) is appended to the reason of a change towards a worse state.
    """
    runs = status.runs.after(verdict)
    rule = _matching_rule(status.state, runs, th)
    if rule is None:
        return replace(status, streak_verdict=verdict, runs=runs), ()

    n = runs.of(rule.run)
    reason = rule.reason.format(n=n, s="" if n == 1 else "s")
    if detail and rule.target in (State.DOWN, State.DEGRADED):
        reason = f"{reason}: {detail}"
    effects: list[Effect] = [Transition(status.state, rule.target, now, reason)]
    outage_since, outage_peak = status.outage_since, status.outage_peak
    if rule.target is State.DOWN:
        outage_since, outage_peak = now, peak
        effects.append(OutageBegan(at=now, peak=peak))
    elif status.outage_since is not None:
        effects.append(
            OutageEnded(
                began=status.outage_since,
                at=now,
                seconds=outage_seconds(status, now),
                peak=status.outage_peak,
            )
        )
        outage_since, outage_peak = None, False
    new_status = replace(
        status,
        state=rule.target,
        since=now,
        streak_verdict=verdict,
        runs=runs,
        outage_since=outage_since,
        outage_peak=outage_peak,
    )
    return new_status, tuple(effects)


def outage_seconds(status: LinkStatus, now: datetime) -> float:
    """Elapsed seconds of the open outage at ``now`` (0 when up, or if the clock went back)."""
    if status.outage_since is None:
        return 0.0
    return max(0.0, now.timestamp() - status.outage_since.timestamp())
