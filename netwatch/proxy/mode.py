"""The station proxy's mode as a pure, table-driven state machine: no asyncio, no I/O.

``step(state, event, now) -> (state, effects)``. The inputs only update what the machine
knows (guard links, backlog depth, operator override, the site daemon's mode, a recent
passive failure); the mode is then chosen by one ordered decision table, ``RULES``, whose
first matching row wins. Keeping the whole policy in one table makes the safety order
explicit: an operator's "offline" beats everything, a passive failure beats an operator's
"online", and nothing may answer "online" while entries wait (new writes must queue behind
a backlog, or a later write could overtake an earlier one).

A passive failure (a forward refused, reset, timed out, or answered 502/503/504) is held
for ``hold`` seconds: the guard probes may not have noticed anything, so without a hold
the next probe-less moment would flip straight back to a dead upstream. The hold ends
early when the guard reports a recovery (a real down -> ok change) or the operator forces
"online"; otherwise a ``Tick`` after it expires lets the machine try again.

Two times come in with every event: ``now`` (wall clock, timezone-aware) only stamps
``since`` for humans; ``mono`` (monotonic seconds) runs the hold, so a wall clock stepped
back an hour cannot keep the proxy offline for an hour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal

Mode = Literal["online", "offline", "replaying"]
OverrideMode = Literal["offline", "online", "auto"]
MODES: tuple[Mode, ...] = ("online", "offline", "replaying")

DEFAULT_HOLD = 5.0


# --- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GuardChanged:
    """The guard targets' link states, summed up: ok means every one is up or degraded."""

    all_ok: bool


@dataclass(frozen=True, slots=True)
class PassiveFailure:
    """A forward or replay failed on the network, or the upstream answered 502/503/504."""

    reason: str


@dataclass(frozen=True, slots=True)
class BacklogChanged:
    """Entries waiting in the durable queue (including enqueues still committing)."""

    depth: int


@dataclass(frozen=True, slots=True)
class Override:
    """Operator command: pin "offline", force "online", or return to "auto"."""

    mode: OverrideMode


@dataclass(frozen=True, slots=True)
class RemoteMode:
    """The site daemon's mode received over MQTT; None when the broker is lost."""

    mode: Mode | None


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: lets a passive-failure hold expire."""


ModeEvent = GuardChanged | PassiveFailure | BacklogChanged | Override | RemoteMode | Tick


# --- state and effects --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModeState:
    mode: Mode
    reason: str
    since: datetime
    guard_ok: bool | None = None  # None until the first guard report arrives
    depth: int = 0
    override: OverrideMode = "auto"
    remote: Mode | None = None
    suspect_until: float | None = None  # end of the passive-failure hold (monotonic)
    suspect_reason: str = ""
    hold: float = DEFAULT_HOLD


@dataclass(frozen=True, slots=True)
class ModeSwitch:
    """Effect: the mode changed (the driver publishes it as a ``ModeChanged``)."""

    mode: Mode
    old: Mode
    reason: str
    at: datetime


Rule = tuple[Callable[[ModeState], bool], Mode, Callable[[ModeState], str]]


def _const(text: str) -> Callable[[ModeState], str]:
    return lambda _s: text


# First match wins. Read top to bottom as "what must hold before anything below counts".
RULES: tuple[Rule, ...] = (
    (lambda s: s.override == "offline", "offline", _const("operator")),
    (lambda s: s.suspect_until is not None, "offline", lambda s: s.suspect_reason),
    (lambda s: s.override == "online" and s.depth > 0, "replaying", _const("operator")),
    (lambda s: s.override == "online", "online", _const("operator")),
    (lambda s: s.guard_ok is False, "offline", _const("guard down")),
    (lambda s: s.remote == "offline", "offline", _const("site daemon offline")),
    # After a restart with a backlog, wait for the guard before replaying into the unknown.
    (lambda s: s.guard_ok is None and s.depth > 0, "offline", _const("awaiting guard")),
    (lambda s: s.depth > 0, "replaying", _const("backlog")),
    (lambda _s: True, "online", _const("link ok")),
)


def decide(state: ModeState) -> tuple[Mode, str]:
    """The mode (and why) that the decision table picks for what the machine knows."""
    for matches, mode, reason in RULES:
        if matches(state):
            return mode, reason(state)
    raise AssertionError("the last rule always matches")  # pragma: no cover


def initial(now: datetime, *, depth: int = 0, hold: float = DEFAULT_HOLD) -> ModeState:
    """Start-up state: online, or offline while a backlog waits for the first guard report."""
    base = ModeState(mode="online", reason="start", since=now, depth=depth, hold=hold)
    mode, reason = decide(base)
    return replace(base, mode=mode, reason=reason)


def _clear_hold(state: ModeState) -> ModeState:
    return replace(state, suspect_until=None, suspect_reason="")


def _absorb(state: ModeState, event: ModeEvent, mono: float) -> ModeState:
    """Update what the machine knows; the mode itself is chosen afterwards by ``decide``."""
    new: ModeState
    match event:
        case GuardChanged(all_ok=ok):
            # Only a real down -> ok recovery is evidence that ends a passive-failure hold.
            recovered = ok and state.guard_ok is False
            new = replace(_clear_hold(state) if recovered else state, guard_ok=ok)
        case PassiveFailure(reason=reason):
            until = mono + state.hold
            new = replace(state, suspect_until=until, suspect_reason=f"passive: {reason}")
        case BacklogChanged(depth=depth):
            new = replace(state, depth=max(0, depth))
        case Override(mode=mode):
            new = replace(_clear_hold(state) if mode == "online" else state, override=mode)
        case RemoteMode(mode=mode):
            new = replace(state, remote=mode)
        case Tick():
            expired = state.suspect_until is not None and mono >= state.suspect_until
            new = _clear_hold(state) if expired else state
    return new


def step(
    state: ModeState, event: ModeEvent, now: datetime, *, mono: float
) -> tuple[ModeState, tuple[ModeSwitch, ...]]:
    """Apply one event at wall time ``now`` and monotonic time ``mono``: the new state and
    the effects to carry out."""
    known = _absorb(state, event, mono)
    mode, reason = decide(known)
    if mode == known.mode:
        return known, ()
    new = replace(known, mode=mode, reason=reason, since=now)
    return new, (ModeSwitch(mode=mode, old=known.mode, reason=reason, at=now),)
