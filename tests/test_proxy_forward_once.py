"""Online forwarding sends a request that is not idempotent once, whatever happens; a safe one
gets one immediate retry when its connection dies (a stale keep-alive connection is not a lost
link); and ``/_netwatch/healthz`` says 503 when the queue cannot be read.

Found by mutation testing (``make mutation``): nothing failed when a body-less POST to a
path that is not replayable was retried after a reset, i.e. sent twice upstream.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from helpers.servers import run_http_server
from prometheus_client import CollectorRegistry
from test_proxy import dying_upstream, make_settings, post, running

from netwatch.demo.simulator import PopulationSimulator
from netwatch.proxy.station import StationProxy


def resetting_upstream(received: list[str], resets: int) -> web.Application:
    """Records each request, resets the connection of the first ``resets`` ones (after
    reading them: the upstream got the request, the proxy gets no answer)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        received.append(f"{request.method} {request.path}")
        if len(received) <= resets and request.transport is not None:
            sock = request.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.transport.abort()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@asynccontextmanager
async def proxied(
    tmp_path: Path, app: web.Application, registry: CollectorRegistry
) -> AsyncIterator[tuple[StationProxy, aiohttp.ClientSession]]:
    """A running proxy in front of ``app``, and a client session."""
    async with (
        run_http_server(app) as upstream,
        running(make_settings(tmp_path, upstream), registry=registry) as proxy,
        aiohttp.ClientSession() as client,
    ):
        yield proxy, client


def requests_total(registry: CollectorRegistry, method: str, outcome: str) -> float | None:
    labels = {"site": "q1", "method": method, "outcome": outcome}
    return registry.get_sample_value("netwatch_proxy_requests_total", labels)


async def test_a_post_that_is_not_replayable_is_sent_once_even_when_reset(tmp_path: Path) -> None:
    received: list[str] = []
    registry = CollectorRegistry()
    async with (
        proxied(tmp_path, resetting_upstream(received, resets=1), registry) as (
            proxy,
            client,
        ),
        client.post(f"{proxy.url}/counter/print") as response,
    ):
        assert response.status == 502
        body = await response.json()
        assert (body["error"], body["reason"]) == ("upstream_failed", "connection reset")
    assert received == ["POST /counter/print"]
    assert requests_total(registry, "POST", "failed") == 1.0


async def test_a_safe_request_is_retried_once_when_its_connection_dies(tmp_path: Path) -> None:
    received: list[str] = []
    registry = CollectorRegistry()
    async with (
        proxied(tmp_path, resetting_upstream(received, resets=1), registry) as (
            proxy,
            client,
        ),
        client.get(f"{proxy.url}/api/citizens/1") as response,
    ):
        assert response.status == 200
        assert proxy.mode == "online"  # one dead connection is not a lost link
    assert received == ["GET /api/citizens/1"] * 2
    assert requests_total(registry, "GET", "forwarded") == 1.0


async def test_an_upstream_503_on_a_read_is_relayed_counted_failed_and_goes_offline(
    tmp_path: Path, sim: PopulationSimulator
) -> None:
    registry = CollectorRegistry()
    sim.control(reject_next=1, reject_status=503)
    async with (
        running(make_settings(tmp_path, sim.url), registry=registry) as proxy,
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url}/api/citizens/1") as response,
    ):
        assert response.status == 503
        assert (await response.json())["error"] == "injected"  # the upstream's own answer
        assert (proxy.mode, proxy.status()["reason"]) == ("offline", "passive: upstream 503")
    assert requests_total(registry, "GET", "failed") == 1.0


async def test_healthz_says_503_when_the_queue_cannot_be_read(tmp_path: Path) -> None:
    async with (
        run_http_server(resetting_upstream([], resets=0)) as upstream,
        running(make_settings(tmp_path, upstream)) as proxy,
        aiohttp.ClientSession() as client,
    ):
        async with client.get(f"{proxy.url}/_netwatch/healthz") as response:
            assert (response.status, await response.json()) == (200, {"ok": True})
        with proxy.queue._rlock:  # not while a worker thread reads through it
            proxy.queue._rconn.close()  # the queue's reader is gone: nothing can be read
        async with client.get(f"{proxy.url}/_netwatch/healthz") as response:
            assert response.status == 503
            assert await response.json() == {
                "ok": False,
                "error": "queue_unusable",
                "reason": "the queue does not answer",
            }


async def test_refused_and_unstorable_writes_are_counted_and_never_answered_202(
    tmp_path: Path, sim: PopulationSimulator
) -> None:
    registry = CollectorRegistry()
    queue = {"path": str(tmp_path / "q.db"), "max_bytes": "20KiB"}
    settings = make_settings(tmp_path, sim.url, queue=queue)
    async with (
        running(settings, registry=registry) as proxy,
        aiohttp.ClientSession() as client,
    ):
        proxy.override("offline")
        statuses = []
        for seq in range(6):
            status, _, _ = await post(client, proxy, {"seq": seq, "pad": "p" * 8000})
            statuses.append(status)
        assert statuses.count(202) >= 1
        assert statuses.count(507) >= 1
        assert requests_total(registry, "POST", "rejected") == statuses.count(507)
        assert requests_total(registry, "POST", "queued") == statuses.count(202)

        await proxy.queue._w.close()  # the disk is gone: nothing more can be stored
        status, body, headers = await post(client, proxy, {"seq": 99})
        assert (status, body) == (503, {"error": "queue_unavailable", "mode": "offline"})
        assert headers["Retry-After"].isdigit()
        assert requests_total(registry, "POST", "failed") == 1.0


async def test_max_body_is_the_largest_body_allowed_and_a_read_keeps_its_headers(
    tmp_path: Path,
) -> None:
    seen: list[tuple[str, str | None, int]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((request.method, request.headers.get("X-Station"), len(await request.read())))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    registry = CollectorRegistry()
    async with (
        run_http_server(app) as upstream,
        running(make_settings(tmp_path, upstream, max_body=1000), registry=registry) as proxy,
        aiohttp.ClientSession() as client,
    ):
        url = f"{proxy.url}/api/applications"
        async with client.post(url, data=b"x" * 1000) as response:
            assert response.status == 200
        async with client.post(url, data=b"x" * 1001) as response:
            assert response.status == 413
            assert await response.json() == {"error": "body_too_large", "max_body": 1000}
        async with client.get(f"{proxy.url}/api/citizens/1", headers={"X-Station": "s-7"}) as r:
            assert r.status == 200
    assert seen == [("POST", None, 1000), ("GET", "s-7", 0)]
    assert requests_total(registry, "POST", "rejected") == 1.0


async def test_a_response_cut_mid_body_is_counted_failed(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    async with (
        run_http_server(dying_upstream()) as upstream,
        running(make_settings(tmp_path, upstream), registry=registry) as proxy,
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.url}/api/citizens/1") as response,
    ):
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert requests_total(registry, "GET", "failed") == 1.0
    assert requests_total(registry, "GET", "forwarded") is None
