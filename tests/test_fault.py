"""The site-fault machine, with events only: a table of cases, then properties (hypothesis)."""

from __future__ import annotations

import typing
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netwatch.config.schema import Role as ConfigRole
from netwatch.monitor import fault
from netwatch.monitor.fault import Domain, judge, step

ROLES = [r.value for r in fault.Role]
STATES = ["up", "degraded", "down", "unknown"]
INNER_FIRST = [(role.value, domain) for role, domain in fault.LAYERS]
T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)


def links(**by_role: str) -> list[tuple[str, str, str]]:
    """One target per named role: ``links(gateway="up", isp="down")``."""
    return [(f"{role}-1", role, state) for role, state in by_role.items()]


@pytest.mark.parametrize(
    ("case", "expected_fault", "expected_degraded"),
    [
        ({"gateway": "up", "isp": "up", "core": "up", "service": "up"}, "none", "none"),
        ({"gateway": "down", "isp": "down", "core": "down", "service": "down"}, "lan", "lan"),
        ({"gateway": "up", "isp": "down", "core": "down", "service": "down"}, "isp", "isp"),
        ({"gateway": "up", "isp": "up", "core": "down", "service": "down"}, "core", "core"),
        ({"gateway": "up", "isp": "up", "core": "up", "service": "down"}, "service", "service"),
        # Degraded is not a fault, but it is named on its own.
        ({"gateway": "up", "isp": "degraded", "service": "down"}, "service", "isp"),
        ({"gateway": "degraded", "service": "up"}, "none", "lan"),
        # Unknown (no verdict yet) and absent layers are skipped.
        ({"gateway": "unknown", "isp": "down", "service": "down"}, "isp", "isp"),
        ({"service": "down"}, "service", "service"),
        ({"gateway": "unknown", "service": "unknown"}, "none", "none"),
        ({}, "none", "none"),
    ],
)
def test_the_verdict_table(
    case: dict[str, str], expected_fault: str, expected_degraded: str
) -> None:
    verdict = judge(links(**case))
    assert (verdict.fault.value, verdict.degraded.value) == (expected_fault, expected_degraded)


def test_one_down_target_fails_its_layer_and_is_named() -> None:
    verdict = judge(
        [
            ("gw-a", "gateway", "up"),
            ("edge-a", "isp", "up"),
            ("edge-b", "isp", "down"),
            ("api", "service", "down"),
        ]
    )
    assert verdict.fault is Domain.ISP
    assert verdict.culprits == ("edge-b",)
    assert verdict.reason == "isp layer down: edge-b"


def test_config_roles_are_the_machine_roles() -> None:
    assert set(typing.get_args(ConfigRole)) == set(ROLES)
    assert fault.DOMAINS == ("none", "lan", "isp", "core", "service")


def test_step_reports_a_change_once_with_its_time() -> None:
    status = fault.initial(T0)
    status, effects = step(status, links(gateway="up", isp="up", service="up"), T0)
    assert effects == ()
    later = T0 + timedelta(seconds=5)
    status, effects = step(status, links(gateway="up", isp="down", service="down"), later)
    assert effects == (fault.FaultChanged(Domain.NONE, Domain.ISP, later, "isp layer down: isp-1"),)
    assert status.since == later
    # Same domain, another culprit set: no new change, the since stays.
    status, effects = step(
        status, links(gateway="up", isp="down", service="up"), later + timedelta(seconds=5)
    )
    assert effects == ()
    assert status.since == later
    status, effects = step(status, links(gateway="down", isp="down"), later + timedelta(seconds=9))
    assert [(e.old, e.new) for e in effects] == [(Domain.ISP, Domain.LAN)]


# --- properties -----------------------------------------------------------------------------

target_links = st.lists(
    st.tuples(st.sampled_from(ROLES), st.sampled_from(STATES)), max_size=12
).map(lambda pairs: [(f"t{i}", role, state) for i, (role, state) in enumerate(pairs)])


def innermost(triples: list[tuple[str, str, str]], bad: set[str]) -> str:
    """The specification, written independently of the tables."""
    for role, domain in INNER_FIRST:
        if any(r == role and s in bad for _, r, s in triples):
            return domain.value
    return "none"


@given(target_links)
def test_the_fault_is_the_innermost_layer_with_a_target_down(
    triples: list[tuple[str, str, str]],
) -> None:
    verdict = judge(triples)
    assert verdict.fault.value == innermost(triples, {"down"})
    assert verdict.degraded.value == innermost(triples, {"down", "degraded"})


@given(target_links)
def test_no_target_down_means_no_fault(triples: list[tuple[str, str, str]]) -> None:
    healed = [(t, r, "up" if s == "down" else s) for t, r, s in triples]
    assert judge(healed).fault is Domain.NONE


@given(target_links, st.randoms(use_true_random=False))
def test_the_order_of_targets_does_not_matter(
    triples: list[tuple[str, str, str]], rnd: typing.Any
) -> None:
    shuffled = list(triples)
    rnd.shuffle(shuffled)
    assert judge(shuffled) == judge(triples)


@given(target_links, st.sampled_from(ROLES))
def test_an_unknown_target_changes_nothing(triples: list[tuple[str, str, str]], role: str) -> None:
    assert judge([*triples, ("new", role, "unknown")]) == judge(triples)


@given(target_links, st.sampled_from(ROLES))
def test_a_new_failure_never_moves_the_fault_outwards(
    triples: list[tuple[str, str, str]], role: str
) -> None:
    order = [d.value for _, d in INNER_FIRST]
    before = judge(triples).fault.value
    after = judge([*triples, ("new", role, "down")]).fault.value
    assert after != "none"
    if before != "none":
        assert order.index(after) <= order.index(before)
    # The new failure decides only when it is inside the old fault.
    new_domain = {r: d.value for r, d in INNER_FIRST}[role]
    if before == "none" or order.index(new_domain) < order.index(before):
        assert after == new_domain
    else:
        assert after == before


@given(target_links)
def test_a_failure_outside_the_fault_is_explained_by_it(
    triples: list[tuple[str, str, str]],
) -> None:
    verdict = judge(triples)
    if verdict.fault is Domain.NONE:
        return
    order = [d for _, d in INNER_FIRST]
    outer_roles = [r for r, d in INNER_FIRST if order.index(d) > order.index(verdict.fault)]
    worse = [(t, r, "down" if r in outer_roles else s) for t, r, s in triples]
    assert judge(worse).fault is verdict.fault
