"""Slow and idle station connections: header, idle and body timeouts, the connection cap,
the open-file limit, and repeated log lines.

Raw sockets on loopback play the slow clients; a real aiohttp client plays the station.
The last test runs the real ``netwatch proxy`` process with RLIMIT_NOFILE soft = hard = 1024
and a thousand trickling sockets open against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from helpers.daemon import eventually, free_tcp_port
from helpers.stations import ProxyProcess, proxy_config
from test_proxy import make_settings, running

from netwatch.demo.simulator import PopulationSimulator
from netwatch.logs import RepeatFilter, RepeatLimit
from netwatch.proxy.station import StationProxy

HEAD = b"POST /api/applications HTTP/1.1\r\nHost: proxy\r\n"
# More than fit under `ulimit -n 1024` with the proxy's own descriptors: without a cap the
# accept loop hits "Too many open files" and the station is not let in.
SLOW_CONNECTIONS = 1050


@asynccontextmanager
async def proxy_with(tmp_path: Path, upstream: str, **limits: Any) -> AsyncIterator[StationProxy]:
    async with running(make_settings(tmp_path, upstream, **limits)) as proxy:
        yield proxy


async def closed_after(reader: asyncio.StreamReader, limit: float) -> tuple[float, bytes]:
    """Read until the proxy closes the connection; (seconds it took, what was answered)."""
    start = time.monotonic()
    got = b""
    async with asyncio.timeout(limit):
        while True:
            try:
                chunk = await reader.read(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    return time.monotonic() - start, got


async def test_slow_headers_idle_keepalive_and_slow_bodies_are_timed_out(tmp_path: Path) -> None:
    async with (
        PopulationSimulator() as sim,
        proxy_with(
            tmp_path, sim.url, header_timeout="1s", idle_timeout="1s", body_timeout="1s"
        ) as proxy,
    ):
        # Slow headers: a byte every 200 ms never completes the request head.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(HEAD)

        async def trickle() -> None:
            with contextlib.suppress(OSError):
                for _ in range(100):
                    writer.write(b"X")
                    await writer.drain()
                    await asyncio.sleep(0.2)

        dribble = asyncio.create_task(trickle())
        took, answer = await closed_after(reader, 10)
        dribble.cancel()
        writer.close()
        assert answer == b""
        assert 0.8 <= took <= 8.0

        # An idle keep-alive connection: answered once, then closed when it stays idle.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET /_netwatch/healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
        first = await reader.readuntil(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200")
        took, _ = await closed_after(reader, 10)
        writer.close()
        assert 0.8 <= took <= 8.0

        # A slow body: 10 of 100 bytes, then nothing. Answered 408, connection closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(HEAD + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        writer.write(b'{"seq": 1,')
        took, answer = await closed_after(reader, 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        assert b'"body_timeout"' in answer
        assert 0.8 <= took <= 8.0
        assert sim.exchanges == []  # nothing half-received went upstream


async def test_a_station_gets_in_when_slow_connections_fill_the_cap(tmp_path: Path) -> None:
    async with (
        PopulationSimulator() as sim,
        proxy_with(tmp_path, sim.url, max_connections=16) as proxy,
    ):
        slow = []
        for _ in range(16):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(HEAD)
            slow.append((reader, writer))
        await eventually(
            lambda: _true(proxy.status()["connections"]["open"] == 16), 5, "16 connections open"
        )
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{proxy.url}/api/applications", json={"seq": 1}) as resp,
        ):
            assert resp.status == 201
        # The connection that waited longest made room.
        took, _ = await closed_after(slow[0][0], 5)
        assert took < 5
        assert proxy.status()["connections"]["evicted"] >= 1
        for _, writer in slow:
            writer.close()


async def _true(value: bool) -> bool:
    return value


def test_repeated_log_lines_are_limited_and_the_drop_is_reported() -> None:
    now = [0.0]
    limit = RepeatLimit(burst=5, window=10.0, clock=lambda: now[0])
    kept = 0
    for _ in range(10_000):
        try:
            limit.processor(None, "error", {"event": "accept_failed"})
            kept += 1
        except structlog.DropEvent:
            pass
    assert kept == 5
    assert limit.processor(None, "error", {"event": "other"}) == {"event": "other"}
    now[0] = 10.0
    after = limit.processor(None, "error", {"event": "accept_failed"})
    assert after["repeats_suppressed"] == 9_995

    stdlib = RepeatFilter(RepeatLimit(burst=3, window=10.0, clock=lambda: now[0]))
    record = logging.LogRecord("asyncio", logging.ERROR, "x", 1, "socket.accept() failed", (), None)
    assert [stdlib.filter(record) for _ in range(5)] == [True, True, True, False, False]


def _limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


@pytest.mark.slow
async def test_a_station_is_served_while_a_thousand_slow_connections_are_open(
    tmp_path: Path,
) -> None:
    """The real process under `ulimit -n 1024`, with 1,000 sockets trickling request heads."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard or hard == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))  # this side's sockets
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 2048, "the test needs 2048 fds"
    async with PopulationSimulator() as sim:
        config = proxy_config(
            listen=f"127.0.0.1:{free_tcp_port()}",
            upstream=sim.url,
            queue_path=tmp_path / "queue.db",
            guard_url=f"{sim.url}/health",
        )
        config["proxy"]["header_timeout"] = "4s"
        proxy = ProxyProcess(tmp_path, config, preexec_fn=_limit_open_files)
        proxy.start()
        writers: list[asyncio.StreamWriter] = []
        try:
            await proxy.wait_ready()

            async def online() -> bool:
                status = await proxy.status()
                return status is not None and status["mode"] == "online"

            await eventually(online, 20, "proxy online")
            host, port = config["proxy"]["listen"].split(":")
            for _ in range(SLOW_CONNECTIONS):
                _, writer = await asyncio.open_connection(host, int(port))
                writer.write(HEAD)
                writers.append(writer)

            async def trickle() -> None:
                while True:
                    for w in writers:
                        if not w.is_closing():
                            w.write(b"X")
                    await asyncio.sleep(0.5)

            dribble = asyncio.create_task(trickle())
            try:
                started = time.monotonic()
                timeout = aiohttp.ClientTimeout(total=10)
                async with (
                    aiohttp.ClientSession(timeout=timeout) as session,
                    session.post(f"{proxy.url}/api/applications", json={"seq": 1}) as resp,
                ):
                    assert resp.status == 201
                served_in = time.monotonic() - started
                assert served_in < 8.0
                # The slow ones go at their header deadline: a positive sign of the timeout.
                events = await eventually(
                    lambda: _events(proxy, "proxy_slow_connections_closed"), 15, "slow closed"
                )
                assert sum(e["count"] for e in events) > 0
            finally:
                dribble.cancel()
            listening = _events_now(proxy, "proxy_listening")
            assert listening[0]["max_connections"] == 1024 - 160
            log_bytes = sum(p.stat().st_size for p in proxy.log_paths)
            assert log_bytes < 64 * 1024, f"{log_bytes} bytes of log"
            assert not any("Too many open files" in str(e) for e in proxy.log_events())
        finally:
            for w in writers:
                w.close()
            proxy.stop()


async def _events(proxy: ProxyProcess, name: str) -> list[dict[str, Any]]:
    return _events_now(proxy, name)


def _events_now(proxy: ProxyProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in proxy.log_events() if e.get("event") == name]


def test_every_targets_link_change_is_logged_while_a_flood_of_one_line_is_limited() -> None:
    limit = RepeatLimit(burst=20, window=10.0, clock=lambda: 0.0)
    kept = 0
    for n in range(1000):
        event = {"event": "link_state_changed", "target": f"t{n}", "new": "up"}
        with contextlib.suppress(structlog.DropEvent):
            limit.processor(None, "info", event)
            kept += 1
    assert kept == 1000  # the contract: every change is logged
    flood = 0
    for _ in range(1000):
        with contextlib.suppress(structlog.DropEvent):
            limit.processor(None, "error", {"event": "proxy_accept_failed"})
            flood += 1
    assert flood == 20
