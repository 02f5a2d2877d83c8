"""Loopback services for the probe benchmarks, each in its own process so its CPU is not
counted against the system under test.

    python bench/_loopback.py tcp-server  --hosts 50 --ports 20 [--max-seconds 3600]
    python bench/_loopback.py http-server --hosts 10 --ports 2  [--max-seconds 3600]
    python bench/_loopback.py connect-loop --targets FILE --rate 500 --seconds 40

The servers bind every listener to port 0 on 127.x addresses (Linux routes all of 127/8 to
``lo``), so they never collide with anything else on the machine, print one JSON line with
their ``[host, port]`` list, then serve until stdin closes (the parent died or finished) or
``--max-seconds`` pass. ``connect-loop`` is the reference floor: bare ``loop.sock_connect``
to the same targets at a fixed rate; SIGUSR1 makes it print ``ok failed`` counts so the
parent can read its CPU time and probe count at the same moment.

``start()`` runs any of these from the parent and returns the process and its JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
BACKLOG = 4096
HTTP_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\nok"
)
# Second octets of the address blocks each kind uses (127.<block>.a.b).
TCP_BLOCK, HTTP_BLOCK, ICMP_BLOCK = 71, 72, 73


def address(block: int, index: int) -> str:
    """The ``index``-th host of 127.<block>.0.0/16, skipping .0 and .255."""
    return f"127.{block}.{index // 254}.{index % 254 + 1}"


def listeners(block: int, hosts: int, ports: int) -> list[socket.socket]:
    socks = []
    for h in range(hosts):
        for _ in range(ports):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address(block, h), 0))
            sock.listen(BACKLOG)
            sock.setblocking(False)
            socks.append(sock)
    return socks


def announce(socks: list[socket.socket]) -> None:
    print(json.dumps([list(s.getsockname()) for s in socks]), flush=True)


def tcp_server(hosts: int, ports: int, max_seconds: float) -> None:
    """Accept and close at once: one epoll loop over every listener, no asyncio."""
    socks = listeners(TCP_BLOCK, hosts, ports)
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ, data="stdin")
    announce(socks)
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):
                    return
                continue
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            for _ in range(64):  # drain the accept queue, bounded per wake-up
                try:
                    conn, _addr = sock.accept()
                except BlockingIOError:
                    break
                conn.close()


class _Responder(asyncio.Protocol):
    """Answer one request with 200 "ok" and close (the probes ask for a fresh connection)."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf and self.transport is not None:
            self.transport.write(HTTP_RESPONSE)
            self.transport.close()
        elif len(self.buf) > 65536 and self.transport is not None:
            self.transport.close()


async def _until_stdin_closes(max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    closed = asyncio.Event()

    def readable() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            closed.set()

    loop.add_reader(sys.stdin.fileno(), readable)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(closed.wait(), max_seconds)


async def http_server(hosts: int, ports: int, max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    socks = listeners(HTTP_BLOCK, hosts, ports)
    servers = [await loop.create_server(_Responder, sock=s, backlog=BACKLOG) for s in socks]
    announce(socks)
    await _until_stdin_closes(max_seconds)
    for server in servers:
        server.close()


async def connect_loop(targets: list[tuple[str, int]], rate: float, seconds: float) -> None:
    """Connect to ``targets`` round-robin, ``rate`` per second, evenly spread; 1 s timeout."""
    loop = asyncio.get_running_loop()
    counts = {"ok": 0, "failed": 0}
    loop.add_signal_handler(
        signal.SIGUSR1, lambda: print(counts["ok"], counts["failed"], flush=True)
    )
    sem = asyncio.Semaphore(512)
    tasks: set[asyncio.Task[None]] = set()

    async def one(addr: tuple[str, int]) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(1.0):
                await loop.sock_connect(sock, addr)
            counts["ok"] += 1
        except OSError:  # TimeoutError included
            counts["failed"] += 1
        finally:
            sock.close()
            sem.release()

    print(json.dumps({"ready": True}), flush=True)
    start = time.monotonic()
    total = int(rate * seconds)
    for i in range(total):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await sem.acquire()
        task = asyncio.create_task(one(targets[i % len(targets)]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=2.0)
    print(counts["ok"], counts["failed"], flush=True)


def start(mode: str, *args: str, timeout: float = 20.0) -> tuple[subprocess.Popen[str], object]:
    """Run a mode of this module in a child process; return it and its first JSON line."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE), mode, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise RuntimeError(f"{mode} did not start within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{mode} exited at start (code {proc.wait()})")
    return proc, json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("tcp-server", "http-server", "connect-loop"))
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--ports", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    parser.add_argument("--targets", type=Path, help="JSON list of [host, port]")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    if args.mode == "tcp-server":
        tcp_server(args.hosts, args.ports, args.max_seconds)
    elif args.mode == "http-server":
        asyncio.run(http_server(args.hosts, args.ports, args.max_seconds))
    else:
        targets = [(h, int(p)) for h, p in json.loads(args.targets.read_text())]
        asyncio.run(connect_loop(targets, args.rate, args.seconds))


if __name__ == "__main__":
    main()
