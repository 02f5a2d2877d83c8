"""Station proxy overhead against nginx: added latency, saturation throughput, failover.

    .venv/bin/python bench/proxy_overhead.py [--quick] [--rate 200] [--seconds 20] [--reps 4]
        [--sat-seconds 10] [--sat-reps 3] [--no-failover] [--failover-reps 3] [--baseline DIR]

One fast upstream (``bench/_upstream.py serve``, raw asyncio, its own process) is reached
three (or four) ways, all on loopback:

- direct;
- nginx as a keep-alive reverse proxy (generated config: ``worker_processes 1``,
  ``upstream { keepalive 64; }``, ``proxy_http_version 1.1``, ``Connection ""``);
- the netwatch station proxy (``netwatch proxy -c FILE``, online: its guard target is the
  upstream's ``/health``);
- with ``--baseline DIR``, a second station proxy running the ``netwatch`` package in
  ``DIR`` (an export of another commit), measured in the same run, interleaved.

Added latency: open loop at ``--rate`` req/s over 4 keep-alive connections, the paths
interleaved in ``--reps`` segments; a request's latency runs from the moment its send was
due to its last response byte, so a queue behind a slow answer counts. Added = path - direct
on the pooled samples, with the spread of the per-segment differences as the noise.
Throughput: wrk, one thread, 32 connections, closed loop, ``--sat-seconds`` per run,
interleaved, ``--sat-reps`` runs; the CPU of every process is read from /proc meanwhile.
Requests: ``POST /api/applications`` with a small JSON body (replayable: netwatch buffers it
and adds an Idempotency-Key) and ``GET /health`` (streamed).

Failover (offline mode): netwatch reaches the upstream through ``_upstream.py relay``; writes
flow at ``--failover-rate`` req/s, the link breaks (refused, or black-holed), and the table
shows the first write after the break, the worst write, the time to the first 202, and then
the 202 latency at ``--rate`` once offline. The guard and timeouts are the example config's
(``config/netwatch.example.yaml``: popdb-api every 10 s, timeout 3 s, fail_after 3,
connect_timeout 2 s, request_timeout 30 s) unless ``--quick``.

Everything shares the machine's cores with the load generators: read the figures as relative.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import _upstream
from _measure import stop

ROOT = Path(__file__).resolve().parent.parent
NETWATCH = ROOT / ".venv" / "bin" / "netwatch"
NGINX = "/usr/sbin/nginx"
NETWATCHES = ("netwatch", "baseline")  # baseline: another source tree, with --baseline
BODY = b'{"citizen_id": "079203001234", "kind": "id_card", "station": "counter-3"}'
POST_PATH = "/api/applications"
GET_PATH = "/health"
LATENCY_CONNS = 4
SAT_CONNS = 32
GOAL_P50_MS, GOAL_P99_MS, GOAL_RATIO = 0.6, 2.0, 0.2
_TICK = os.sysconf("SC_CLK_TCK")
Namespace = argparse.Namespace

NGINX_CONF = """\
worker_processes 1;
error_log {tmp}/nginx-error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    keepalive_requests 1000000;
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

NETWATCH_CONF = """\
site: {{id: bench}}
defaults: {{interval: {interval}, timeout: {timeout}}}
targets:
  - {{name: upstream-health, type: http, url: "http://127.0.0.1:{guard_port}/health",
     expect_status: [200]}}
link: {{fail_after: {fail_after}, recover_after: 1}}
proxy:
  listen: "127.0.0.1:{port}"
  upstream: "http://127.0.0.1:{upstream}"
  guard: [upstream-health]
  queue: {{path: "{tmp}/queue-{port}.db"}}
  connect_timeout: {connect_timeout}
  request_timeout: {request_timeout}
"""


