"""Prometheus blackbox_exporter as the comparison system, driven the way Prometheus scrapes it.

The exporter runs as its own process with a generated config (modules ``tcp_connect``,
``http_2xx``, ``icmp``, all with a 1 s timeout and IPv4). ``drive()`` plays Prometheus: it
issues ``GET /probe?target=...&module=...`` at a fixed rate, evenly spread (target ``i`` of
``n`` once per ``n / rate`` seconds, like a scrape interval), over a pool of keep-alive
connections (bounded concurrency), with Prometheus' request headers (gzip included), and
reads ``probe_success`` from each answer. Its own CPU is the parent's, not the exporter's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

EXPORTER = "/usr/bin/prometheus-blackbox-exporter"
MODULES = {"tcp": "tcp_connect", "http": "http_2xx", "icmp": "icmp"}
CONFIG = """\
modules:
  tcp_connect:
    prober: tcp
    timeout: 1s
    tcp: {preferred_ip_protocol: ip4}
  http_2xx:
    prober: http
    timeout: 1s
    http: {preferred_ip_protocol: ip4, valid_status_codes: [200]}
  icmp:
    prober: icmp
    timeout: 1s
    icmp: {preferred_ip_protocol: ip4}
"""
# What Prometheus 2.x sends with every scrape.
ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_exporter(workdir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start the exporter on a free loopback port; return it and its ``host:port``."""
    cfg = workdir / "blackbox.yml"
    cfg.write_text(CONFIG)
    listen = f"127.0.0.1:{free_port()}"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [EXPORTER, f"--config.file={cfg}", f"--web.listen-address={listen}"],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"blackbox_exporter exited with {proc.returncode}; see {log}")
        with contextlib.suppress(OSError, urllib.error.URLError):
            urllib.request.urlopen(f"http://{listen}/-/healthy", timeout=1).read()
            return proc, listen
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"blackbox_exporter did not answer on {listen}; see {log}")


@dataclass
class DriveResult:
    """What the driver saw for the probes scheduled inside the measurement window."""

    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    late: list[float] = field(default_factory=list)  # dispatch delay (driver saturation)
    seconds: float = 0.0  # window length: first window job due .. last one answered
    cpu_marks: tuple[float, float] = (0.0, 0.0)

    @property
    def probes(self) -> int:
        return self.ok + self.failed


async def _read_body(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            parts.append(await reader.readexactly(size + 2))
            if size == 0:
                break
        body = b"".join(p[:-2] for p in parts)
    else:
        raise ValueError("response without a length")
    if headers.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    if status != 200:
        raise ValueError(f"HTTP {status}")
    return body


async def drive(
    listen: str,
    kind: str,
    targets: list[str],
    *,
    rate: float,
    warmup: float,
    duration: float,
    concurrency: int,
    cpu: Callable[[], float],
    scrape_timeout: float,
) -> DriveResult:
    """Probe ``targets`` through the exporter at ``rate``/s for ``warmup + duration``
    seconds; the result covers the probes due in the last ``duration`` seconds, and
    ``cpu_marks`` the exporter's CPU when the window opened and when its last probe ended."""
    host, port = listen.rsplit(":", 1)
    module = MODULES[kind]
    total = int(rate * (warmup + duration))
    first_window = int(rate * warmup)
    res = DriveResult()
    queue: asyncio.Queue[tuple[int, float]] = asyncio.Queue()
    request_head = (
        f"Host: {listen}\r\nUser-Agent: Prometheus/2.45.0\r\nAccept: {ACCEPT}\r\n"
        f"Accept-Encoding: gzip\r\nX-Prometheus-Scrape-Timeout-Seconds: {scrape_timeout:g}\r\n"
        "\r\n"
    )
    paths = ["/probe?" + urllib.parse.urlencode({"target": t, "module": module}) for t in targets]

    def record(i: int, ok: bool, why: str = "") -> None:
        if i < first_window:
            return
        if ok:
            res.ok += 1
        else:
            res.failed += 1
            res.errors[why] = res.errors.get(why, 0) + 1

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while True:
                i, due = await queue.get()
                if i < 0:
                    return
                if i >= first_window:
                    res.late.append(time.monotonic() - due)
                req = f"GET {paths[i % len(paths)]} HTTP/1.1\r\n{request_head}"
                try:
                    writer.write(req.encode())
                    async with asyncio.timeout(scrape_timeout + 5):
                        body = await _read_body(reader)
                except (OSError, ValueError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    record(i, False, f"driver: {type(exc).__name__}")
                    writer.close()
                    with contextlib.suppress(OSError):
                        reader, writer = await asyncio.open_connection(host, int(port))
                    continue
                ok = b"\nprobe_success 1" in body or body.startswith(b"probe_success 1")
                record(i, ok, "" if ok else "probe_success 0")
        finally:
            writer.close()

    workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
    start = time.monotonic() + 0.05
    window_open = start + first_window / rate
    cpu0 = None
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if i == first_window:
            cpu0 = cpu()
        queue.put_nowait((i, due))
    for _ in workers:
        queue.put_nowait((-1, 0.0))
    await asyncio.wait_for(asyncio.gather(*workers), timeout=scrape_timeout + 30)
    res.cpu_marks = (cpu() if cpu0 is None else cpu0, cpu())
    res.seconds = time.monotonic() - window_open
    return res
