"""Durable enqueue through the HTTP path: a real ``netwatch proxy`` process, offline (its
upstream refuses), 32 concurrent stations posting writes; queued (202) requests per second
with group commit and with one commit per request, in the same run. Then the proxy's RSS
with a large backlog.

    .venv/bin/python bench/enqueue_http.py [--clients 32] [--seconds 10] [--fill 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_mib(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class Proxy:
    def __init__(self, workdir: Path, *, group_commit: bool) -> None:
        self.port = free_port()
        dead = free_port()  # nothing listens: the link is refused
        config = {
            "site": {"id": "bench", "timezone": "UTC"},
            "defaults": {"interval": "1s", "timeout": "300ms"},
            "targets": [{"name": "api", "type": "tcp", "host": "127.0.0.1", "port": dead}],
            "link": {"fail_after": 1},
            "proxy": {
                "listen": f"127.0.0.1:{self.port}",
                "upstream": f"http://127.0.0.1:{dead}",
                "guard": ["api"],
                "queue": {
                    "path": str(workdir / f"queue-{group_commit}.db"),
                    "max_bytes": "4GiB",
                    "group_commit": group_commit,
                },
            },
        }
        cfg = workdir / f"proxy-{group_commit}.yaml"
        cfg.write_text(yaml.safe_dump(config))
        self.log = (workdir / f"proxy-{group_commit}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netwatch", "--log-level", "warning", "proxy", "-c", str(cfg)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    async def wait_offline(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{self.url}/_netwatch/status") as resp:
                    if (await resp.json())["mode"] == "offline":
                        return
            await asyncio.sleep(0.1)
        raise SystemExit("the proxy did not go offline")

    def cpu_seconds(self) -> float:
        parts = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def load(url: str, clients: int, seconds: float, limit: int | None = None) -> dict[str, Any]:
    """Closed loop: each client posts, waits for the answer, posts again."""
    body = json.dumps({"station": "bench", "citizen_id": "079012345678", "kind": "chip-id"})
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + seconds
    sent = 0

    async def client(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal sent
        headers = {"Content-Type": "application/json", "Netwatch-Order-Key": f"c{n}"}
        while time.monotonic() < deadline and (limit is None or sent < limit):
            sent += 1
            t0 = time.perf_counter()
            async with session.post(f"{url}/api/applications", data=body, headers=headers) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
            latencies.append(time.perf_counter() - t0)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.monotonic()
        async with asyncio.TaskGroup() as tg:
            for n in range(clients):
                tg.create_task(client(session, n))
        elapsed = time.monotonic() - t0
    latencies.sort()
    queued = statuses.get(202, 0)
    return {
        "queued": queued,
        "statuses": statuses,
        "elapsed_s": elapsed,
        "rate": queued / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else None,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000 if latencies else None,
    }


WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{"station":"bench","citizen_id":"079012345678","kind":"chip-id"}'
wrk.headers["Content-Type"] = "application/json"
"""


async def load_wrk(url: str, clients: int, seconds: float, workdir: Path) -> dict[str, Any]:
    """The same closed loop driven by wrk: a C client leaves both cores' Python time to the
    proxy (a Python client costs about as much CPU per request as the proxy itself)."""
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{clients}", f"-d{seconds:.0f}s", "--latency", "-s", str(script),
        f"{url}/api/applications", stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    fields: dict[str, float] = {}
    for line in out.decode().splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            fields["rate"] = float(parts[1])
        elif parts[:1] in (["50%"], ["99%"]):
            fields[parts[0]] = _ms(parts[1])
        elif "requests in" in line:
            fields["requests"] = float(parts[0])
        elif line.strip().startswith("Non-2xx"):
            fields["non2xx"] = float(parts[-1])
    done = int(fields.get("requests", 0))
    bad = int(fields.get("non2xx", 0))
    return {
        "queued": done - bad,
        "statuses": {"2xx": done - bad, "other": bad},
        "elapsed_s": seconds,
        "rate": fields.get("rate", 0.0) * (done - bad) / max(1, done),
        "p50_ms": fields.get("50%"),
        "p99_ms": fields.get("99%"),
    }


def _ms(text: str) -> float:
    for unit, factor in (("ms", 1.0), ("us", 0.001), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


async def measure(
    workdir: Path, group_commit: bool, clients: int, seconds: float, *, use_wrk: bool
) -> dict[str, Any]:
    proxy = Proxy(workdir, group_commit=group_commit)
    try:
        async with aiohttp.ClientSession() as session:
            await proxy.wait_offline(session)
        await load(proxy.url, clients, 1.0)  # warm-up
        cpu0 = proxy.cpu_seconds()
        if use_wrk:
            result = await load_wrk(proxy.url, clients, seconds, workdir)
        else:
            result = await load(proxy.url, clients, seconds)
        result["proxy_cpu_s_per_1000"] = (
            (proxy.cpu_seconds() - cpu0) / max(1, result["queued"]) * 1000
        )
        return result
    finally:
        proxy.stop()


async def fill(workdir: Path, clients: int, entries: int) -> dict[str, Any]:
    proxy = Proxy(workdir, group_commit=True)
    try:
        async with aiohttp.ClientSession() as session:
            await proxy.wait_offline(session)
        result = await load(proxy.url, clients, 600.0, limit=entries)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{proxy.url}/_netwatch/status") as resp,
        ):
            status = await resp.json()
        rss, hwm = rss_mib(proxy.proc.pid)
        return {
            "queued": result["queued"],
            "depth": status.get("queue", {}).get("depth"),
            "rss_mib": rss,
            "peak_rss_mib": hwm,
            "rate": result["rate"],
        }
    finally:
        proxy.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fill", type=int, default=100_000)
    parser.add_argument("--dir", type=Path, default=None, help="where the queue files go")
    parser.add_argument(
        "--python-client", action="store_true", help="drive with aiohttp even if wrk exists"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="netwatch-bench-") as tmp:
        workdir = Path(tmp)
        use_wrk = shutil.which("wrk") is not None and not args.python_client
        group = await measure(workdir, True, args.clients, args.seconds, use_wrk=use_wrk)
        single = await measure(workdir, False, args.clients, args.seconds, use_wrk=use_wrk)
        print(f"load generator: {'wrk' if use_wrk else 'Python aiohttp client (no wrk found)'}")
        print(
            f"HTTP enqueue, {args.clients} concurrent clients, {args.seconds:.0f}s, "
            "synchronous=FULL"
        )
        for name, r in (("group commit", group), ("one commit per request", single)):
            print(
                f"  {name:<24} {r['rate']:8.0f} queued/s   p50 {r['p50_ms']:.1f} ms   "
                f"p99 {r['p99_ms']:.1f} ms   proxy CPU {r['proxy_cpu_s_per_1000']:.2f} s/1000   "
                f"statuses {r['statuses']}"
            )
        print(f"  ratio group/single: {group['rate'] / single['rate']:.1f}x")
        if args.fill:
            f = await fill(workdir, args.clients, args.fill)
            print(
                f"backlog of {f['depth']} entries: proxy RSS {f['rss_mib']:.1f} MiB "
                f"(peak {f['peak_rss_mib']:.1f} MiB), filled at {f['rate']:.0f}/s"
            )


if __name__ == "__main__":
    asyncio.run(main())