def request_bytes(method: str) -> bytes:
    if method == "POST":
        return (
            f"POST {POST_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY
    return (
        f"GET {GET_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\n\r\n".encode()
    )


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its children still running (nginx's worker)."""
    total = 0.0
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / _TICK
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += cpu_seconds(int(child))
    return total


def machine_ticks() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def nginx(tmp: Path, upstream: int) -> Iterator[tuple[int, int]]:
    """nginx in front of ``upstream``; yields (port, master pid)."""
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, upstream=upstream, port=port))
    proc = subprocess.Popen(
        [NGINX, "-c", str(conf), "-p", str(tmp), "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
        stderr=(tmp / "nginx-stderr.log").open("wb"),
    )
    try:
        wait_port(port, proc)
        yield port, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(3)  # SIGQUIT: graceful shutdown
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass(frozen=True)
class Guard:
    """The netwatch timings of one run (seconds)."""

    interval: float = 2.0
    timeout: float = 1.0
    fail_after: int = 3
    connect_timeout: float = 2.0
    request_timeout: float = 30.0


def proxy_status(port: int) -> dict[str, object]:
    url = f"http://127.0.0.1:{port}/_netwatch/status"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return dict(json.loads(resp.read()))


@contextlib.contextmanager
def netwatch(
    tmp: Path,
    upstream: int,
    guard_port: int,
    guard: Guard,
    name: str,
    *,
    source: str | None = None,
) -> Iterator[tuple[int, int]]:
    """``netwatch proxy`` in front of ``upstream``, online; yields (port, pid). ``source``:
    a directory holding another ``netwatch`` package to run instead (put first on the path)."""
    port = free_port()
    conf = tmp / f"netwatch-{name}.yaml"
    conf.write_text(
        NETWATCH_CONF.format(
            tmp=tmp,
            port=port,
            upstream=upstream,
            guard_port=guard_port,
            interval=guard.interval,
            timeout=guard.timeout,
            fail_after=guard.fail_after,
            connect_timeout=guard.connect_timeout,
            request_timeout=guard.request_timeout,
        )
    )
    log = tmp / f"netwatch-{name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"PYTHONPATH": source} if source else {})}
    if source:
        # The console script must import the other tree, not this checkout's editable install.
        where = subprocess.run(
            [str(NETWATCH.with_name("python")), "-c", "import netwatch; print(netwatch.__file__)"],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if not Path(where).resolve().is_relative_to(Path(source).resolve()):
            raise RuntimeError(f"--baseline {source}: netwatch is imported from {where}")
    proc = subprocess.Popen(
        [str(NETWATCH), "proxy", "-c", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_port(port, proc, timeout=30.0)
        deadline = time.monotonic() + 2 * guard.interval + guard.timeout + 10
        while proxy_status(port).get("mode") != "online":
            if time.monotonic() > deadline or proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"netwatch proxy not online; log tail:\n{tail}")
            time.sleep(0.1)
        yield port, proc.pid
    finally:
        stop_process(proc)


@contextlib.contextmanager
def child(mode: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc, port = _upstream.start(mode, *args, "--max-seconds", "3600")
    try:
        yield proc, port
    finally:
        stop(proc)


# --- a raw HTTP/1.1 client -------------------------------------------------------------------


class _Conn(asyncio.Protocol):
    """One keep-alive client connection, one request at a time."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None or self.waiter.done():
            return
        parsed = _parse(self.buf)
        if parsed is not None:
            status, body, used = parsed
            del self.buf[:used]
            self.waiter.set_result((status, body))

    async def request(self, payload: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return await self.waiter

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()


def _parse(buf: bytearray) -> tuple[int, bytes, int] | None:
    """(status, body, bytes used) of one complete response at the start of ``buf``."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    length, chunked = 0, False
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    start = end + 4
    if not chunked:
        if len(buf) < start + length:
            return None
        return status, bytes(buf[start : start + length]), start + length
    body, pos = bytearray(), start
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        if len(buf) < eol + 2 + size + 2:
            return None
        body += buf[eol + 2 : eol + 2 + size]
        pos = eol + 2 + size + 2
        if size == 0:
            return status, bytes(body), pos


class Pool:
    """Keep-alive connections to one port, opened on demand up to ``limit``."""

    def __init__(self, port: int, limit: int) -> None:
        self.port = port
        self.limit = limit
        self.opened = 0
        self.idle: asyncio.Queue[_Conn | None] = asyncio.Queue()

    async def _open(self) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Conn, "127.0.0.1", self.port)
        return conn

    async def acquire(self) -> _Conn:
        if self.idle.empty() and self.opened < self.limit:
            self.opened += 1
            try:
                return await self._open()
            except OSError:
                self.opened -= 1
                raise
        conn = await self.idle.get()
        return conn if conn is not None else await self._open()

    def release(self, conn: _Conn) -> None:
        self.idle.put_nowait(None if conn.lost else conn)

    async def fill(self, count: int) -> None:
        conns = [await self.acquire() for _ in range(count)]
        for conn in conns:
            self.release(conn)

    def close(self) -> None:
        while not self.idle.empty():
            conn = self.idle.get_nowait()
            if conn is not None:
                conn.close()


@dataclass(frozen=True, slots=True)
class Rec:
    fired: float  # when the send was due (perf_counter)
    done: float
    status: int  # -1: connection error or timeout

    @property
    def ms(self) -> float:
        return (self.done - self.fired) * 1000


async def paced(
    pool: Pool,
    payload: bytes,
    rate: float,
    count: int,
    *,
    timeout: float = 10.0,
    until: Callable[[list[Rec]], bool] | None = None,
) -> list[Rec]:
    """Open loop: send ``count`` requests at ``rate``/s (or until ``until(recs)``)."""
    recs: list[Rec] = []

    async def one(fired: float) -> None:
        status, conn = -1, None
        try:
            async with asyncio.timeout(timeout):
                conn = await pool.acquire()
                status, _ = await conn.request(payload)
        except (OSError, TimeoutError, ValueError):
            if conn is not None:
                conn.close()
        if conn is not None:
            pool.release(conn)
        recs.append(Rec(fired, time.perf_counter(), status))

    async with asyncio.TaskGroup() as tg:
        start = time.perf_counter() + 0.005
        for i in range(count):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if until is not None and until(recs):
                break
            tg.create_task(one(time.perf_counter()))
    return recs


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


# --- added latency ---------------------------------------------------------------------------


def interleaved(paths: tuple[str, ...], rep: int) -> tuple[str, ...]:
    """The paths in the order of repetition ``rep``: each goes first in turn."""
    shift = rep % len(paths)
    return paths[shift:] + paths[:shift]


async def latency(ports: dict[str, int], args: argparse.Namespace) -> None:
    paths = tuple(ports)
    per_segment = max(1, round(args.rate * args.seconds / args.reps))
    print(
        f"\n== Added latency: open loop {args.rate:g} req/s, {LATENCY_CONNS} keep-alive"
        f" connections, {args.reps} x {per_segment / args.rate:g} s per path and method,"
        " interleaved =="
    )
    pools = {p: Pool(ports[p], LATENCY_CONNS) for p in paths}
    for pool in pools.values():
        await pool.fill(LATENCY_CONNS)
    samples: dict[tuple[str, str], list[list[Rec]]] = {}
    for method in ("POST", "GET"):
        payload = request_bytes(method)
        for path in paths:  # warm-up: connection pools upstream, code paths
            await paced(pools[path], payload, args.rate, int(args.rate))
        for rep in range(args.reps):
            for path in interleaved(paths, rep):
                recs = await paced(pools[path], payload, args.rate, per_segment)
                samples.setdefault((method, path), []).append(recs)
    for pool in pools.values():
        pool.close()

    print(
        f"{'method':<6} {'path':<9} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'errors':>6}"
        f"  {'added p50 ms [segments min..max]':>32}  {'added p99 ms [min..max]':>26}"
    )
    for method in ("POST", "GET"):
        direct = [r.ms for seg in samples[method, "direct"] for r in seg if r.status == 200]
        for path in paths:
            segs = samples[method, path]
            ok = [r.ms for seg in segs for r in seg if r.status == 200]
            errors = sum(1 for seg in segs for r in seg if r.status != 200)
            line = (
                f"{method:<6} {path:<9} {pct(ok, 50):>7.3f} {pct(ok, 99):>7.3f}"
                f" {max(ok, default=float('nan')):>7.2f} {errors:>6}"
            )
            if path != "direct":
                cells = []
                for q, goal in ((50, GOAL_P50_MS), (99, GOAL_P99_MS)):
                    added = pct(ok, q) - pct(direct, q)
                    per_seg = [
                        pct([r.ms for r in s if r.status == 200], q)
                        - pct([r.ms for r in d if r.status == 200], q)
                        for s, d in zip(segs, samples[method, "direct"], strict=True)
                    ]
                    verdict = ""
                    if path in NETWATCHES:
                        verdict = " ok" if added < goal else " MISS"
                    cells.append(
                        f"{added:+7.3f} [{min(per_seg):+.3f}..{max(per_seg):+.3f}]{verdict:>5}"
                    )
                line += f"  {cells[0]:>32}  {cells[1]:>26}"
            print(line)
    print(
        f"goals for netwatch: added p50 < {GOAL_P50_MS} ms, added p99 < {GOAL_P99_MS} ms"
        " (pooled samples; the brackets are the per-segment differences: the noise)"
    )


# --- throughput ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SatRun:
    rps: float
    errors: int
    cpu: dict[str, float]  # percent of one core, per process
    machine: float  # percent of all cores


def wrk(port: int, method: str, seconds: float, lua: Path) -> tuple[float, int]:
    path = POST_PATH if method == "POST" else GET_PATH
    cmd = ["wrk", "-t1", f"-c{SAT_CONNS}", f"-d{seconds:g}s", "--timeout", "5s"]
    if method == "POST":
        cmd += ["-s", str(lua)]
    out = subprocess.run(
        [*cmd, f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if found is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if sock:
        errors += sum(int(n) for n in sock.groups())
    return float(found.group(1)), errors


def saturate(port: int, method: str, seconds: float, lua: Path, pids: dict[str, int]) -> SatRun:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    kids_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy0, total0 = machine_ticks()
    t0 = time.perf_counter()
    rps, errors = wrk(port, method, seconds, lua)
    elapsed = time.perf_counter() - t0
    busy1, total1 = machine_ticks()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {name: (cpu_seconds(pid) - before[name]) / elapsed * 100 for name, pid in pids.items()}
    wrk_cpu = kids.ru_utime + kids.ru_stime - kids_before.ru_utime - kids_before.ru_stime
    cpu["wrk"] = wrk_cpu / elapsed * 100
    machine = (busy1 - busy0) / max(1, total1 - total0) * 100
    return SatRun(rps, errors, cpu, machine)


def throughput(ports: dict[str, int], pids: dict[str, int], tmp: Path, args: Namespace) -> None:
    if shutil.which("wrk") is None:
        print("\n== Throughput: skipped, wrk is not installed (apt-get install wrk) ==")
        return
    lua = tmp / "post.lua"
    lua.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{BODY.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    print(
        f"\n== Throughput at saturation: wrk -t1 -c{SAT_CONNS}, closed loop,"
        f" {args.sat_reps} x {args.sat_seconds:g} s per path and method, interleaved =="
    )
    paths = tuple(ports)
    runs: dict[tuple[str, str], list[SatRun]] = {}
    for method in ("POST", "GET"):
        for path in paths:  # warm-up
            wrk(ports[path], method, 1, lua)
        for rep in range(args.sat_reps):
            for path in interleaved(paths, rep):
                run = saturate(ports[path], method, args.sat_seconds, lua, pids)
                runs.setdefault((method, path), []).append(run)
    names = [*pids, "wrk"]
    header = "".join(f" {n + ' %':>11}" for n in names)
    print(f"{'method':<6} {'path':<9} {'req/s median [min..max]':>26} {'errors':>6}{header}")
    print(f"{'':<17} {'(CPU: % of one core, medians; machine: % of all cores)':>26}")
    for method in ("POST", "GET"):
        for path in paths:
            rs = runs[method, path]
            rps = [r.rps for r in rs]
            cpus = "".join(f" {statistics.median(r.cpu[n] for r in rs):>11.0f}" for n in names)
            print(
                f"{method:<6} {path:<9} {statistics.median(rps):>9,.0f}"
                f" [{min(rps):>6,.0f}..{max(rps):>6,.0f}] {sum(r.errors for r in rs):>6}{cpus}"
                f"   machine {statistics.median(r.machine for r in rs):.0f}%"
            )
        ng = statistics.median(r.rps for r in runs[method, "nginx"])
        for name in (p for p in paths if p in NETWATCHES):
            nw = statistics.median(r.rps for r in runs[method, name])
            ratios = [
                a.rps / b.rps
                for a, b in zip(runs[method, name], runs[method, "nginx"], strict=True)
            ]
            verdict = "ok" if nw / ng >= GOAL_RATIO else "MISS"
            print(
                f"{method:<6} {name}/nginx = {nw / ng:.3f} [{min(ratios):.3f}..{max(ratios):.3f}]"
                f" (goal >= {GOAL_RATIO}) {verdict}"
            )


# --- failover --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failover:
    first_ms: float  # latency of the first write sent after the break
    first_status: int
    worst_ms: float  # worst write in the break window (including those in flight)
    to_202_ms: float  # from the break to the first 202 answer
    bad: int  # writes answered neither 200 nor 202, or not at all
    offline_p50: float
    offline_p99: float
    offline_n: int


async def failover_once(
    tmp: Path, upstream: int, kind: str, guard: Guard, args: Namespace
) -> Failover:
    payload = request_bytes("POST")
    with (
        child("relay", "--target", str(upstream)) as (relay, relay_port),
        netwatch(tmp, relay_port, relay_port, guard, f"failover-{kind}") as (port, _pid),
    ):
        pool = Pool(port, 4000)
        await pool.fill(4)
        rate = args.failover_rate
        warm = await paced(pool, payload, rate, int(rate * 2))
        broke: list[float] = []
        first_202: list[float] = []

        def enough(recs: list[Rec]) -> bool:
            if broke and not first_202:
                found = [r.done for r in recs if r.status == 202]
                if found:
                    first_202.append(min(found))
            return bool(first_202) and time.perf_counter() - first_202[0] > 2.0

        async def breaker() -> None:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(_upstream.command, relay, kind)
            broke.append(time.perf_counter())

        bound = guard.request_timeout + guard.fail_after * guard.interval + guard.timeout + 10
        async with asyncio.TaskGroup() as tg:
            tg.create_task(breaker())
            window = tg.create_task(
                paced(pool, payload, rate, int(rate * bound), timeout=bound, until=enough)
            )
        recs = window.result()
        t_break = broke[0]
        after = sorted((r for r in recs if r.fired >= t_break), key=lambda r: r.fired)
        answered = [r for r in recs if r.status in {200, 202}]
        bad = sum(1 for r in [*warm, *recs] if r.status not in {200, 202})
        first = after[0] if after else Rec(t_break, float("nan"), -1)
        mode = proxy_status(port).get("mode")
        if mode != "offline":
            print(f"   note: mode is {mode!r} after the {kind} break, not offline")
        steady = await paced(pool, payload, args.rate, int(args.rate * args.offline_seconds))
        pool.close()
        queued = [r.ms for r in steady if r.status == 202]
        bad += sum(1 for r in steady if r.status != 202)
        return Failover(
            first_ms=first.ms,
            first_status=first.status,
            worst_ms=max(r.ms for r in answered) if answered else float("nan"),
            to_202_ms=(min(first_202) - t_break) * 1000 if first_202 else float("nan"),
            bad=bad,
            offline_p50=pct(queued, 50),
            offline_p99=pct(queued, 99),
            offline_n=len(queued),
        )


async def failover(tmp: Path, upstream: int, args: Namespace) -> None:
    if (ROOT / "bench" / "failover.py").exists() and not args.force_failover:
        print("\n== Failover: skipped, bench/failover.py measures it (--force-failover) ==")
        return
    guard = (
        Guard(interval=1.0, timeout=1.0, request_timeout=5.0)
        if args.quick
        else Guard(interval=10.0, timeout=3.0, request_timeout=30.0)
    )
    print(
        f"\n== Failover to offline: writes at {args.failover_rate:g} req/s through a relay;"
        f" guard every {guard.interval:g} s (timeout {guard.timeout:g} s, fail_after"
        f" {guard.fail_after}), connect_timeout {guard.connect_timeout:g} s, request_timeout"
        f" {guard.request_timeout:g} s; then {args.rate:g} req/s once offline ({args.failover_reps}"
        " reps) =="
    )
    print(
        f"{'link':<10} {'rep':>3} {'first write ms':>15} {'worst ms':>9} {'break->202 ms':>14}"
        f" {'lost/bad':>8} {'offline p50':>11} {'offline p99':>11} {'n':>5}"
    )
    for kind in ("refuse", "blackhole"):
        results = []
        for rep in range(args.failover_reps):
            fo = await failover_once(tmp, upstream, kind, guard, args)
            results.append(fo)
            print(
                f"{kind:<10} {rep + 1:>3} {fo.first_ms:>10.1f} ({fo.first_status})"
                f" {fo.worst_ms:>9.1f} {fo.to_202_ms:>14.1f} {fo.bad:>8}"
                f" {fo.offline_p50:>11.2f} {fo.offline_p99:>11.2f} {fo.offline_n:>5}"
            )
        if len(results) > 1:
            med = statistics.median
            print(
                f"{kind:<10} med {med(r.first_ms for r in results):>15.1f}"
                f" {med(r.worst_ms for r in results):>9.1f}"
                f" {med(r.to_202_ms for r in results):>14.1f}"
                f" {sum(r.bad for r in results):>8}"
                f" {med(r.offline_p50 for r in results):>11.2f}"
                f" {med(r.offline_p99 for r in results):>11.2f}"
            )


# --- main ------------------------------------------------------------------------------------


async def run(args: Namespace) -> None:
    print(
        f"cores: {os.cpu_count()} (the load generators, nginx, netwatch and the upstream share"
        " them; other work on the machine adds noise)"
    )
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="nw-overhead-") as tmp_name:
        tmp = Path(tmp_name)
        with child("serve") as (up_proc, upstream), nginx(tmp, upstream) as (ng_port, ng_pid):
            with contextlib.ExitStack() as stack:
                nw_port, nw_pid = stack.enter_context(
                    netwatch(tmp, upstream, upstream, Guard(), "online")
                )
                ports = {"direct": upstream, "nginx": ng_port, "netwatch": nw_port}
                pids = {"netwatch": nw_pid, "nginx": ng_pid, "upstream": up_proc.pid}
                if args.baseline:
                    ports["baseline"], pids["baseline"] = stack.enter_context(
                        netwatch(tmp, upstream, upstream, Guard(), "baseline", source=args.baseline)
                    )
                if "latency" in args.sections:
                    await latency(ports, args)
                if "throughput" in args.sections:
                    throughput(ports, pids, tmp, args)
            got = _upstream.receipts(up_proc)
            print(
                f"\nupstream received {got['receipts']} keyed writes under {got['keys']} keys;"
                f" keys received more than once: {got['repeated']}"
            )
            if "failover" in args.sections and not args.no_failover:
                await failover(tmp, upstream, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rate", type=float, default=200.0, help="open-loop req/s")
    parser.add_argument("--seconds", type=float, default=20.0, help="latency s per path")
    parser.add_argument("--reps", type=int, default=4, help="latency segments per path")
    parser.add_argument("--sat-seconds", type=float, default=10.0)
    parser.add_argument("--sat-reps", type=int, default=3)
    parser.add_argument("--no-failover", action="store_true")
    parser.add_argument(
        "--sections",
        default="latency,throughput,failover",
        help="comma-separated subset of latency,throughput,failover",
    )
    parser.add_argument("--force-failover", action="store_true", help="even if failover.py exists")
    parser.add_argument("--failover-rate", type=float, default=20.0, help="writes/s at the break")
    parser.add_argument("--failover-reps", type=int, default=3)
    parser.add_argument("--offline-seconds", type=float, default=5.0)
    parser.add_argument("--dir", default=None, help="where the queue files go (a real disk)")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also measure the netwatch package found in DIR (e.g. an export of main), same run",
    )
    args = parser.parse_args()
    args.sections = set(args.sections.split(","))
    if args.quick:
        args.seconds, args.reps, args.sat_seconds, args.sat_reps = 3.0, 2, 2.0, 1
        args.failover_reps, args.offline_seconds = 1, 2.0
    if not Path(NGINX).exists() or not NETWATCH.exists():
        sys.exit(f"needs {NGINX} and {NETWATCH}")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
