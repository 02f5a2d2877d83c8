"""Durable queue enqueue throughput (group commit vs one commit per entry) and memory.

    .venv/bin/python bench/enqueue.py [--seconds 3] [--body 1024] [--dir DIR] [--rss-entries 100000]

Every enqueue is durable (synchronous=FULL: the WAL is fsynced before enqueue returns), so
throughput is bound by fsyncs. Run it on the disk the daemon will use (``--dir``): on a
tmpfs an fsync costs nothing and the ratio means little. Prints, for 1 and 32 concurrent
enqueuers, rows/s with group commit and with ``max_batch=1`` (one transaction, one fsync
per entry: the baseline), and the ratio; then the process RSS as the backlog grows to
``--rss-entries`` entries, to show the queue object's memory does not follow the backlog.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from netwatch.proxy.queue import DurableQueue, NewEntry

CONCURRENCY = (1, 32)


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def entry(n: int, body: bytes) -> NewEntry:
    return NewEntry(
        "POST", "/api/cards", "", (("Content-Type", "application/json"),), body, f"i-{n}", ""
    )


async def throughput(
    db: Path, *, writers: int, max_batch: int, seconds: float, body: bytes
) -> tuple[float, int]:
    """Rows per second over ``seconds`` with ``writers`` concurrent enqueue loops."""
    async with DurableQueue.open(db, max_bytes=1 << 40, max_age=1e9, max_batch=max_batch) as q:
        done = 0
        deadline = time.perf_counter() + seconds

        async def writer() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await q.enqueue(entry(done, body), now=time.time())
                done += 1

        start = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        elapsed = time.perf_counter() - start
        return done / elapsed, q.commits


async def memory(db: Path, *, entries: int, body: bytes) -> None:
    checkpoints = {0, entries // 10, entries // 2, entries}
    async with DurableQueue.open(db, max_bytes=1 << 40, max_age=1e9) as q:
        print(f"\nRSS with a growing backlog ({len(body)} B bodies, 64 concurrent enqueuers)")
        print(f"{'entries':>10} {'RSS MiB':>9} {'ready() ms':>11} {'stats() ms':>11}")
        filled = 0
        while True:
            if filled in checkpoints:
                t = time.perf_counter()
                await q.ready(now=time.time(), limit=50)
                ready_ms = (time.perf_counter() - t) * 1000
                t = time.perf_counter()
                stats = await q.stats(now=time.time())
                stats_ms = (time.perf_counter() - t) * 1000
                print(f"{stats.depth:>10} {rss_mib():>9.1f} {ready_ms:>11.2f} {stats_ms:>11.2f}")
            if filled >= entries:
                break
            step = min(64, entries - filled, *(c - filled for c in checkpoints if c > filled))
            await asyncio.gather(*(q.enqueue(entry(i, body), now=time.time()) for i in range(step)))
            filled += step
        print(f"on disk: {stats.bytes / 1024**2:.1f} MiB, accounted: {stats.accounted_bytes:,} B")


async def main(args: argparse.Namespace) -> None:
    body = b"x" * args.body
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nw-bench-") as tmp:
        print(f"files in {tmp}, {args.body} B bodies, {args.seconds:g} s per run")
        print(f"{'enqueuers':>9} {'mode':>14} {'rows/s':>10} {'commits':>8} {'rows/commit':>12}")
        results: dict[tuple[int, int], float] = {}
        for writers in CONCURRENCY:
            for name, max_batch in (("one-per-entry", 1), ("group", 1024)):
                db = Path(tmp) / f"{name}-{writers}.db"
                rate, commits = await throughput(
                    db, writers=writers, max_batch=max_batch, seconds=args.seconds, body=body
                )
                results[writers, max_batch] = rate
                rows = rate * args.seconds
                print(
                    f"{writers:>9} {name:>14} {rate:>10,.0f} {commits:>8}"
                    f" {rows / max(commits, 1):>12.1f}"
                )
        for writers in CONCURRENCY:
            ratio = results[writers, 1024] / results[writers, 1]
            print(f"group commit / one-per-entry at {writers} enqueuers: x{ratio:.1f}")
        await memory(Path(tmp) / "rss.db", entries=args.rss_entries, body=body)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--body", type=int, default=1024, help="body size in bytes")
    parser.add_argument("--dir", default=None, help="where the queue files go")
    parser.add_argument("--rss-entries", type=int, default=100_000)
    asyncio.run(main(parser.parse_args()))
