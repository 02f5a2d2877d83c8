"""Durability where it lives: the writer connection's ``synchronous`` pragma, and the order of
system calls of a real ``netwatch proxy`` process seen through strace.

A SIGKILL cannot tell ``synchronous=FULL`` from ``OFF`` (the page cache survives a killed
process; only a power cut loses it), so the queue tests cannot see the difference. These can:
the first reads the pragma back on the connection that commits; the second watches the
process and proves that no ``202`` leaves it before the fsync/fdatasync of the WAL that holds
the entry its ticket names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from helpers.daemon import free_tcp_port, write_config
from helpers.servers import wait_until
from helpers.stations import proxy_config

from netwatch.proxy.queue import DurableQueue, NewEntry
from netwatch.proxy.queue_writer import Txn

STRACE = shutil.which("strace")
SQLITE_SYNCHRONOUS_FULL = 2
WRITES = 12


async def test_the_writer_connection_commits_with_synchronous_full(tmp_path: Path) -> None:
    async with DurableQueue.open(tmp_path / "q.db", max_bytes=2**30, max_age=3600) as queue:
        await queue.enqueue(NewEntry("POST", "/api/x", "", (), b"{}", "k-1"), now=time.time())

        def pragmas(txn: Txn) -> tuple[int, str]:
            sync = txn.conn.execute("PRAGMA synchronous").fetchone()[0]
            journal = txn.conn.execute("PRAGMA journal_mode").fetchone()[0]
            return sync, journal

        # Run on the writer thread's own connection: the pragma is per connection.
        sync, journal = await queue._w.submit(pragmas)
    assert (sync, journal) == (SQLITE_SYNCHRONOUS_FULL, "wal")


# --- strace -----------------------------------------------------------------------------------

# 1234 12:00:00.123456 fdatasync(7</tmp/x/queue.db-wal> <unfinished ...>
# 1234 12:00:00.123999 <... fdatasync resumed>) = 0
_CALL = re.compile(
    r"^(?P<pid>\d+)\s+\S+\s+(?P<name>\w+)\((?P<fd>\d+)<(?P<path>[^>]*)>(?P<rest>.*)$"
)
_RESUMED = re.compile(r"^(?P<pid>\d+)\s+\S+\s+<\.\.\. (?P<name>\w+) resumed>")
_TICKET = re.compile(r"Netwatch-Ticket: ([0-9a-f]{32})")
_SYNCS = {"fsync", "fdatasync"}
_WRITES = {"write", "writev", "sendto", "sendmsg"}


@dataclass
class Trace:
    """When (line number) each relevant event happened in one strace log."""

    wal_writes: dict[str, int]  # ticket -> first pwrite64 into the WAL carrying its id
    wal_syncs: list[int]  # completions of fsync/fdatasync on the WAL
    accepted: dict[str, int]  # ticket -> the write of its "HTTP/1.1 202" answer


def parse_trace(text: str, tickets: set[str]) -> Trace:
    trace = Trace({}, [], {})
    pending: dict[str, str] = {}  # pid -> the unfinished fsync's path
    for n, line in enumerate(text.splitlines()):
        if resumed := _RESUMED.match(line):
            if resumed["name"] in _SYNCS and pending.pop(resumed["pid"], "").endswith("-wal"):
                trace.wal_syncs.append(n)
            continue
        call = _CALL.match(line)
        if call is None:
            continue
        name, path, rest = call["name"], call["path"], call["rest"]
        if name in _SYNCS and path.endswith("-wal"):
            if "<unfinished" in rest:
                pending[call["pid"]] = path
            elif rest.endswith("= 0"):
                trace.wal_syncs.append(n)
        elif name == "pwrite64" and path.endswith("-wal"):
            for ticket in tickets:
                if ticket in rest:
                    trace.wal_writes.setdefault(ticket, n)
        elif name in _WRITES and "HTTP/1.1 202" in rest and (found := _TICKET.search(rest)):
            trace.accepted.setdefault(found[1], n)
    return trace


def signal_children(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the direct children of ``pid`` (strace's tracee)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(child), sig)


async def post(session: aiohttp.ClientSession, url: str, seq: int) -> tuple[int, str | None]:
    headers = {"Idempotency-Key": f"fsync-{seq}", "Netwatch-Order-Key": "st-1"}
    async with session.post(f"{url}/api/applications", json={"seq": seq}, headers=headers) as r:
        await r.read()
        return r.status, r.headers.get("Netwatch-Ticket")


async def offline(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(f"{url}/_netwatch/status") as r:
            return r.status == 200 and (await r.json())["mode"] == "offline"
    except aiohttp.ClientError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(STRACE is None, reason="strace is not installed (Debian package strace)")
async def test_no_202_leaves_the_proxy_before_the_fsync_that_covers_its_entry(
    tmp_path: Path,
) -> None:
    dead = f"http://127.0.0.1:{free_tcp_port()}"  # nothing listens: the proxy goes offline
    port = free_tcp_port()
    config = proxy_config(
        listen=f"127.0.0.1:{port}",
        upstream=dead,
        queue_path=tmp_path / "queue.db",
        guard_url=dead + "/health",
    )
    cfg = write_config(tmp_path / "proxy.yaml", config)
    trace_path = tmp_path / "strace.log"
    argv = [
        *(str(STRACE), "-f", "-y", "-tt", "-s", "8192", "-o", str(trace_path)),
        *("-e", "trace=fsync,fdatasync,pwrite64,write,writev,sendto,sendmsg"),
        *(sys.executable, "-m", "netwatch", "--log-format", "json", "proxy", "-c", str(cfg)),
    ]
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "proxy.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            await wait_until(lambda: offline(session, url), timeout=60, interval=0.2)
            answers = await asyncio.gather(*(post(session, url, n) for n in range(WRITES)))
    finally:
        # SIGTERM to strace would only detach it and leave the proxy running: stop the
        # proxy, and strace ends with it.
        signal_children(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            signal_children(proc.pid, signal.SIGKILL)
            proc.kill()
            await proc.wait()
    assert {status for status, _ in answers} == {202}, answers
    tickets = {ticket for _, ticket in answers if ticket}
    assert len(tickets) == WRITES

    trace = parse_trace(trace_path.read_text(errors="replace"), tickets)
    assert set(trace.accepted) == tickets, "every 202 was seen leaving the process"
    assert set(trace.wal_writes) == tickets, "every entry was seen written into the WAL"
    for ticket in sorted(tickets):
        written, answered = trace.wal_writes[ticket], trace.accepted[ticket]
        assert written < answered, f"{ticket}: answered 202 before its entry reached the WAL"
        covering = [n for n in trace.wal_syncs if written < n < answered]
        assert covering, f"{ticket}: answered 202 before the WAL holding it was fsynced"
