"""A stateful property test of the proxy's promise: per-order-key order and exactly-once.

Hypothesis interleaves station writes on a few order keys, link flips, upstream refusals
(dead letters), an operator's ``retry`` and ``purge`` (through a second connection to the
queue file, as the ``netwatch queue`` CLI does) and proxy restarts, against a real
``StationProxy`` (real sockets, real SQLite file) and the simulator. The replay runs on its
own event loop thread, concurrently with the steps. After every step the upstream's
*receipts* are checked:

* order: a write is never received while an older write on its order key that was already
  waiting when the station sent it (queued, or put back by a retry) is still unsettled;
* exactly once: a write answered by the upstream is never received again, except once per
  proxy restart that may have cut its answer (the in-doubt case the Idempotency-Key covers);
  a write refused at the door (a direct 422) is never received again.

At the end the link comes back and every write the proxy accepted is applied, dead, or
purged by the operator: nothing dropped silently.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from helpers.servers import free_port
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)
from prometheus_client import CollectorRegistry

from netwatch.config.schema import Proxy
from netwatch.demo.simulator import Exchange, PopulationSimulator, SimulatorSettings
from netwatch.events import EventHub
from netwatch.proxy.crypto import default_key_path, load_key
from netwatch.proxy.queue import DurableQueue
from netwatch.proxy.station import StationProxy

T = TypeVar("T")
ORDER_KEYS = ("a", "b")
SETTLING = frozenset({200, 201, 422})  # answers that settle an entry (applied, or dead)


class LoopThread:
    """An event loop on its own thread: the proxy and its replay keep running between
    (and during) the synchronous steps of the state machine."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass(slots=True)
class Write:
    key: str
    order_key: str
    issued_at: float
    status: int = 0
    answered_at: float = 0.0


@dataclass(slots=True)
class Model:
    writes: dict[str, Write] = field(default_factory=dict)
    # idempotency key -> when it (re-)entered the waiting set, as (not before, not after):
    # its request and its 202, or a retry that surely put it back (its dead-letter mark
    # was seen before the retry began) and the retry's end.
    entered: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    restarts: list[float] = field(default_factory=list)
    purges: list[tuple[float, float]] = field(default_factory=list)


