"""The station proxy end to end: real sockets, a real SQLite queue in tmp_path, the
population-database simulator (or a small recording upstream) and the fault relay."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers.receipts import assert_received_once
from helpers.relay import FaultRelay
from helpers.servers import free_port, run_http_server, wait_until
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry

from netwatch.config.schema import Proxy
from netwatch.demo.simulator import PopulationSimulator, SimulatorSettings
from netwatch.errors import QueueKeyError
from netwatch.events import Event, EventHub, ModeChanged
from netwatch.proxy.station import StationProxy


def make_settings(tmp_path: Path, upstream: str, **overrides: Any) -> Proxy:
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "upstream": upstream,
        "queue": {"path": str(tmp_path / "queue.db")},
        "replay": {"rate": "1000/s", "peak_rate": "1000/s", "backoff_initial": "100ms"},
        "connect_timeout": "1s",
        "request_timeout": "5s",
    }
    data.update(overrides)
    return Proxy.model_validate(data)


class RecordingHub(EventHub):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []

    def publish(self, event: Event) -> None:
        self.events.append(event)
        super().publish(event)


@asynccontextmanager
async def running(
    settings: Proxy, *, registry: CollectorRegistry | None = None, hub: EventHub | None = None
) -> AsyncIterator[StationProxy]:
    """A StationProxy with its replay loops running, as the daemon would run it."""
    proxy = StationProxy(
        settings, "q1", registry or CollectorRegistry(), hub or EventHub(), lambda: False, None
    )
    async with proxy:
        task = asyncio.get_running_loop().create_task(proxy.run())
        try:
            yield proxy
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


@pytest.fixture
async def sim() -> AsyncIterator[PopulationSimulator]:
    async with PopulationSimulator(SimulatorSettings(), host="127.0.0.1", port=0) as simulator:
        yield simulator


@pytest.fixture
async def relay(sim: PopulationSimulator) -> AsyncIterator[FaultRelay]:
    async with FaultRelay("127.0.0.1", sim.port) as fault_relay:
        yield fault_relay


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def ticket_state(client: aiohttp.ClientSession, proxy: StationProxy, ticket: str) -> Any:
    async with client.get(f"{proxy.url}/_netwatch/tickets/{ticket}") as response:
        return await response.json()


async def housekeeping_turns(proxy: StationProxy, turns: int = 2) -> None:
    """Wait until the proxy's housekeeping re-read the queue ``turns`` times (once a second):
    the positive sign that its loop, the replayer's 250 ms polls included, ran meanwhile."""
    seen = [proxy._stats]

    def turned() -> bool:
        if proxy._stats is not seen[-1]:
            seen.append(proxy._stats)
        return len(seen) > turns

    await wait_until(turned, timeout=15)


async def post(
    client: aiohttp.ClientSession, proxy: StationProxy, body: dict[str, Any], **headers: str
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    async with client.post(f"{proxy.url}/api/applications", json=body, headers=headers) as r:
        return r.status, await r.json(), r.headers


# --- online forwarding -----------------------------------------------------------------------


def recording_upstream(seen: list[dict[str, Any]]) -> web.Application:
    async def record(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": dict(request.headers),
                "body_sha": hashlib.sha256(body).hexdigest(),
                "chunked": "chunked" in request.headers.get("Transfer-Encoding", ""),
            }
        )
        response = web.StreamResponse(
            status=207, headers={"X-Upstream": "yes", "Content-Encoding": "gzip"}
        )
        await response.prepare(request)
        for i in range(16):  # 1 MiB, streamed in chunks
            await response.write(bytes([i]) * 65536)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_route("*", "/{tail:.*}", record)
    return app


