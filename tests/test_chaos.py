"""Acceptance chaos test: stations keep writing through a ``netwatch proxy`` process while
the link to the population database flaps (refused, black-holed) and the proxy itself is
SIGKILLed and restarted on the same queue file and port.

What it proves, end to end and with real processes and sockets:

- nothing a station was told is queued (202) or forwarded (2xx) is lost, and nothing is
  applied twice: every acknowledged valid write is applied exactly once upstream;
- an invalid write ends as a dead letter (or was answered 4xx directly), never applied;
- per order key, acknowledged writes are applied in the order the station sent them;
- every ticket handed out ends ``delivered`` (``dead`` for the invalid ones).

The chaos plan comes from a seeded RNG (``NETWATCH_CHAOS_SEED`` overrides the seed) and is
printed with the summary, so a failing run can be replayed with the same plan.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from helpers.daemon import eventually, free_tcp_port
from helpers.receipts import assert_received_once
from helpers.relay import FaultRelay, RelayMode
from helpers.stations import ProxyProcess, Sent, Station, proxy_config

from netwatch.demo.simulator import PopulationSimulator, SimulatorSettings

SEED = int(os.environ.get("NETWATCH_CHAOS_SEED", "20240607"))
STATIONS = 4
CHAOS_SECONDS = 24.0
KILLS = 4


@dataclass(frozen=True, slots=True)
class Step:
    at: float  # seconds after the stations started
    action: RelayMode | str  # a relay mode, or "kill"
    pause: float = 0.0  # kill: how long the proxy stays dead before it is started again


def chaos_plan(rng: random.Random, duration: float, kills: int) -> list[Step]:
    """Relay flips at random moments (never the same mode twice in a row) and ``kills``
    SIGKILLs spread over the run; nothing happens in the last second."""
    steps: list[Step] = []
    weights: dict[RelayMode, int] = {"pass": 2, "refuse": 1, "blackhole": 1}
    current: RelayMode = "pass"
    at = rng.uniform(1.0, 2.5)
    while at < duration - 1.0 and len(steps) < 40:
        modes = [m for m in weights if m != current]
        current = rng.choices(modes, weights=[weights[m] for m in modes], k=1)[0]
        steps.append(Step(round(at, 2), current))
        # Calm spells long enough to go back online and replay; faults short and sharp.
        at += rng.uniform(1.5, 4.0) if current == "pass" else rng.uniform(0.4, 2.5)
    for k in range(kills):
        at = duration * (k + 0.5) / kills + rng.uniform(-1.0, 1.0)
        steps.append(Step(round(at, 2), "kill", round(rng.uniform(0.0, 0.8), 2)))
    return sorted(steps, key=lambda s: s.at)


async def run_plan(
    plan: list[Step], relay: FaultRelay, proxy: ProxyProcess, sim: PopulationSimulator
) -> list[float]:
    """Carry the plan out; returns when each fault struck, in simulator time."""
    struck: list[float] = []
    started = time.monotonic()
    for step in plan:
        delay = started + step.at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        struck.append(sim.elapsed())
        if step.action == "kill":
            await proxy.sigkill()
            await asyncio.sleep(step.pause)
            proxy.start()
            await proxy.wait_ready()
        else:
            relay.set_mode(cast(RelayMode, step.action))
    return struck


@pytest.fixture
async def sim() -> AsyncIterator[PopulationSimulator]:
    async with PopulationSimulator(SimulatorSettings(seed=SEED), port=0) as simulator:
        yield simulator


@pytest.fixture
async def relay(sim: PopulationSimulator) -> AsyncIterator[FaultRelay]:
    async with FaultRelay("127.0.0.1", sim.port) as fault_relay:
        yield fault_relay


@pytest.fixture
def proxy(tmp_path: Path, relay: FaultRelay) -> ProxyProcess:
    config = proxy_config(
        listen=f"127.0.0.1:{free_tcp_port()}",
        upstream=relay.url,
        queue_path=tmp_path / "queue.db",
        guard_url=relay.url + "/health",
    )
    return ProxyProcess(tmp_path, config)


async def drained(proxy: ProxyProcess) -> dict[str, Any] | None:
    status = await proxy.status()
    if status is None or status["queue"] is None:
        return None
    idle = status["queue"]["depth"] == 0 and status["replay"]["in_flight"] == 0
    return status if idle and status["mode"] == "online" else None


async def ticket_states(proxy: ProxyProcess, items: list[Sent]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        assert item.ticket is not None
        code, body = await proxy.get_json(f"/_netwatch/tickets/{item.ticket}")
        out[item.key] = body if code == 200 else {"state": f"http {code}"}
    return out


def order_violations(applied: list[dict[str, Any]], acked: set[str]) -> list[str]:
    """Per station, acknowledged writes must be applied in increasing station_seq."""
    last: dict[str, int] = {}
    problems = []
    for row in applied:
        if row["idempotency_key"] not in acked:
            continue
        station, seq = row["order_key"], row["station_seq"]
        if seq <= last.get(station, 0):
            problems.append(f"{station}: #{seq} applied after #{last[station]}")
        last[station] = max(seq, last.get(station, 0))
    return problems


@pytest.mark.slow
@pytest.mark.timeout(110)
async def test_acknowledged_writes_survive_link_flaps_and_sigkills(
    sim: PopulationSimulator, relay: FaultRelay, proxy: ProxyProcess
) -> None:
    rng = random.Random(SEED)
    plan = chaos_plan(rng, CHAOS_SECONDS, KILLS)
    stations = [
        Station(f"st{i}", proxy.url, random.Random(SEED * 100 + i)) for i in range(STATIONS)
    ]
    stop = asyncio.Event()
    proxy.start()
    try:
        await proxy.wait_ready()
        async with asyncio.TaskGroup() as tg:
            for station in stations:
                tg.create_task(station.run(stop))
            struck = await run_plan(plan, relay, proxy, sim)
            relay.set_mode("pass")
            stop.set()
        status = await eventually(lambda: drained(proxy), 45.0, "the queue to drain")

        items = [item for station in stations for item in station.sent]
        queued = [item for item in items if item.outcome == "queued"]
        tickets = await ticket_states(proxy, queued)
        applied = sim.applied
        counts = Counter(row["idempotency_key"] for row in applied)
        outcomes = Counter(item.outcome for item in items)
        print(
            f"\nchaos seed={SEED} plan={[(s.at, s.action) for s in plan]}\n"
            f"sent={sum(s.attempts for s in stations)} applications={len(items)} "
            f"forwarded={outcomes['forwarded']} queued={outcomes['queued']} "
            f"rejected={outcomes['rejected']} unacked={outcomes['unacked']} "
            f"kills={proxy.kills} applied={len(applied)} dead={status['queue']['dead']} "
            f"errors={sum((s.errors for s in stations), Counter())}"
        )

        unexpected = [u for station in stations for u in station.unexpected]
        assert not unexpected, f"answers outside the contract: {unexpected[:10]}"
        assert proxy.kills >= 3
        assert outcomes["queued"] > 0, "the chaos never made the proxy queue anything"
        assert outcomes["forwarded"] > 0

        problems: list[str] = []
        for item in items:
            if not item.acknowledged:
                continue
            ticket = tickets.get(item.key, {}).get("state")
            if item.invalid:
                if counts[item.key]:
                    problems.append(f"{item.key}: invalid but applied")
                if item.outcome == "queued" and ticket != "dead":
                    problems.append(f"{item.key}: invalid, ticket {ticket} (want dead)")
                continue
            if counts[item.key] != 1:
                problems.append(f"{item.key} ({item.outcome}): applied {counts[item.key]} times")
            if item.outcome == "queued" and ticket != "delivered":
                problems.append(f"{item.key}: ticket {ticket} (want delivered)")
        assert not problems, f"{len(problems)} lost/duplicated/unsettled: {problems[:20]}"

        # The upstream de-duplicated, but the proxy must still not have sent anything
        # twice behind anyone's back: a receipt beyond the first is allowed only for a try
        # of the station's own, or for an attempt the proxy recorded in doubt (the ticket,
        # or the log line of an immediate re-send).
        receipts = sim.receipt_counts()
        resent = Counter(
            e.get("idempotency_key")
            for e in proxy.log_events()
            if e.get("event") == "upstream_resent_in_doubt"
        )
        unrecorded = []
        for item in items:
            doubts = resent[item.key] + tickets.get(item.key, {}).get("attempts_in_doubt", 0)
            if receipts.get(item.key, 0) - 1 > doubts + item.tries - 1:
                unrecorded.append(f"{item.key}: {receipts[item.key]} receipts, {doubts} in doubt")
        assert not unrecorded, f"sent again without a record: {unrecorded[:20]}"
        # And every acknowledged write was received; a second send only when the station
        # itself retried, or a kill or link fault struck between the two sends.
        assert_received_once(
            sim.receipts,
            [item.key for item in items if item.acknowledged and not item.invalid],
            resent={item.key for item in items if item.tries > 1},
            disruptions=struck,
        )

        acked = {item.key for item in items if item.acknowledged and not item.invalid}
        violations = order_violations(applied, acked)
        assert not violations, f"per-station order broken: {violations[:20]}"
        by_station: defaultdict[str, int] = defaultdict(int)
        for row in applied:
            by_station[row["order_key"]] += 1
        assert set(by_station) == {s.name for s in stations}
        failures = [e for e in proxy.log_events() if e.get("level") in {"error", "critical"}]
        assert not failures, f"the proxy logged failures: {failures[:5]}"
    finally:
        proxy.stop()