class RunningProxy:
    def __init__(self, settings: Proxy) -> None:
        self.proxy = StationProxy(
            settings, "q1", CollectorRegistry(), EventHub(), lambda: False, None
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self, link_up: bool) -> None:
        await self.proxy.__aenter__()
        self.proxy.set_guard("popdb", link_up)
        self.task = asyncio.get_running_loop().create_task(self.proxy.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.task
        await self.proxy.__aexit__(None, None, None)


class OrderMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="order-model-"))
        self.db = self.dir / "queue.db"
        self.lt = LoopThread()
        self.sim = PopulationSimulator(SimulatorSettings(latency_ms=1.0))
        self.lt.run(self.sim.start())
        self.settings = Proxy.model_validate(
            {
                "listen": f"127.0.0.1:{free_port()}",
                "upstream": self.sim.url,
                "guard": ["popdb"],
                "queue": {"path": str(self.db)},
                "replay": {"rate": "2000/s", "peak_rate": "2000/s", "backoff_initial": "20ms",
                           "backoff_max": "100ms"},
                "connect_timeout": "1s",
                "request_timeout": "5s",
            }
        )  # fmt: skip
        self.link_up = True
        self.model = Model()
        self.seq = 0
        try:
            self.running = self._start_proxy()
        except BaseException:
            self.lt.run(self.sim.stop())
            self.lt.close()
            raise
        self.session = self.lt.run(self._session())

    def _start_proxy(self) -> RunningProxy:
        """A proxy on a fresh port (other tests on this machine may take the last one)."""
        for attempt in range(5):
            self.settings = self.settings.model_copy(update={"listen": f"127.0.0.1:{free_port()}"})
            running = RunningProxy(self.settings)
            try:
                self.lt.run(running.start(self.link_up))
            except OSError:
                if attempt == 4:
                    raise
                continue
            return running
        raise AssertionError("unreachable")

    @staticmethod
    async def _session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    # --- rules ------------------------------------------------------------------------------

    @initialize(refused=st.integers(min_value=1, max_value=2))
    def a_replay_left_dead_letters(self, refused: int) -> None:
        """Most runs start where operators step in: an outage's backlog replayed, with the
        first ``refused`` replays refused by the upstream (dead letters)."""
        self.link_flips()
        for order_key in ORDER_KEYS:
            self.station_writes(order_key)
        self.sim.control(reject_next=refused, reject_status=422)
        self.link_flips()
        deadline = time.monotonic() + 10
        while "queued" in self._states().values():
            assert time.monotonic() < deadline, "the first backlog did not drain"
            time.sleep(0.01)

    @rule(order_key=st.sampled_from(ORDER_KEYS))
    def station_writes(self, order_key: str) -> None:
        self.seq += 1
        key = f"w{self.seq:04d}"
        write = Write(key, order_key, issued_at=time.monotonic())
        self.model.writes[key] = write
        write.status = self.lt.run(self._post(key, order_key))
        write.answered_at = time.monotonic()
        assert write.status in {201, 202, 422}, f"{key}: answered {write.status}"
        if write.status == 202:
            span = (write.issued_at, write.answered_at)
            self.model.entered.setdefault(key, []).append(span)

    async def _post(self, key: str, order_key: str) -> int:
        url = f"{self.running.proxy.url}/api/applications"
        headers = {"Idempotency-Key": key, "Netwatch-Order-Key": order_key}
        body = {"station": order_key, "seq": self.seq}
        async with self.session.post(url, json=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    @rule()
    def link_flips(self) -> None:
        self.link_up = not self.link_up
        self.sim.set_outage(not self.link_up)
        self.lt.loop.call_soon_threadsafe(self.running.proxy.set_guard, "popdb", self.link_up)

    @rule()
    def upstream_refuses_the_next_write(self) -> None:
        self.sim.control(reject_next=1, reject_status=422)

    @rule(then=st.lists(st.sampled_from(ORDER_KEYS), min_size=1, max_size=3))
    def operator_retries_dead_letters(self, then: list[str]) -> None:
        """``netwatch queue retry --all-dead`` while the station keeps posting (``then``)."""
        surely_dead = self._wait_dead_marked()
        start = time.monotonic()
        self.lt.run(self._operator(lambda q: q.retry_dead(now=time.time())))
        end = time.monotonic()
        for key in surely_dead:
            self.model.entered.setdefault(key, []).append((start, end))
        for order_key in then:
            self.station_writes(order_key)

    @rule(then=st.lists(st.sampled_from(ORDER_KEYS), min_size=1, max_size=3))
    def operator_purges_dead_letters(self, then: list[str]) -> None:
        start = time.monotonic()
        self.lt.run(self._operator(lambda q: q.purge_dead()))
        self.model.purges.append((start, time.monotonic()))
        for order_key in then:
            self.station_writes(order_key)

    @rule()
    def proxy_restarts(self) -> None:
        self.lt.run(self.running.stop())
        self.model.restarts.append(time.monotonic())
        self.running = self._start_proxy()

    @rule(seconds=st.sampled_from([0.01, 0.05, 0.2]))
    def time_passes(self, seconds: float) -> None:
        time.sleep(seconds)

    async def _operator(self, action: Any) -> None:
        # Another process, as `netwatch queue` is: with the key the proxy made beside it.
        key = load_key(default_key_path(self.db))
        opened = DurableQueue.open(self.db, max_bytes=2**62, max_age=3600.0, key=key, create=False)
        async with opened as q:
            await action(q)

    def _states(self) -> dict[str, str]:
        with sqlite3.connect(self.db) as conn:
            rows = conn.execute("SELECT idempotency_key, state FROM entries").fetchall()
        conn.close()
        return dict(rows)

    def _wait_dead_marked(self) -> set[str]:
        """Keys whose last receipt was a refusal of a queued entry, once the proxy has
        marked every one of them dead (bounded wait): a retry now surely puts them back."""
        deadline = time.monotonic() + 10
        while True:
            receipts = self.sim.exchanges
            last: dict[str, Exchange] = {}
            for r in receipts:
                if r.idempotency_key is not None:
                    last[r.idempotency_key] = r
            states = self._states()
            # A refusal answered to a proxy that was restarted before it could mark the
            # entry dead leaves it queued: nothing will mark it, so it is not waited for.
            restarted = max(self.model.restarts, default=0.0)
            refused = {
                k for k, r in last.items() if r.status == 422 and k in states and r.at > restarted
            }
            if all(states[k] == "dead" for k in refused) or time.monotonic() > deadline:
                return {k for k in refused if states[k] == "dead"}
            time.sleep(0.01)

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def order_and_exactly_once_hold(self) -> None:
        check(self.model, self.sim.exchanges)

    def teardown(self) -> None:
        try:
            if not self.link_up:
                self.link_flips()
            self.sim.control(reject_next=0)
            self._drain()
            check(self.model, self.sim.exchanges)
        finally:
            self.lt.run(self.running.stop())
            self.lt.run(self.session.close())
            self.lt.run(self.sim.stop())
            self.lt.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _drain(self) -> None:
        accepted = {k for k, w in self.model.writes.items() if w.status == 202}
        deadline = time.monotonic() + 20
        while True:
            applied = {a["idempotency_key"] for a in self.sim.applied}
            states = self._states()
            open_ = {
                k
                for k in accepted
                if k not in applied and states.get(k) not in {"dead", "delivered"}
            }
            # Gone from the file without being applied: only an operator's purge may do that.
            gone = {k for k in open_ if k not in states}
            for key in gone:
                refused = [r.at for r in self.sim.exchanges if r.idempotency_key == key]
                vanished = f"{key} vanished from the queue without being applied or purged"
                assert refused, vanished
                assert any(end > min(refused) for _, end in self.model.purges), vanished
            if not open_ - gone:
                return
            assert time.monotonic() < deadline, f"not settled: {sorted(open_ - gone)}"
            time.sleep(0.05)


def check(model: Model, receipts: list[Exchange]) -> None:
    by_key: dict[str, list[Exchange]] = {}
    for r in receipts:
        assert r.idempotency_key is not None
        by_key.setdefault(r.idempotency_key, []).append(r)
    _check_exactly_once(model, by_key)
    _check_order(model, by_key)


def _check_exactly_once(model: Model, by_key: dict[str, list[Exchange]]) -> None:
    for key, got in by_key.items():
        write = model.writes[key]
        if write.status == 422:
            assert len(got) == 1, f"{key} was refused at the door, then sent again"
        applied = [r.at for r in got if 200 <= r.status < 300]
        if not applied:
            continue
        again = [r.at for r in got if r.at > applied[0]]
        cuts = [t for t in model.restarts if t > applied[0]]
        assert len(again) <= len(cuts), (
            f"{key} received {len(again)} more times after it was applied "
            f"({len(cuts)} restarts since could explain it)"
        )


def _check_order(model: Model, by_key: dict[str, list[Exchange]]) -> None:
    for y in model.writes.values():
        y_got = by_key.get(y.key)
        if not y_got:
            continue
        first_y = y_got[0].at
        for x in model.writes.values():
            if x.key == y.key or x.order_key != y.order_key:
                continue
            x_got = by_key.get(x.key, [])
            for not_before, not_after in model.entered.get(x.key, []):
                if not_after > y.issued_at:
                    continue  # x may have entered after y was sent
                settled = [r.at for r in x_got if r.at > not_before and r.status in SETTLING]
                if settled and settled[0] <= y.issued_at:
                    continue  # x had settled before y was sent: no order between them
                overtaken = (
                    f"{y.key} reached the upstream while {x.key} (waiting on order key "
                    f"{x.order_key!r} since before {y.key} was sent) was unsettled; "
                    f"{x.key}: {x}, entered {model.entered.get(x.key)}, got {x_got}; "
                    f"{y.key}: {y}, got {y_got}; restarts {model.restarts}"
                )
                assert settled, overtaken
                assert first_y > settled[0], overtaken


TestProxyOrder = OrderMachine.TestCase
TestProxyOrder.settings = settings(
    max_examples=20,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
