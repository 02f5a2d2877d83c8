"""Replay drain rate (unthrottled) and pacing accuracy (throttled), against the simulator.

    .venv/bin/python bench/replay.py [--entries 10000] [--keys 64] [--dir DIR]

Fills a real SQLite queue with ``--entries`` writes spread over ``--keys`` order keys, then
drains it with the proxy's own Replayer and Forwarder into the population-database
simulator on loopback (no added latency), and prints entries/s; one order key is drained
too (strictly one request in flight). The drain runs once with ``dedupe: idempotency-key``
and once with a ``lookup`` rule (a clean replay: no entry is in doubt, so no lookup is
sent; what both pay is the durable attempt record, measured on its own too). Then, for a
few configured rates, replays a small backlog and prints the measured rate against the
target. Every delivery is durable (``mark_delivered`` commits with fsync), so run it on the
disk the daemon will use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

from netwatch.clock import SystemClock
from netwatch.config.schema import Lookup, LookupDedupe, Proxy, Replayable
from netwatch.demo.simulator import PopulationSimulator, SimulatorSettings
from netwatch.proxy.dedupe import strategy_for
from netwatch.proxy.forward import Forwarder
from netwatch.proxy.queue import DurableQueue, Entry, NewEntry
from netwatch.proxy.replay import Outcome, Replayer

UNTHROTTLED = 1e9
LOOKUP_RULE = Replayable(
    methods=("POST",),
    path="/api/applications*",
    dedupe=LookupDedupe(lookup=Lookup(url="/api/applications/{body.application_no}")),
)


async def fill(queue: DurableQueue, entries: int, keys: int) -> None:
    async def one(n: int) -> None:
        body = f'{{"citizen_id": "{n}", "station": "k{n % keys}", "seq": {n}}}'.encode()
        new = NewEntry(
            "POST",
            "/api/applications",
            "",
            (("Content-Type", "application/json"),),
            body,
            f"bench-{n}",
            f"k{n % keys}",
        )
        await queue.enqueue(new, now=time.time())

    # Submitted in arrival order, 256 at a time so group commit can batch them.
    for start in range(0, entries, 256):
        await asyncio.gather(*(one(n) for n in range(start, min(entries, start + 256))))


async def drain(
    sim: PopulationSimulator,
    db: Path,
    *,
    entries: int,
    keys: int,
    rate: float,
    lookup: bool = False,
) -> tuple[float, int]:
    """Seconds to deliver ``entries`` and how many were delivered."""
    settings = Proxy(upstream=sim.url, replayable=(LOOKUP_RULE,) if lookup else (Replayable(),))
    async with (
        DurableQueue.open(db, max_bytes=1 << 40, max_age=1e9) as queue,
        Forwarder(settings) as forwarder,
    ):
        await fill(queue, entries, keys)
        done = asyncio.Event()
        delivered = 0

        def on_result(_entry: Entry, outcome: Outcome, _now: float) -> None:
            nonlocal delivered
            if outcome == "delivered":
                delivered += 1
                if delivered == entries:
                    done.set()

        replayer = Replayer(
            queue,
            forwarder.replay,
            settings.replay.model_copy(update={"rate": rate, "peak_rate": rate}),
            clock=SystemClock(),
            is_peak=lambda: False,
            active=lambda: True,
            on_result=on_result,
            on_network_error=lambda _reason: None,
            poll=0.01,
            strategy=lambda e: strategy_for(settings.replayable, settings.dedupe, e.method, e.path),
            lookup=forwarder.lookup,
            settle=settings.request_timeout,
        )
        started = time.perf_counter()
        task = asyncio.get_running_loop().create_task(replayer.run())
        try:
            await asyncio.wait_for(done.wait(), timeout=max(60.0, 3 * entries / rate))
        finally:
            elapsed = time.perf_counter() - started
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return elapsed, delivered


async def attempt_record_cost(directory: Path, entries: int, batch: int) -> None:
    """The durable attempt record alone: ``mark_attempting`` of ``batch`` entries per commit
    (the replayer's unthrottled batches), and of one entry per commit (a paced replay)."""
    for size in (batch, 1):
        db = directory / f"attempts-{size}.db"
        async with DurableQueue.open(db, max_bytes=1 << 40, max_age=1e9) as queue:
            await fill(queue, entries, 64)
            ids = [e.id for e in await queue.list(limit=entries)]
            started = time.perf_counter()
            for at in range(0, len(ids), size):
                await queue.mark_attempting(ids[at : at + size], now=time.time())
            elapsed = time.perf_counter() - started
        print(
            f"  {size:>3} per commit: {len(ids)} records in {elapsed:6.2f} s"
            f" = {elapsed / len(ids) * 1e6:7.1f} us/entry"
        )


async def main(entries: int, keys: int, directory: Path) -> None:
    async with PopulationSimulator(SimulatorSettings(), host="127.0.0.1", port=0) as sim:
        print(f"replay drain, unthrottled, {entries} entries, queue in {directory}")
        deliveries = 0
        for lookup in (False, True):
            print("  dedupe: " + ("lookup (clean replay)" if lookup else "idempotency-key"))
            for n_keys, n_entries in ((keys, entries), (1, min(entries, 2000))):
                db = directory / f"drain-{n_keys}-{lookup}.db"
                elapsed, delivered = await drain(
                    sim, db, entries=n_entries, keys=n_keys, rate=UNTHROTTLED, lookup=lookup
                )
                deliveries += delivered
                print(
                    f"  {n_keys:>5} order keys: {delivered} delivered in {elapsed:6.2f} s"
                    f" = {delivered / elapsed:8.0f} entries/s"
                )
        applied = sim.applied
        unique = {a["idempotency_key"] for a in applied}
        print(f"  upstream applied {len(applied)} writes, {len(unique)} distinct keys")
        # The drains reuse the keys bench-0..; what counts is one send per delivery.
        print(f"  upstream received {len(sim.receipts)} writes for {deliveries} deliveries")
        print(f"  lookups sent: {sim.stats.lookups}")
        print("durable attempt record (one fsync per commit)")
        await attempt_record_cost(directory, min(entries, 4096), 32)

        print("throttled replay: measured rate vs configured")
        for rate in (5.0, 50.0, 200.0):
            count = int(rate * 3) + 1  # about three seconds of sending
            db = directory / f"rate-{rate:g}.db"
            elapsed, delivered = await drain(sim, db, entries=count, keys=16, rate=rate)
            # n sends at a steady rate span n - 1 intervals (the first goes at once).
            measured = (delivered - 1) / elapsed
            error = (measured - rate) / rate * 100
            print(
                f"  target {rate:6.1f}/s: {delivered} in {elapsed:5.2f} s"
                f" = {measured:7.2f}/s ({error:+.1f} %)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=64)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        asyncio.run(main(args.entries, args.keys, Path(tmp)))
