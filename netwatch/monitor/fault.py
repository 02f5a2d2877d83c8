"""The pure site-fault machine: from the link states of a site's role-tagged targets, where
along its path the fault is. No asyncio, no clock, no I/O (like ``netwatch.link``).

A site's path is a chain of layers, innermost first; each target sits on one by its
``role``, and a failing layer hides everything behind it:

==========  ==========  =====================================================
role        domain      what failing there means
==========  ==========  =====================================================
gateway     lan         the office's own network or router
isp         isp         the access provider's edge
core        core        the city / national backbone in front of the service
service     service     the population database itself (or its front end)
==========  ==========  =====================================================

How a layer reads from its targets' link states (``LAYER_CONDITION``, first match wins):

============  ===================================================================
condition     when
============  ===================================================================
down          at least one target of the layer is ``down``
degraded      none is down, at least one is ``degraded``
ok            none is down or degraded, at least one is ``up``
unknown       every target is ``unknown`` (no verdict yet), or the layer has none
============  ===================================================================

The verdict (``FAULT_RULES``): ``fault`` is the domain of the innermost layer that is
``down``, ``none`` when no layer is; ``degraded`` is the domain of the innermost layer that
is ``degraded`` or ``down``, ``none`` when none is. Unknown layers (no target, or none with
a verdict yet) are skipped: they neither fail nor clear the path. Targets without a role
are ``service``, so a config without roles gets ``service`` for any target down.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Final


class Role(StrEnum):
    GATEWAY = "gateway"
    ISP = "isp"
    CORE = "core"
    SERVICE = "service"


class Domain(StrEnum):
    NONE = "none"
    LAN = "lan"
    ISP = "isp"
    CORE = "core"
    SERVICE = "service"


class Condition(StrEnum):
    DOWN = "down"
    DEGRADED = "degraded"
    OK = "ok"
    UNKNOWN = "unknown"


# The path, innermost layer first, and the domain a failure of each layer names.
LAYERS: Final[tuple[tuple[Role, Domain], ...]] = (
    (Role.GATEWAY, Domain.LAN),
    (Role.ISP, Domain.ISP),
    (Role.CORE, Domain.CORE),
    (Role.SERVICE, Domain.SERVICE),
)

# A layer's condition: the first row whose link state at least one target has.
LAYER_CONDITION: Final[tuple[tuple[str, Condition], ...]] = (
    ("down", Condition.DOWN),
    ("degraded", Condition.DEGRADED),
    ("up", Condition.OK),
)

# Which layer conditions count for each half of the verdict.
FAULT_RULES: Final[Mapping[str, frozenset[Condition]]] = {
    "fault": frozenset({Condition.DOWN}),
    "degraded": frozenset({Condition.DOWN, Condition.DEGRADED}),
}

DOMAINS: Final[tuple[str, ...]] = tuple(d.value for d in Domain)


@dataclass(frozen=True, slots=True)
class Verdict:
    fault: Domain
    degraded: Domain
    culprits: tuple[str, ...]  # the down (else degraded) targets of the named layer

    @property
    def reason(self) -> str:
        if self.fault is Domain.NONE:
            return "no layer down"
        return f"{self.fault.value} layer down: {', '.join(self.culprits)}"


NO_FAULT: Final = Verdict(Domain.NONE, Domain.NONE, ())


def condition(states: Iterable[str]) -> Condition:
    """One layer's condition from its targets' link states."""
    seen = set(states)
    for state, cond in LAYER_CONDITION:
        if state in seen:
            return cond
    return Condition.UNKNOWN


def judge(links: Iterable[tuple[str, str, str]]) -> Verdict:
    """The verdict for ``(target, role, link state)`` triples."""
    by_role: dict[str, list[tuple[str, str]]] = {}
    for target, role, state in links:
        by_role.setdefault(role, []).append((target, state))
    found: dict[str, tuple[Domain, tuple[str, ...]]] = {}
    for role, domain in LAYERS:
        members = by_role.get(role.value, [])
        cond = condition(state for _, state in members)
        for half, counted in FAULT_RULES.items():
            if half not in found and cond in counted:
                bad = "down" if cond is Condition.DOWN else "degraded"
                found[half] = (domain, tuple(sorted(t for t, s in members if s == bad)))
    fault, culprits = found.get("fault", (Domain.NONE, ()))
    degraded, degraded_culprits = found.get("degraded", (Domain.NONE, ()))
    return Verdict(fault, degraded, culprits if fault is not Domain.NONE else degraded_culprits)


@dataclass(frozen=True, slots=True)
class FaultStatus:
    verdict: Verdict
    since: datetime  # when ``verdict.fault`` took its current value


@dataclass(frozen=True, slots=True)
class FaultChanged:
    old: Domain
    new: Domain
    at: datetime
    reason: str


def initial(now: datetime) -> FaultStatus:
    return FaultStatus(NO_FAULT, now)


def step(
    status: FaultStatus, links: Iterable[tuple[str, str, str]], now: datetime
) -> tuple[FaultStatus, tuple[FaultChanged, ...]]:
    """Re-judge after a link change; a change of the fault domain is the one effect."""
    verdict = judge(links)
    if verdict.fault is status.verdict.fault:
        return replace(status, verdict=verdict), ()
    change = FaultChanged(status.verdict.fault, verdict.fault, now, verdict.reason)
    return FaultStatus(verdict, now), (change,)