async def test_online_forwards_method_path_query_headers_and_bodies_both_ways(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    seen: list[dict[str, Any]] = []
    expected_body = b"".join(bytes([i]) * 65536 for i in range(16))

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 100_000

    async with (
        run_http_server(recording_upstream(seen)) as upstream,
        running(make_settings(tmp_path, upstream)) as proxy,
    ):
        headers = {"X-Station": "s-07", "Connection": "X-Hop", "X-Hop": "secret"}
        url = f"{proxy.url}/api/applications/%C3%A9?b=2&a=%20x"
        async with client.patch(url, data=b'{"a": 1}', headers=headers) as r:
            assert r.status == 207
            assert r.headers["X-Upstream"] == "yes"
            assert r.headers["Content-Encoding"] == "gzip"  # passed through, not decoded
            assert await r.read() == expected_body
        # Non-replayable, chunked upload: streamed, no Idempotency-Key invented.
        async with client.post(f"{proxy.url}/upload", data=chunks()) as r:
            assert r.status == 207
            await r.read()
        given = {"Idempotency-Key": "station-key-1"}
        async with client.post(f"{proxy.url}/api/x", data=b"{}", headers=given) as r:
            await r.read()

    patch, upload, keyed = seen
    assert patch["method"] == "PATCH"
    assert patch["raw_path"] == "/api/applications/%C3%A9?b=2&a=%20x"
    assert patch["headers"]["X-Station"] == "s-07"
    assert "X-Hop" not in patch["headers"]
    assert patch["headers"]["X-Forwarded-For"] == "127.0.0.1"
    assert patch["headers"]["X-Forwarded-Proto"] == "http"
    assert len(patch["headers"]["Idempotency-Key"]) == 36  # a UUID was added
    assert patch["body_sha"] == hashlib.sha256(b'{"a": 1}').hexdigest()
    assert upload["chunked"]
    assert upload["body_sha"] == hashlib.sha256(b"x" * 800_000).hexdigest()
    assert "Idempotency-Key" not in upload["headers"]
    assert keyed["headers"]["Idempotency-Key"] == "station-key-1"


async def test_body_over_max_body_is_rejected_with_413(
    tmp_path: Path, client: aiohttp.ClientSession, sim: PopulationSimulator
) -> None:
    async def chunked(size: int) -> AsyncIterator[bytes]:
        yield b"y" * size

    async with running(make_settings(tmp_path, sim.url, max_body=1024)) as proxy:
        async with client.post(f"{proxy.url}/api/applications", data=b"z" * 2000) as r:
            assert r.status == 413
        for path in ("/api/applications", "/elsewhere"):
            async with client.post(f"{proxy.url}{path}", data=chunked(5000)) as r:
                assert r.status == 413
                assert (await r.json())["error"] == "body_too_large"
    assert sim.stats.requests == 0


# --- passive failure and offline answers -------------------------------------------------------


async def test_refused_link_queues_the_write_and_goes_offline_at_once(
    tmp_path: Path, client: aiohttp.ClientSession, relay: FaultRelay
) -> None:
    registry = CollectorRegistry()
    hub = RecordingHub()
    async with running(make_settings(tmp_path, relay.url), registry=registry, hub=hub) as proxy:
        assert proxy.mode == "online"
        relay.mode = "refuse"
        status, body, headers = await post(client, proxy, {"citizen_id": "1"})
        assert status == 202
        assert body["status"] == "queued"
        assert body["position"] == 1
        assert headers["Netwatch-Ticket"] == body["ticket"]
        assert body["queued_at"].endswith("+00:00")
        assert proxy.status()["mode"] == "offline"
        assert (await ticket_state(client, proxy, body["ticket"]))["state"] == "queued"
        # Anything not replayable is refused while offline, with a hint when to come back.
        async with client.get(f"{proxy.url}/api/citizens/1") as r:
            assert r.status == 503
            assert r.headers["Retry-After"].isdigit()
            assert await r.json() == {"error": "upstream_unavailable", "mode": "offline"}

    modes = [(e.mode, e.reason) for e in hub.events if isinstance(e, ModeChanged)]
    assert modes == [("online", "link ok"), ("offline", "passive: connection refused")]
    sample = registry.get_sample_value
    assert sample("netwatch_proxy_mode", {"site": "q1", "mode": "offline"}) == 1.0
    assert sample("netwatch_proxy_mode", {"site": "q1", "mode": "online"}) == 0.0
    labels = {"site": "q1", "method": "POST", "outcome": "queued"}
    assert sample("netwatch_proxy_requests_total", labels) == 1.0
    labels = {"site": "q1", "method": "GET", "outcome": "rejected"}
    assert sample("netwatch_proxy_requests_total", labels) == 1.0


async def test_non_replayable_request_failing_on_the_network_gets_502(
    tmp_path: Path, client: aiohttp.ClientSession, relay: FaultRelay
) -> None:
    async with running(make_settings(tmp_path, relay.url)) as proxy:
        relay.mode = "refuse"
        async with client.get(f"{proxy.url}/api/citizens/1") as r:
            assert r.status == 502
            assert (await r.json())["error"] == "upstream_failed"
        assert proxy.mode == "offline"


async def test_upstream_503_on_a_write_queues_it_and_goes_offline(
    tmp_path: Path, client: aiohttp.ClientSession, sim: PopulationSimulator
) -> None:
    sim.control(reject_next=1, reject_status=503)
    async with running(make_settings(tmp_path, sim.url)) as proxy:
        status, body, _ = await post(client, proxy, {"citizen_id": "5"})
        assert status == 202
        assert proxy.mode in {"offline", "replaying"}
        # No guard configured: after the passive-failure hold the proxy tries again.
        await wait_until(lambda: proxy.mode == "online", timeout=10)
        state = await ticket_state(client, proxy, body["ticket"])
    assert state["state"] == "delivered"
    assert [a["body"]["citizen_id"] for a in sim.applied] == ["5"]
    # The 503 came from before the API (no receipt): the replay is the one send.
    assert_received_once(sim.receipts, [sim.applied[0]["idempotency_key"]])
    assert len(sim.receipts) == 1


async def test_black_holed_forward_is_queued_as_soon_as_the_guard_goes_down(
    tmp_path: Path, client: aiohttp.ClientSession, relay: FaultRelay
) -> None:
    settings = make_settings(tmp_path, relay.url, guard=["popdb-api"], request_timeout="60s")
    async with running(settings) as proxy:
        proxy.set_guard("popdb-api", True)
        relay.mode = "blackhole"
        pending = asyncio.ensure_future(post(client, proxy, {"citizen_id": "9"}))
        await wait_until(lambda: relay.bytes_swallowed > 0, message="the request in the hole")
        assert not pending.done()
        started = time.monotonic()
        proxy.set_guard("popdb-api", False)
        status, _, _ = await asyncio.wait_for(pending, 5)
        assert status == 202
        assert time.monotonic() - started < 1.0


# --- replay ------------------------------------------------------------------------------------


async def test_replay_after_guard_recovery_is_in_order_per_key_and_applied_once(
    tmp_path: Path, client: aiohttp.ClientSession, sim: PopulationSimulator, relay: FaultRelay
) -> None:
    settings = make_settings(tmp_path, relay.url, guard=["popdb-api"])
    async with running(settings) as proxy:
        proxy.set_guard("popdb-api", True)
        relay.mode = "refuse"
        tickets = []
        for seq in range(12):
            station = f"st-{seq % 3}"
            body = {"citizen_id": str(seq), "station": station, "seq": seq}
            headers = {"Netwatch-Order-Key": station}
            if seq == 5:  # the station retries a request: same Idempotency-Key twice
                headers["Idempotency-Key"] = "dup-key"
                await post(client, proxy, body, **headers)
            status, answer, _ = await post(client, proxy, body, **headers)
            assert status == 202
            tickets.append(answer["ticket"])
        proxy.set_guard("popdb-api", False)
        assert proxy.mode == "offline"
        relay.mode = "pass"
        await housekeeping_turns(proxy)
        assert sim.receipts == []  # nothing replays before the guard says the link is back
        proxy.set_guard("popdb-api", True)
        await wait_until(lambda: proxy.mode == "online", timeout=10)
        states = [await ticket_state(client, proxy, t) for t in tickets]

    assert {s["state"] for s in states} == {"delivered"}
    applied = sim.applied
    keys = [a["idempotency_key"] for a in applied]
    assert len(keys) == len(set(keys)) == 12
    # Each entry sent once; "dup-key" twice because the station itself sent it twice.
    assert_received_once(sim.receipts, keys, resent={"dup-key"})
    assert len(sim.receipts) == 13
    for station in ("st-0", "st-1", "st-2"):
        seqs = [a["station_seq"] for a in applied if a["station"] == station]
        assert seqs == sorted(seqs)
        assert len(seqs) == 4


def flaky_upstream(calls: list[float], statuses: list[int]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        calls.append(time.monotonic())
        status = statuses.pop(0) if statuses else 201
        headers = {"Retry-After": "1"} if status == 503 else {}
        return web.json_response({"n": len(calls)}, status=status, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def test_replay_retries_a_503_no_sooner_than_retry_after(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    calls: list[float] = []
    async with (
        run_http_server(flaky_upstream(calls, [503])) as upstream,
        running(make_settings(tmp_path, upstream)) as proxy,
    ):
        proxy.override("offline")
        status, body, _ = await post(client, proxy, {"citizen_id": "1"})
        assert status == 202
        proxy.override("auto")
        await wait_until(lambda: len(calls) == 2, timeout=10)
        await wait_until(lambda: proxy.mode == "online")
        state = await ticket_state(client, proxy, body["ticket"])
    assert calls[1] - calls[0] >= 0.95
    assert state["state"] == "delivered"
    assert state["attempts"] == 2
    assert len(calls) == 2  # the retry after the 503, and nothing more once delivered
    assert state["upstream_status"] == 201


async def test_rejected_entry_becomes_dead_letter_and_does_not_block_the_next(
    tmp_path: Path, client: aiohttp.ClientSession, sim: PopulationSimulator
) -> None:
    registry = CollectorRegistry()
    async with running(make_settings(tmp_path, sim.url), registry=registry) as proxy:
        proxy.override("offline")
        tickets = []
        for seq, invalid in enumerate([False, True, False]):
            body = {"citizen_id": str(seq), "seq": seq, "invalid": invalid}
            _, answer, _ = await post(client, proxy, body, **{"Netwatch-Order-Key": "st-1"})
            tickets.append(answer["ticket"])
        proxy.override("auto")
        await wait_until(lambda: proxy.mode == "online", timeout=10)
        states = [await ticket_state(client, proxy, t) for t in tickets]
        await wait_until(lambda: registry.get_sample_value("netwatch_dead_letters", {"site": "q1"}))
    assert [s["state"] for s in states] == ["delivered", "dead", "delivered"]
    assert states[1]["upstream_status"] == 422
    assert states[1]["reason"] == "rejected"
    assert [a["station_seq"] for a in sim.applied] == [0, 2]
    assert_received_once(sim.receipts)  # the rejected one too: refused once, not retried
    assert len(sim.receipts) == 3
    sample = registry.get_sample_value
    assert sample("netwatch_replay_total", {"site": "q1", "outcome": "dead"}) == 1.0
    assert sample("netwatch_replay_total", {"site": "q1", "outcome": "delivered"}) == 2.0
    assert sample("netwatch_replay_lag_seconds_count", {"site": "q1"}) == 2.0


async def test_restart_with_a_backlog_waits_for_the_guard_then_replays(
    tmp_path: Path, client: aiohttp.ClientSession, sim: PopulationSimulator
) -> None:
    settings = make_settings(tmp_path, sim.url, guard=["popdb-api"])
    async with running(settings) as proxy:
        proxy.override("offline")
        _, answer, _ = await post(client, proxy, {"citizen_id": "7"})
    async with running(settings) as proxy:
        assert (proxy.mode, proxy.status()["reason"]) == ("offline", "awaiting guard")
        await housekeeping_turns(proxy)
        assert sim.receipts == []
        proxy.set_guard("popdb-api", True)
        await wait_until(lambda: proxy.mode == "online", timeout=10)
        assert (await ticket_state(client, proxy, answer["ticket"]))["state"] == "delivered"
    assert len(sim.applied) == 1
    assert_received_once(sim.receipts, [sim.applied[0]["idempotency_key"]])
    assert len(sim.receipts) == 1


# --- endpoints and limits ----------------------------------------------------------------------


async def test_full_queue_answers_507_and_keeps_what_it_already_holds(
    tmp_path: Path, client: aiohttp.ClientSession, sim: PopulationSimulator
) -> None:
    settings = make_settings(
        tmp_path, sim.url, queue={"path": str(tmp_path / "q.db"), "max_bytes": "40KiB"}
    )
    async with running(settings) as proxy:
        proxy.override("offline")
        statuses, tickets = [], []
        for seq in range(10):
            status, answer, _ = await post(client, proxy, {"seq": seq, "pad": "p" * 8000})
            statuses.append(status)
            if status == 202:
                tickets.append(answer["ticket"])
            else:
                assert answer["error"] == "queue_full"
        assert statuses[0] == 202
        assert 507 in statuses
        assert statuses == sorted(statuses)  # once full, every later write is refused
        proxy.override("auto")
        await wait_until(lambda: proxy.mode == "online", timeout=10)
        states = [await ticket_state(client, proxy, t) for t in tickets]
    assert {s["state"] for s in states} == {"delivered"}
    assert len(sim.applied) == len(tickets)
    assert_received_once(sim.receipts, [a["idempotency_key"] for a in sim.applied])
    assert len(sim.receipts) == len(tickets)


async def test_ticket_status_and_health_endpoints(
    tmp_path: Path, client: aiohttp.ClientSession, sim: PopulationSimulator
) -> None:
    async with running(make_settings(tmp_path, sim.url, guard=["popdb-api"])) as proxy:
        async with client.get(f"{proxy.url}/_netwatch/tickets/nope") as r:
            assert r.status == 404
        async with client.get(f"{proxy.url}/_netwatch/healthz") as r:
            assert (r.status, await r.json()) == (200, {"ok": True})
        proxy.set_guard("popdb-api", False)
        async with client.get(f"{proxy.url}/_netwatch/status") as r:
            status = await r.json()
        assert status["mode"] == "offline"
        assert status["reason"] == "guard down"
        assert status["guard"] == {"popdb-api": "down"}
        assert status["queue"]["depth"] == 0
        async with client.post(f"{proxy.url}/_netwatch/status") as r:
            assert r.status == 404  # the proxy's own namespace is never forwarded
    assert sim.stats.requests == 0


async def test_malformed_request_is_answered_and_the_proxy_keeps_serving(
    tmp_path: Path,
    client: aiohttp.ClientSession,
    sim: PopulationSimulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with running(make_settings(tmp_path, sim.url)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"POST /api/x HTTP/1.1\r\nContent-Length: nope\r\n\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        assert b" 400 " in line
        writer.close()
        async with client.get(f"{proxy.url}/health") as r:
            assert r.status == 200
    # aiohttp's own report of the bad request keeps no request bytes (no traceback either).
    assert "nope" not in caplog.text
    assert "BadHttpMessage" in caplog.text


async def test_wrong_queue_key_fails_fast(tmp_path: Path, sim: PopulationSimulator) -> None:
    settings = make_settings(tmp_path, sim.url)
    async with StationProxy(settings, "q1", CollectorRegistry(), EventHub(), lambda: False, None):
        pass
    proxy = StationProxy(settings, "q1", CollectorRegistry(), EventHub(), lambda: False, b"k" * 32)
    with pytest.raises(QueueKeyError):
        async with proxy:
            pass


async def test_black_holed_write_is_queued_after_queue_after_without_waiting_for_the_guard(
    tmp_path: Path, client: aiohttp.ClientSession, relay: FaultRelay
) -> None:
    settings = make_settings(
        tmp_path, relay.url, guard=["popdb-api"], request_timeout="60s", queue_after="400ms"
    )
    async with running(settings) as proxy:
        proxy.set_guard("popdb-api", True)
        relay.mode = "blackhole"
        started = time.monotonic()
        status, _, headers = await asyncio.wait_for(post(client, proxy, {"citizen_id": "7"}), 5)
        elapsed = time.monotonic() - started
        assert status == 202
        assert "Netwatch-Ticket" in headers
        assert 0.4 <= elapsed < 0.4 + 0.3
        assert proxy.mode == "offline"


def dying_upstream() -> web.Application:
    """Sends headers and part of a large body, then drops the connection."""

    async def half(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(1024 * 1024)})
        await response.prepare(request)
        await response.write(b"x" * 100_000)
        assert request.transport is not None
        request.transport.abort()
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", half)
    return app


async def test_upstream_dying_mid_body_cuts_the_station_quietly(
    tmp_path: Path, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_http_server(dying_upstream()) as upstream:
        settings = make_settings(tmp_path, upstream)
        async with running(settings) as proxy:
            async with client.get(f"{proxy.url}/api/citizens/1") as response:
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            # The proxy keeps serving, and said nothing at error level about it.
            async with client.get(f"{proxy.url}/_netwatch/healthz") as response:
                assert response.status == 200
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_added_idempotency_keys_are_distinct_version_4_uuids() -> None:
    import uuid

    from netwatch.proxy.dispatch import new_idempotency_key

    keys = {new_idempotency_key() for _ in range(10_000)}
    assert len(keys) == 10_000
    assert all(uuid.UUID(k).version == 4 for k in keys)
    assert all(uuid.UUID(k).variant == uuid.RFC_4122 for k in keys)
    assert all(str(uuid.UUID(k)) == k for k in keys)  # the canonical lower-case form
