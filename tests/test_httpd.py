"""The site daemon's own HTTP server (``netwatch.monitor.httpd``), over real loopback
sockets: what a scraper, ``netwatch status`` and a health check get, the same answers as the
aiohttp endpoint, and what malformed, oversized, pipelined, slow or too many clients get."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import pytest
from helpers.aiohttp_site import aiohttp_site
from helpers.daemon import free_tcp_port
from helpers.rawhttp import exchange, read_to_end, replies, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from structlog.testing import capture_logs

from netwatch.monitor.exposition import FastCollector, render
from netwatch.monitor.httpd import Limits, SiteEndpoint, serve
from netwatch.monitor.metrics import MonitorMetrics
from probes import ProbeResult

TOKEN = "s3cret-token-for-tests"
STATUS = {"site": {"id": "httpd-site"}, "targets": {"gw": {"state": "up"}}}
FAST = Limits(head_timeout=0.5, idle_timeout=0.5, write_timeout=0.5, connections=3)


def site_registry(targets: int = 50) -> tuple[CollectorRegistry, list[FastCollector]]:
    registry = CollectorRegistry()
    metrics = MonitorMetrics(registry, "httpd-site", "1.2.3")
    for i in range(targets):
        series = metrics.children(f"t{i:03d}", "tcp")
        result = ProbeResult(type="tcp", target="x", success=True, latency=i / 1000)
        metrics.observe_probe(series, result)
        metrics.set_state(series, "up", changed=True)
    return registry, [metrics.targets]


@asynccontextmanager
async def site(
    token: str | None = None,
    limits: Limits | None = None,
    fast: list[FastCollector] | None = None,
    status: Any = None,
) -> AsyncIterator[tuple[int, CollectorRegistry, list[FastCollector]]]:
    registry, collectors = site_registry()
    collectors = fast if fast is not None else collectors
    port = free_tcp_port()
    app = SiteEndpoint(registry, status or (lambda: STATUS), collectors, token=token, limits=limits)
    async with serve(app, f"127.0.0.1:{port}"):
        yield port, registry, collectors


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}"


async def test_metrics_are_streamed_chunked_with_the_prometheus_type() -> None:
    async with site() as (port, registry, fast):
        [(status, headers, body)] = replies(await exchange(port, request("/metrics")))
        assert status == 200
        assert headers["content-type"] == CONTENT_TYPE_LATEST
        assert headers["transfer-encoding"] == "chunked"
        assert headers["vary"] == "Accept-Encoding"
        assert "content-encoding" not in headers
        assert body == await render(registry, fast)
        assert b'netwatch_link_up{site="httpd-site",target="t049"' in body


async def test_gzip_body_decompresses_to_exactly_the_plain_body() -> None:
    async with site() as (port, _, _):
        [plain] = replies(await exchange(port, request("/metrics")))
        [zipped] = replies(
            await exchange(port, request("/metrics", "GET", "Accept-Encoding: gzip, deflate"))
        )
        assert zipped[1]["content-encoding"] == "gzip"
        assert zipped[1]["vary"] == "Accept-Encoding"
        assert len(zipped[2]) < len(plain[2]) / 5
        assert gzip.decompress(zipped[2]) == plain[2]
        [identity] = replies(
            await exchange(port, request("/metrics", "GET", "Accept-Encoding: identity"))
        )
        assert "content-encoding" not in identity[1]


async def test_head_sends_the_headers_of_get_and_no_body() -> None:
    async with site() as (port, _, _):
        raw = await exchange(
            port, request("/metrics", "HEAD", "Accept-Encoding: gzip") + request("/healthz")
        )
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Encoding: gzip" in head
        assert b"Transfer-Encoding: chunked" in head
        # The next answer follows right after the head: no body, not even a last chunk.
        [(status, _, body)] = replies(rest)
        assert (status, json.loads(body)) == (200, {"ok": True})
        raw = await exchange(port, request("/api/v1/status", "HEAD"))
        head, _, rest = raw.partition(b"\r\n\r\n")
        assert f"Content-Length: {len(json.dumps(STATUS))}".encode() in head
        assert rest == b""


async def test_metrics_and_status_need_the_token_health_does_not() -> None:
    async with site(token=TOKEN) as (port, registry, fast):
        for path in ("/metrics", "/api/v1/status"):
            for header in ((), ("Authorization: Basic eDp5",), (bearer(TOKEN + "x"),)):
                [(status, headers, body)] = replies(
                    await exchange(port, request(path, "GET", *header))
                )
                assert status == 401, (path, header)
                assert headers["www-authenticate"] == 'Bearer realm="netwatch"'
                assert json.loads(body) == {"error": "unauthorized"}
        [(status, _, body)] = replies(
            await exchange(port, request("/metrics", "GET", bearer(TOKEN)))
        )
        assert (status, body) == (200, await render(registry, fast))
        [(status, _, body)] = replies(
            await exchange(port, request("/api/v1/status", "GET", bearer(TOKEN)))
        )
        assert (status, json.loads(body)) == (200, STATUS)
        [(status, _, body)] = replies(await exchange(port, request("/healthz")))
        assert (status, json.loads(body)) == (200, {"ok": True})


async def aiohttp_answers(
    token: str, calls: Iterable[tuple[str, str, dict[str, str]]]
) -> list[Any]:
    """What the aiohttp endpoint answers to ``calls`` (method, path, headers)."""
    registry, fast = site_registry()
    listen = f"127.0.0.1:{free_tcp_port()}"
    out = []
    async with (
        aiohttp_site(registry, lambda: STATUS, fast, listen, token=token),
        aiohttp.ClientSession() as session,
    ):
        for method, path, headers in calls:
            async with session.request(method, f"http://{listen}{path}", headers=headers) as r:
                out.append(answer(r.status, dict(r.headers), await r.read()))
    return out


def answer(status: int, headers: dict[str, str], body: bytes) -> Any:
    lower = {k.lower(): v for k, v in headers.items()}
    allow = sorted(m.strip() for m in lower.get("allow", "").split(",") if m.strip())
    kept = ("content-type", "www-authenticate")
    return status, {k: lower[k] for k in kept if k in lower}, allow, body


async def test_answers_are_those_of_the_aiohttp_endpoint() -> None:
    calls = [
        ("GET", "/api/v1/status", {}),
        ("GET", "/api/v1/status", {"Authorization": "Bearer nope"}),
        ("GET", "/api/v1/status", {"Authorization": f"bearer  {TOKEN} "}),
        ("GET", "/metrics", {"Authorization": f"Token {TOKEN}"}),
        ("GET", "/healthz", {}),
        ("GET", "/nothing/here", {}),
        ("DELETE", "/metrics", {}),
        ("OPTIONS", "/healthz", {}),
    ]
    expected = await aiohttp_answers(TOKEN, calls)
    async with site(token=TOKEN) as (port, _, _):
        for (method, path, headers), want in zip(calls, expected, strict=True):
            extra = [f"{k}: {v}" for k, v in headers.items()]
            [got] = replies(await exchange(port, request(path, method, *extra)))
            assert answer(*got) == want, (method, path)


async def test_a_request_target_in_absolute_form_is_routed_by_its_path() -> None:
    async with site() as (port, _, _):
        raw = request(f"http://127.0.0.1:{port}/healthz?probe=1") + request("/healthz?x=%20")
        assert [status for status, _, _ in replies(await exchange(port, raw))] == [200, 200]


async def test_unknown_path_is_404_and_other_methods_405_with_allow() -> None:
    async with site() as (port, _, _):
        raw = await exchange(
            port, request("/nope") + request("/metrics", "PUT", "Content-Length: 0")
        )
        [(missing, _, _), (refused, headers, _)] = replies(raw)
        assert (missing, refused) == (404, 405)
        assert headers["allow"] == "GET, HEAD"


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with site() as (port, registry, fast):
        paths = ["/healthz", "/api/v1/status", "/nope", "/metrics", "/healthz"]
        raw = await exchange(port, b"".join(request(p) for p in paths))
        got = replies(raw)
        assert [status for status, _, _ in got] == [200, 200, 404, 200, 200]
        assert json.loads(got[1][2]) == STATUS
        assert got[3][2] == await render(registry, fast)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /metrics HTTP/1.1\nHost: x\n\n",  # bare LF
        b"GARBAGE\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET /me trics HTTP/1.1\r\n\r\n",
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS client hello
    ],
)
async def test_a_malformed_request_is_400_then_closed(raw: bytes) -> None:
    async with site() as (port, _, _):
        # Not half-closed: the server must close by itself.
        data = await exchange(port, request("/healthz") + raw, half_close=False)
        [(ok, _, _), (status, headers, _)] = replies(data)
        assert (ok, status) == (200, 400)
        assert headers["connection"] == "close"


async def test_a_request_body_is_413_then_closed() -> None:
    async with site() as (port, _, _):
        for body in (
            b"Content-Length: 5\r\n\r\nhello",
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ):
            raw = b"POST /metrics HTTP/1.1\r\n" + body + request("/healthz")
            [(status, headers, _)] = replies(await exchange(port, raw, half_close=False))
            assert status == 413
            assert headers["connection"] == "close"


async def test_oversized_headers_are_431_then_closed() -> None:
    async with site() as (port, _, _):
        many = [f"X-Filler-{i}: {'v' * 100}" for i in range(200)]
        [(status, headers, _)] = replies(
            await exchange(port, request("/metrics", "GET", *many), half_close=False)
        )
        assert (status, headers["connection"]) == (431, "close")
        # One header that never ends, sent in pieces: httptools would buffer it all.
        # The server stops reading and closes: the client's next writes are refused.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nX-Long: ")
        with pytest.raises(ConnectionError):
            await trickle(writer, 64)
        writer.close()


async def trickle(writer: asyncio.StreamWriter, kib: int) -> None:
    """Send ``kib`` KiB of header value, a KiB every 10 ms."""
    for _ in range(kib):
        writer.write(b"a" * 1024)
        await writer.drain()
        await asyncio.sleep(0.01)


async def test_every_answer_carries_a_date() -> None:
    async with site() as (port, _, _):
        raw = await exchange(port, request("/healthz") + request("/nope") + request("/metrics"))
        for _, headers, _ in replies(raw):
            sent = parsedate_to_datetime(headers["date"])
            assert abs(sent.timestamp() - time.time()) < 5


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async with site() as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(request("/healthz"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert b"Connection: close" not in head
            assert await reader.readexactly(len(b'{"ok": true}')) == b'{"ok": true}'
            await asyncio.sleep(0.1)
        writer.close()


async def test_connection_close_and_http_1_0_are_honoured() -> None:
    async with site() as (port, registry, fast):
        data = await exchange(
            port, request("/healthz", "GET", "Connection: close"), half_close=False
        )
        [(status, headers, _)] = replies(data)
        assert (status, headers["connection"]) == (200, "close")
        # HTTP/1.0 gets no chunked encoding: the body ends with the connection.
        data = await exchange(port, request("/metrics", version="1.0"), half_close=False)
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding" not in head
        assert b"Connection: close" in head
        assert body == await render(registry, fast)


async def test_slow_and_idle_clients_are_disconnected() -> None:
    async with site(limits=FAST) as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 1")  # and never the end of the head
        assert await read_to_end(reader) == b""
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("/healthz"))
        [(status, _, _)] = replies(await read_to_end(reader))
        assert status == 200  # answered, then closed once idle
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await read_to_end(reader) == b""  # connected and said nothing
        writer.close()


class Flood:
    """A fast collector with a body far larger than the socket buffers."""

    muted = False

    def render_slices(self) -> Iterable[list[str]]:
        line = "# " + "x" * 1000 + "\n"
        for _ in range(400):
            yield [line] * 64


async def test_a_client_that_does_not_read_is_dropped() -> None:
    async with site(limits=FAST, fast=[Flood()]) as (port, _, _):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        with capture_logs() as logs:
            writer.write(request("/metrics"))
            await asyncio.sleep(2)  # write_timeout is 0.5 s
        assert any(e["event"] == "http_client_too_slow" for e in logs), logs
        assert len(await read_to_end(reader)) < 400 * 64 * 1003  # cut short
        writer.close()


async def test_open_connections_are_capped() -> None:
    async with site(limits=Limits(connections=2)) as (port, _, _):
        held = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request("/healthz"))
            await asyncio.wait_for(reader.readuntil(b'{"ok": true}'), 5)
            held.append(writer)
        [(status, headers, _)] = replies(
            await exchange(port, request("/healthz"), half_close=False)
        )
        assert (status, headers["connection"]) == (503, "close")
        held.pop().close()
        await asyncio.sleep(0.2)
        [(status, _, _)] = replies(await exchange(port, request("/healthz")))
        assert status == 200
        for writer in held:
            writer.close()


async def test_a_failing_handler_is_500_without_traceback_and_logged() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("status exploded")

    async with site(status=broken) as (port, _, _):
        with capture_logs() as logs:
            data = await exchange(port, request("/api/v1/status") + request("/healthz"))
        [(status, _, body), (after, _, _)] = replies(data)
        assert (status, after) == (500, 200)  # the connection survives
        assert b"exploded" not in body
        assert b"Traceback" not in body
        [failed] = [e for e in logs if e["event"] == "http_request_failed"]
        assert failed["log_level"] == "error"
        assert failed["path"] == "/api/v1/status"


async def test_leaving_serve_closes_kept_alive_connections() -> None:
    async with site() as (port, _, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request("/healthz"))
        await asyncio.wait_for(reader.readuntil(b'{"ok": true}'), 5)
    assert await read_to_end(reader) == b""
    writer.close()


async def test_more_pipelined_requests_than_are_read_ahead_are_all_answered() -> None:
    async with site(limits=Limits(pipeline=4)) as (port, _, _):
        paths = [f"/healthz?n={i}" if i % 3 else "/nope" for i in range(40)]
        got = replies(await exchange(port, b"".join(request(p) for p in paths)))
        assert [status for status, _, _ in got] == [200 if i % 3 else 404 for i in range(40)]


async def test_an_upgrade_request_is_answered_then_closed() -> None:
    async with site() as (port, _, _):
        raw = request("/healthz", "GET", "Connection: upgrade", "Upgrade: websocket")
        [(status, _, _)] = replies(
            await exchange(port, raw + request("/healthz"), half_close=False)
        )
        assert status == 200  # and nothing more: the connection closed


class Failing:
    """A fast collector that breaks after its first slice."""

    muted = False

    def render_slices(self) -> Iterable[list[str]]:
        yield ["# first slice\n"]
        raise RuntimeError("renderer broke")


async def test_a_renderer_failing_mid_body_cuts_the_body_and_is_logged() -> None:
    async with site(fast=[Failing()]) as (port, _, _):
        with capture_logs() as logs:
            data = await exchange(port, request("/metrics"))
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert not body.endswith(b"0\r\n\r\n")  # no last chunk: the scraper sees a broken body
        assert b"renderer broke" not in data
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["http_stream_failed"]


class BrokenCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        raise RuntimeError("collector broke")


async def test_a_failing_collector_is_a_500() -> None:
    async with site() as (port, registry, _):
        registry.register(BrokenCollector())
        with capture_logs() as logs:
            [(status, _, body)] = replies(await exchange(port, request("/metrics")))
        assert status == 500
        assert b"collector broke" not in body
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["http_request_failed"]
