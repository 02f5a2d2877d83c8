"""Writes in doubt, end to end: a real ``netwatch proxy`` process, a real SQLite queue, the
simulator as the population database, SIGKILL.

An entry is in doubt when an attempt may have reached the upstream without a final answer.
Against an upstream that ignores ``Idempotency-Key`` (``naive``: it applies every write it
receives), each strategy must end with every acknowledged write applied exactly once, in
order per order key:

- ``lookup``: the proxy asks the upstream before any re-send;
- ``hold``: the proxy waits for an operator, who decides with ``netwatch queue resolve``
  (run here as a subprocess, after checking the database as an operator would);
- ``idempotency-key`` (an upstream that does de-duplicate): a receipt beyond the first is
  allowed only for an entry the proxy recorded in doubt.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers.daemon import eventually, free_tcp_port
from helpers.relay import FaultRelay
from helpers.stations import ProxyProcess, proxy_config

from netwatch.demo.run import LOOKUP  # {lookup: GET /api/applications/{body.application_no}}
from netwatch.demo.simulator import PopulationSimulator, SimulatorSettings

STRATEGIES: dict[str, Any] = {
    "idempotency-key": "idempotency-key",
    "lookup": LOOKUP,
    "hold": "hold",
}
QUEUE_AFTER = 0.5


class Lab:
    """The simulator behind a fault relay, a proxy process in front, and station helpers."""

    def __init__(
        self, tmp_path: Path, sim: PopulationSimulator, relay: FaultRelay, strategy: str
    ) -> None:
        self.sim = sim
        self.relay = relay
        self.strategy = strategy
        config = proxy_config(
            listen=f"127.0.0.1:{free_tcp_port()}",
            upstream=relay.url,
            queue_path=tmp_path / "queue.db",
            guard_url=f"{sim.url}/health",  # the guard sees the database, not the relay
            request_timeout="2s",
        )
        if strategy == "lookup":
            # A body lookup fits writes that carry one: the rule is for POSTs only.
            rule = {"methods": ["POST"], "path": "/api/applications*", "dedupe": LOOKUP}
            config["proxy"]["replayable"] = [rule]
        else:
            config["proxy"]["dedupe"] = STRATEGIES[strategy]
        config["proxy"]["queue_after"] = f"{int(QUEUE_AFTER * 1000)}ms"
        self.proxy = ProxyProcess(tmp_path, config)
        self.sent: dict[str, list[int]] = {}  # order key -> station seqs acknowledged
        self.tickets: dict[str, str] = {}  # application_no -> ticket
        self.resolved: list[tuple[str, str]] = []  # (ticket, --applied / --resend)

    async def post(self, session: aiohttp.ClientSession, station: str, seq: int) -> int:
        """One application, retried (same key) until acknowledged, as a counter does."""
        number = f"{station}-{seq:04d}"
        body = {"station": station, "seq": seq, "citizen_id": f"{seq:012d}"}
        body["application_no"] = number
        headers = {"Idempotency-Key": f"key-{number}", "Netwatch-Order-Key": station}
        for _ in range(100):
            try:
                async with session.post(
                    self.proxy.url + "/api/applications", json=body, headers=headers
                ) as resp:
                    await resp.read()
                    if resp.status < 500:
                        assert resp.status in {201, 202}, (resp.status, await resp.text())
                        if resp.status == 202:
                            self.tickets[number] = resp.headers["Netwatch-Ticket"]
                        self.sent.setdefault(station, []).append(seq)
                        return resp.status
            except (aiohttp.ClientError, TimeoutError):
                pass  # the proxy is being killed: try again, as a station would
            await asyncio.sleep(0.05)
        raise AssertionError(f"{number} never acknowledged")

    async def ticket(self, number: str) -> dict[str, Any]:
        code, body = await self.proxy.get_json(f"/_netwatch/tickets/{self.tickets[number]}")
        assert code == 200
        result: dict[str, Any] = body
        return result

    async def settled(self) -> dict[str, Any] | None:
        """The proxy's status once nothing waits (queued, in flight or in doubt)."""
        status = await self.proxy.status()
        if status is None or status["queue"] is None:
            return None
        queue = status["queue"]
        idle = queue["depth"] == 0 and queue["held"] == 0 and status["replay"]["in_flight"] == 0
        if not idle or status["in_doubt"] or status["backlog"]:
            return None
        # The queue figures are the last disk read (once a second): the tickets are live.
        for number in self.tickets:
            if (await self.ticket(number))["state"] not in {"delivered", "dead"}:
                return None
        return status

    async def never_silent_while_held(self, number: str) -> None:
        """A held entry shows in its ticket, the gauge, the status JSON, ``netwatch status``
        and ``netwatch queue list --in-doubt``."""

        async def held() -> bool:
            return bool((await self.ticket(number))["awaiting_operator"])

        await eventually(held, 15, "the entry held for an operator")

        async def counted() -> dict[str, Any] | None:
            status = await self.proxy.status()
            return status if status and status["queue"]["held"] == 1 else None

        status = await eventually(counted, 15, "the held entry in /_netwatch/status")
        assert status["in_doubt"] == 1
        assert await self.metric("netwatch_queue_in_doubt{") == 1
        assert await self.metric('netwatch_replay_total{outcome="held"') == 1
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "netwatch", "status", "--url", self.proxy.url),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert "1 in doubt (1 awaiting an operator)" in " ".join(out.decode().split())
        [listed] = json.loads(await self.cli("list", "--in-doubt", "--json"))
        assert (listed["ticket"], listed["state"]) == (self.tickets[number], "in_doubt")

    async def metric(self, prefix: str) -> float:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.proxy.url + "/_netwatch/metrics") as resp,
        ):
            text = await resp.text()
        return sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
        )

    async def cli(self, *args: str) -> str:
        """``netwatch queue ARGS -c CONFIG`` in a subprocess, as an operator runs it (awaited:
        the simulator in this process must keep answering meanwhile)."""
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "netwatch", "queue", *args),
            *("-c", str(self.proxy.config_path)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()

    async def operator_resolves(self) -> int:
        """What an operator does: list the entries in doubt, look each one up in the
        population database, and say whether it is there."""
        waiting = json.loads(await self.cli("list", "--in-doubt", "--json"))
        count = 0
        async with aiohttp.ClientSession() as session:
            for entry in waiting:
                if not entry["awaiting_operator"]:
                    continue
                key = entry["idempotency_key"]
                async with session.get(f"{self.sim.url}/api/applications/by-key/{key}") as resp:
                    verdict = "--applied" if resp.status == 200 else "--resend"
                out = await self.cli("resolve", entry["ticket"], verdict)
                assert entry["ticket"] in out
                self.resolved.append((entry["ticket"], verdict))
                count += 1
        return count

    async def drain(self, timeout: float = 40.0) -> dict[str, Any]:
        """Until nothing waits; under ``hold`` the operator resolves what is held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self.settled()
            if status is not None:
                return status
            if self.strategy == "hold":
                await self.operator_resolves()
            await asyncio.sleep(0.2)
        # Say why: a proxy that died (its exit status: -7 was SIGBUS) or what it reports.
        exited = self.proxy.daemon.proc.poll() if self.proxy.daemon else None
        raise AssertionError(
            f"not drained in {timeout}s: exit status {exited}, "
            f"status {await self.proxy.status()}\n{self.proxy.log_tail()}"
        )

    async def check_exactly_once(self) -> None:
        """Every acknowledged application applied once, in order per station; tickets
        delivered; and a second receipt only where the proxy recorded a doubt."""
        applied = Counter(a["body"]["application_no"] for a in self.sim.applied)
        numbers = {f"{st}-{seq:04d}" for st, seqs in self.sent.items() for seq in seqs}
        assert {n: c for n, c in applied.items() if c != 1} == {}, "applied more than once"
        assert set(applied) == numbers, "lost or unexpected applications"
        assert self.sim.stats.duplicate_applies == 0
        for station, seqs in self.sent.items():
            order = [a["station_seq"] for a in self.sim.applied if a["station"] == station]
            assert order == sorted(seqs), f"{station} applied out of order"
        receipts = self.sim.receipt_counts()
        # Recorded in doubt: in the ticket, or (an immediate re-send that is safe because
        # the upstream de-duplicates) in the proxy's log.
        resent = Counter(
            e.get("idempotency_key")
            for e in self.proxy.log_events()
            if e.get("event") == "upstream_resent_in_doubt"
        )
        for number in numbers:
            key = f"key-{number}"
            doubts = resent[key]
            if number in self.tickets:
                ticket = await self.ticket(number)
                assert ticket["state"] == "delivered", (number, ticket)
                doubts += ticket["attempts_in_doubt"]
            assert receipts[key] - 1 <= doubts, f"{number}: received {receipts[key]} times"


@pytest.fixture
async def lab(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Lab]:
    strategy: str = request.param
    # Only the idempotency-key strategy may rely on an upstream that de-duplicates.
    settings = SimulatorSettings(naive=strategy != "idempotency-key")
    async with (
        PopulationSimulator(settings) as sim,
        FaultRelay("127.0.0.1", sim.port) as relay,
    ):
        lab = Lab(tmp_path, sim, relay, strategy)
        lab.proxy.start()
        try:
            await lab.proxy.wait_ready()
            await eventually(_online(lab), 20, "the proxy online")
            yield lab
        finally:
            lab.proxy.stop()


def _online(lab: Lab) -> Any:
    async def check() -> bool:
        status = await lab.proxy.status()
        return status is not None and status["mode"] == "online"

    return check


ALL = pytest.mark.parametrize("lab", list(STRATEGIES), indirect=True)


# A gateway's 504 on a forward: for the strategies that must not simply re-send (an upstream
# that de-duplicates on Idempotency-Key makes a re-send harmless, as for "drop" above).
GATEWAY_ONLINE = [
    pytest.param(lab, "gateway-timeout", id=f"gateway-timeout-{lab}") for lab in ("lookup", "hold")
]


@pytest.mark.parametrize(
    ("lab", "fault"),
    [(lab, fault) for fault in ("drop", "stall") for lab in STRATEGIES] + GATEWAY_ONLINE,
    indirect=["lab"],
)
async def test_online_write_applied_without_an_answer_is_applied_once(lab: Lab, fault: str) -> None:
    lab.sim.control(after_apply=fault, after_apply_next=1, stall_s=QUEUE_AFTER + 2.5)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        first = await lab.post(session, "st1", 1)
        assert len(lab.sim.applied) == 1  # the upstream applied it, whatever it answered
        if lab.strategy == "idempotency-key" and fault == "drop":
            assert first == 201  # re-sent at once: the upstream answered from its key record
        else:
            assert first == 202
            ticket = await lab.ticket("st1-0001")
            assert ticket["state"] == "in_doubt"
            assert ticket["attempts_in_doubt"] == 1
        if lab.strategy == "hold":
            await lab.never_silent_while_held("st1-0001")
        # Behind it on its order key, and on another key.
        await lab.post(session, "st1", 2)
        await lab.post(session, "st2", 1)
        status = await lab.drain()
    await lab.check_exactly_once()
    if lab.strategy == "lookup":
        ticket = await lab.ticket("st1-0001")
        assert ticket["reason"] == "found by lookup"
        assert await lab.metric('netwatch_replay_total{outcome="found"') >= 1
    if lab.strategy == "hold":
        assert lab.resolved == [(lab.tickets["st1-0001"], "--applied")]
        ticket = await lab.ticket("st1-0001")
        assert ticket["reason"] == "resolved by operator: applied"
    assert status["in_doubt"] == 0


@pytest.mark.parametrize(
    ("lab", "fault"),
    [(lab, fault) for fault in ("drop", "stall") for lab in STRATEGIES]
    + [pytest.param("lookup", "bad-gateway", id="bad-gateway-lookup")],
    indirect=["lab"],
)
async def test_replay_applied_without_an_answer_is_settled_by_the_strategy(
    lab: Lab, fault: str
) -> None:
    """Offline first (refused: nothing in doubt), then the replay meets an upstream that
    applies three writes and drops the connection, stalls past request_timeout (2s), or
    answers 502 as a gateway whose origin failed after applying."""
    lab.relay.set_mode("refuse")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for seq in range(1, 7):
            for station in ("st1", "st2"):
                assert await lab.post(session, station, seq) == 202
    # Refused connections never sent a byte: nothing is in doubt yet.
    tickets = [await lab.ticket(n) for n in lab.tickets]
    assert all(t["attempts_in_doubt"] == 0 and t["state"] == "queued" for t in tickets)
    lab.sim.control(after_apply=fault, after_apply_next=3, stall_s=3.0)
    lab.relay.set_mode("pass")
    await lab.drain()
    await lab.check_exactly_once()
    doubted = [n for n in lab.tickets if (await lab.ticket(n))["attempts_in_doubt"] > 0]
    resent = [e for e in lab.proxy.log_events() if e.get("event") == "upstream_resent_in_doubt"]
    # Each write the upstream applied without answering was recorded in doubt.
    assert sum([(await lab.ticket(n))["attempts_in_doubt"] for n in doubted]) + len(resent) == 3
    if lab.strategy != "idempotency-key":
        assert not resent  # never re-sent without asking (lookup) or being told (hold)
        assert len(doubted) == 3
    reasons = Counter([(await lab.ticket(n))["reason"] for n in doubted])
    if lab.strategy == "lookup":
        assert reasons == {"found by lookup": 3}
    elif lab.strategy == "hold":
        assert reasons == {"resolved by operator: applied": 3}
        assert sorted(v for _, v in lab.resolved) == ["--applied"] * 3


@pytest.mark.slow
@pytest.mark.timeout(110)
@pytest.mark.parametrize("lab", ["lookup", "hold"], indirect=True)
async def test_sigkill_storm_during_replay_applies_nothing_twice(lab: Lab) -> None:
    """The proxy is SIGKILLed again and again while it replays into a naive upstream:
    whatever was in flight at each kill is in doubt after the restart, and settled by the
    strategy; nothing is applied twice, nothing lost, order kept per station."""
    lab.relay.set_mode("refuse")
    stations = [f"st{i}" for i in range(1, 5)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for seq in range(1, 61):
            await asyncio.gather(*(lab.post(session, st, seq) for st in stations))
    assert len(lab.tickets) == 240
    lab.sim.control(latency_ms=40, jitter_ms=20)  # so that every kill finds writes in flight
    lab.relay.set_mode("pass")
    rng = random.Random(9)
    kills = 0
    while kills < 8 and len(lab.sim.applied) < 200:
        await asyncio.sleep(rng.uniform(0.3, 0.9))
        await lab.proxy.sigkill()
        kills += 1
        lab.proxy.start()
        await lab.proxy.wait_ready()
    assert kills >= 3, "the replay ended before the storm"
    recovered = [
        e
        for e in lab.proxy.log_events()
        if e.get("event") == "proxy_attempts_in_doubt_after_restart"
    ]
    assert recovered, "no kill caught an attempt in flight"
    await lab.drain(timeout=60)
    await lab.check_exactly_once()
    assert sum(lab.sim.receipt_counts().values()) >= 240
