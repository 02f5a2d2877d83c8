"""Wall clock steps under a real ``netwatch proxy`` process (libfaketime, Debian `faketime`).

The proxy runs with libfaketime preloaded, its wall clock read from a timestamp file the test
rewrites (``FAKETIME_NO_CACHE=1``), and its monotonic clock left alone
(``FAKETIME_DONT_FAKE_MONOTONIC=1``): exactly what an NTP step or an operator's ``date -s``
does to a running machine. The simulator and the test keep the real clock.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers.daemon import eventually, free_tcp_port
from helpers.stations import ProxyProcess, proxy_config

from netwatch.demo.simulator import PopulationSimulator
from netwatch.proxy.queue import DurableQueue, NewEntry

pytestmark = pytest.mark.slow


def _libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    assert found, "libfaketime is missing: apt-get install faketime (Makefile APT_PACKAGES)"
    return found[0]


class SteppedProxy:
    """A proxy process whose wall clock the test steps."""

    def __init__(self, tmp_path: Path, sim: PopulationSimulator, **proxy: Any) -> None:
        self.offset_file = tmp_path / "faketime"
        self.offset_file.write_text("+0\n")
        config = proxy_config(
            listen=f"127.0.0.1:{free_tcp_port()}",
            upstream=sim.url,
            queue_path=tmp_path / "queue.db",
            guard_url=f"{sim.url}/health",
        )
        config["proxy"].update(proxy)
        env = {
            "LD_PRELOAD": _libfaketime(),
            "FAKETIME_TIMESTAMP_FILE": str(self.offset_file),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
        self.process = ProxyProcess(tmp_path, config, env=env)
        self.url = self.process.url

    async def start_online(self) -> None:
        self.process.start()
        await self.process.wait_ready()
        await eventually(lambda: self.mode_is("online"), 20, "online")

    async def cut(self, sim: PopulationSimulator) -> None:
        """An outage the guard probe sees: the proxy goes offline."""
        sim.set_outage(True)
        await eventually(lambda: self.mode_is("offline"), 20, "offline (guard down)")

    def step_to(self, offset: str) -> None:
        """Set the wall clock's offset from real time, e.g. ``-3600`` or ``+7200``.

        Written aside and renamed into place: libfaketime reads the file on every clock
        call (``FAKETIME_NO_CACHE``) and must never see it truncated and half written."""
        staged = self.offset_file.with_suffix(".new")
        staged.write_text(f"{offset}\n")
        staged.replace(self.offset_file)

    async def mode_is(self, *modes: str) -> bool:
        status = await self.process.status()
        return status is not None and status["mode"] in modes

    async def ticket(self, ticket: str) -> dict[str, Any]:
        _, body = await self.process.get_json(f"/_netwatch/tickets/{ticket}")
        assert isinstance(body, dict)
        return body

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.process.log_events() if e.get("event") == name]

    async def post(self, session: aiohttp.ClientSession, seq: int) -> tuple[int, str]:
        """One station write; no answer in 10 s fails with the proxy's own log."""
        body = {"station": "s1", "seq": seq}
        try:
            async with session.post(
                f"{self.url}/api/applications",
                json=body,
                headers={"Netwatch-Order-Key": "s1"},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                await resp.read()
                return resp.status, resp.headers.get("Netwatch-Ticket", "")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise AssertionError(
                f"write {seq} got no answer ({exc!r}); the proxy's log:\n"
                + self.process.log_tail(80)
            ) from exc


async def test_wall_clock_stepped_back_an_hour_neither_freezes_a_retry_nor_the_hold(
    tmp_path: Path,
) -> None:
    async with PopulationSimulator() as sim, aiohttp.ClientSession() as session:
        proxy = SteppedProxy(
            tmp_path, sim, replay={"rate": "50/s", "peak_rate": "50/s",
                                   "backoff_initial": "3s", "backoff_max": "4s"}
        )  # fmt: skip
        try:
            await proxy.start_online()
            # 1. A retry wait: queued in an outage, then refused once (503) on replay.
            await proxy.cut(sim)
            status, first = await proxy.post(session, 1)
            assert status == 202
            sim.control(reject_next=1, reject_status=503)
            sim.set_outage(False)

            async def replay_refused() -> bool:
                return any(r.status == 503 for r in sim.exchanges)

            await eventually(replay_refused, 20, "the replay refused once")
            proxy.step_to("-3600")  # during the retry wait (1.5 s to 3 s)

            async def delivered(ticket: str) -> bool:
                return (await proxy.ticket(ticket))["state"] == "delivered"

            await eventually(lambda: delivered(first), 15, "the retried entry delivered")
            await eventually(lambda: proxy.mode_is("online"), 10, "online again")

            # 2. The passive-failure hold: a forward answered 503 sends the proxy offline
            # for 5 s while the guard still says ok; the clock steps back another hour.
            sim.control(reject_next=1, reject_status=503)
            status, second = await proxy.post(session, 2)
            assert status == 202
            assert await proxy.mode_is("offline")
            proxy.step_to("-7200")
            await eventually(lambda: delivered(second), 20, "delivered after the hold")
            await eventually(lambda: proxy.mode_is("online"), 10, "online after the hold")
            steps = proxy.events("wall_clock_stepped")
            assert [round(e["step_s"] / 3600) for e in steps] == [-1, -1]
            assert [a["station_seq"] for a in sim.applied] == [1, 2]
        finally:
            proxy.process.stop()


async def test_wall_clock_stepped_forward_two_hours_expires_nothing(tmp_path: Path) -> None:
    async with PopulationSimulator() as sim, aiohttp.ClientSession() as session:
        proxy = SteppedProxy(tmp_path, sim, queue={"path": str(tmp_path / "q.db"), "max_age": "1h"})
        try:
            await proxy.start_online()
            await proxy.cut(sim)
            tickets = []
            for seq in range(1, 6):
                status, ticket = await proxy.post(session, seq)
                assert status == 202
                tickets.append(ticket)

            proxy.step_to("+7200")  # the entries are seconds old; max_age is one hour

            async def ages_checked() -> list[dict[str, Any]]:
                return proxy.events("proxy_ages_checked_after_step")

            checked = await eventually(ages_checked, 15, "an expiry pass after the step")
            assert checked[0]["expired"] == 0
            assert proxy.events("proxy_entries_expired") == []
            for ticket in tickets:
                assert (await proxy.ticket(ticket))["state"] == "queued"

            sim.set_outage(False)

            async def all_delivered() -> bool:
                states = [(await proxy.ticket(t))["state"] for t in tickets]
                return states == ["delivered"] * len(tickets)

            await eventually(all_delivered, 20, "the backlog delivered")
            assert [a["station_seq"] for a in sim.applied] == [1, 2, 3, 4, 5]
        finally:
            proxy.process.stop()


async def test_queue_times_follow_a_step_but_a_step_never_ages_an_entry(tmp_path: Path) -> None:
    """The two queue operations behind the rule, on a real file."""
    t0 = 1_800_000_000.0
    new = NewEntry("POST", "/api/applications", "", (), b"{}", "k1", "s1")
    async with DurableQueue.open(tmp_path / "q.db", max_bytes=2**30, max_age=3600.0) as q:
        entry, _ = await q.enqueue(new, now=t0)
        await q.mark_retry(entry.id, status=503, next_attempt_at=t0 + 3, now=t0)
        assert await q.shift_times(7200.0) == 1  # forward: nothing ages, the wait keeps 3 s
        assert await q.expire(now=t0 + 7200 + 60) == []
        [moved] = await q.ready(now=t0 + 7200 + 3, limit=10)
        assert moved.queued_at == t0 + 7200
        await q.shift_times(-7200.0)  # backward: the wait keeps 3 s, the age is not raised
        assert await q.ready(now=t0 + 2.9, limit=10) == []
        assert len(await q.ready(now=t0 + 3, limit=10)) == 1
        assert await q.expire(now=t0 + 7200 + 3599) == []
        # A restart after the clock went back an hour: times in the future count as now.
        assert await q.clamp_future(now=t0 - 3600, max_wait=4.0) == 1
        [clamped] = await q.ready(now=t0 - 3600 + 4, limit=10)
        assert clamped.queued_at == t0 - 3600
