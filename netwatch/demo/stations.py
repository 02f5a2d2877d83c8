"""Simulated ID-card issuing stations for ``netwatch demo``: each posts numbered citizen
applications through the station proxy and remembers what it was told, so the demo can
prove at the end that every acknowledged request reached the database exactly once."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(slots=True)
class Sent:
    station: str
    seq: int
    key: str
    status: int
    ticket: str | None


class StationFleet:
    def __init__(self, proxy_url: str, stations: int, *, seed: int = 0, pace: float = 0.4) -> None:
        self.proxy_url = proxy_url.rstrip("/")
        self.stations = [f"counter-{i + 1}" for i in range(stations)]
        self.pace = pace
        self.sent: list[Sent] = []
        self.counts: Counter[str] = Counter(sent=0, forwarded=0, queued=0, refused=0, rejected=0)
        self._rng = random.Random(seed)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session, asyncio.TaskGroup() as tg:
            for station in self.stations:
                tg.create_task(self._station(session, station))

    async def _station(self, session: aiohttp.ClientSession, station: str) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            await self._send(session, station, seq)
            try:
                await asyncio.wait_for(self._stop.wait(), self.pace * (0.5 + self._rng.random()))
            except TimeoutError:
                continue

    async def _send(self, session: aiohttp.ClientSession, station: str, seq: int) -> None:
        key = f"{station}-{seq:06d}"
        body = {
            "station": station,
            "seq": seq,
            "citizen_id": f"0790{self._rng.randrange(10**8):08d}",
            "kind": "chip-id-card",
            # One in forty is incomplete on purpose: the database refuses it (a dead letter
            # when it was queued), which the summary reports instead of hiding.
            "invalid": self._rng.random() < 0.025,
        }
        headers = {"Idempotency-Key": key, "Netwatch-Order-Key": station}
        self.counts["sent"] += 1
        try:
            async with session.post(
                f"{self.proxy_url}/api/applications", json=body, headers=headers
            ) as resp:
                status = resp.status
                ticket = resp.headers.get("Netwatch-Ticket")
                await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            status, ticket = 0, None
        if status == 202 and ticket:
            self.counts["queued"] += 1
        elif 200 <= status < 300:
            self.counts["forwarded"] += 1
        elif 400 <= status < 500:
            self.counts["rejected"] += 1
        else:
            self.counts["refused"] += 1
        self.sent.append(Sent(station, seq, key, status, ticket))

    async def reconcile(self, applied: list[dict[str, Any]]) -> dict[str, int]:
        """Compare what stations were told with what the database applied."""
        applied_keys = Counter(str(a.get("idempotency_key")) for a in applied)
        dead = lost = replayed = 0
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for s in self.sent:
                if s.status == 202 and s.ticket:
                    if applied_keys[s.key]:
                        replayed += 1
                        continue
                    state = await self._ticket_state(session, s.ticket)
                    if state == "dead":
                        dead += 1
                    else:
                        lost += 1
                elif 200 <= s.status < 300 and not applied_keys[s.key]:
                    lost += 1
        duplicates = sum(n - 1 for n in applied_keys.values() if n > 1)
        return {**self.counts, "replayed": replayed, "dead": dead, "lost": lost + duplicates}

    async def _ticket_state(self, session: aiohttp.ClientSession, ticket: str) -> str | None:
        try:
            async with session.get(f"{self.proxy_url}/_netwatch/tickets/{ticket}") as resp:
                if resp.status != 200:
                    return None
                data = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        state = data.get("state")
        return state if isinstance(state, str) else None
