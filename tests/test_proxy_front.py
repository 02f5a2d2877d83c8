"""The proxy's fast front (``netwatch/proxy/front.py``) beside the aiohttp app it hands odd
requests to: the same bytes sent to a proxy with ``fast_path: true`` and to one with
``fast_path: false`` must get the same answers, and the upstream must see the same requests.

Real sockets on loopback, raw bytes written as they are (no client library tidies them up).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers.rawhttp import replies, talk
from helpers.servers import free_port, run_http_server, wait_until
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from netwatch.config.schema import Proxy
from netwatch.events import EventHub
from netwatch.proxy.station import StationProxy
from netwatch.proxy.wire import HEAD_END, HeadScan, not_plain

MAX_BODY = 4096
WRITE = "/api/applications"


def post(body: bytes = b'{"citizen_id": "1"}', *extra: str, path: str = WRITE) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *extra, f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def get(path: str, *extra: str, version: str = "1.1") -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/{version}", "Host: 127.0.0.1", *extra, "", ""])).encode()


# Every shape of bad input the aiohttp path refuses, and a few odd ones it takes: the fast
# front must hand each over untouched (same answer, same upstream traffic, no smuggling).
BAD_INPUT: dict[str, bytes] = {
    "garbage": b"GARBAGE\r\n\r\n",
    "space in target": post(path="/api/appl ications"),
    "unknown version": post().replace(b"HTTP/1.1", b"HTTP/9.9", 1),
    "duplicate content-length": post(b"{}x", "Content-Length: 2"),
    "same content-length twice": post(b"{}", "Content-Length: 2"),
    "content-length list": post(b"{}").replace(b"Content-Length: 2", b"Content-Length: 2, 2"),
    "non-numeric content-length": post(b"{}").replace(b"Length: 2", b"Length: nope"),
    "negative content-length": post(b"{}").replace(b"Length: 2", b"Length: -1"),
    "signed content-length": post(b"{}").replace(b"Length: 2", b"Length: +2"),
    "CL.TE smuggling": (
        b"POST /api/applications HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    ),
    "TE.CL smuggling": (
        b"POST /api/applications HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n5c\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n0\r\n\r\n"
    ),
    "transfer-encoding xchunked": (
        b"POST /api/applications HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    ),
    "transfer-encoding chunked, identity": (
        b"POST /api/applications HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity"
        b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ),
    "transfer-encoding twice": (
        b"POST /api/applications HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: identity\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ),
    "space before the colon": post(b"{}", "Transfer-Encoding : chunked"),
    "folded transfer-encoding": post(b"{}", "Transfer-Encoding:\r\n chunked"),
    "tab before the value (valid)": (
        b"POST /api/applications HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    ),
    "upper-case CHUNKED (valid)": (
        b"POST /api/applications HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: CHUNKED\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    ),
    "bare LF": b"POST /api/applications HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}",
    "one bare LF": post(b"{}").replace(b"Host: 127.0.0.1\r\n", b"Host: 127.0.0.1\n"),
    "bare CR": post(b"{}").replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r"),
    "NUL in a value": post(b"{}", "X-A: a\x00b"),
    "header without colon": post(b"{}", "Broken"),
    "space in a name": post(b"{}", "X A: b"),
    "UTF-8 in the target": post(path="/api/applications/\u00e9"),
    "header line over 8 KiB": post(b"{}", "X-Big: " + "a" * 9000),
    "head over 16 KiB": post(b"{}", *(f"X-F-{i}: {'v' * 100}" for i in range(200))),
    "body over max_body": post(b"x" * (MAX_BODY + 1)),
    "chunked body over max_body": (
        b"POST /api/applications HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{MAX_BODY + 1:x}\r\n".encode()
        + b"x" * (MAX_BODY + 1)
        + b"\r\n0\r\n\r\n"
    ),
    "TLS client hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "absolute-form target": post(path="http://elsewhere.invalid/api/applications"),
    "dot segments": post(path="/api/../api/applications"),
    "percent-escapes": post(path="/api/%61pplications"),
    "Expect: 100-continue": post(b"{}", "Expect: 100-continue"),
    "Host twice": post(b"{}", "Host: elsewhere.invalid"),
    "Content-Type twice": post(b"{}", "Content-Type: a/b", "Content-Type: c/d"),
    "User-Agent twice": post(b"{}", "User-Agent: a", "User-Agent: b"),
    "no Host in HTTP/1.1": b"POST /api/applications HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    "129 headers": post(b"{}", *(f"X-{i}: v" for i in range(128))),
    "Sec-WebSocket-Key1": post(b"{}", "Sec-WebSocket-Key1: 1"),
    "gzip-encoded body (valid)": post(gzip.compress(b"{}"), "Content-Encoding: gzip"),
    "a list header twice (valid)": post(b"{}", "Accept: a/b", "Accept: c/d"),
    "HTTP/1.0 plain": post(b"{}").replace(b"HTTP/1.1", b"HTTP/1.0", 1),
}
# Must never reach the upstream as a request, on either path.
REFUSED = {
    name
    for name in BAD_INPUT
    if "valid" not in name
    and name
    not in {
        "absolute-form target",
        "dot segments",
        "percent-escapes",
        "Expect: 100-continue",
        "HTTP/1.0 plain",
    }
}


class Upstream:
    """Records what reaches it; a few paths answer in shapes the relay must keep."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []  # method, raw path, body digest

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append((request.method, request.raw_path, hashlib.sha1(body).hexdigest()[:8]))
        path = request.path
        if path == "/big":  # 1 MiB with a length, streamed in parts
            response = web.StreamResponse(headers={"X-Up": "big", "Content-Type": "text/plain"})
            response.content_length = 16 * 65536
            await response.prepare(request)
            for i in range(16):
                await response.write(bytes([65 + i]) * 65536)
            await response.write_eof()
            return response
        if path == "/chunked":  # no length: chunked
            response = web.StreamResponse(headers={"X-Up": "chunked", "Content-Type": "a/b"})
            await response.prepare(request)
            for part in (b"one,", b"two,", b"three"):
                await response.write(part)
                await asyncio.sleep(0.01)
            await response.write_eof()
            return response
        if path == "/none":
            return web.Response(status=204, headers={"X-Up": "none"})
        if path == "/slow":
            await asyncio.sleep(0.3)
        echo = {"method": request.method, "path": request.raw_path, "bytes": len(body)}
        return web.json_response(echo, status=201 if request.method == "POST" else 200)


@asynccontextmanager
async def one_proxy(
    tmp_path: Path, upstream: str, name: str = "proxy", **overrides: Any
) -> AsyncIterator[StationProxy]:
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "upstream": upstream,
        "queue": {"path": str(tmp_path / f"{name}.db")},
        "max_body": MAX_BODY,
        "request_timeout": "5s",
        **overrides,
    }
    proxy = StationProxy(
        Proxy.model_validate(data), "f1", CollectorRegistry(), EventHub(), lambda: False, None
    )
    async with proxy:
        yield proxy


@asynccontextmanager
async def proxies(tmp_path: Path, upstream: str) -> AsyncIterator[tuple[int, int]]:
    """Two proxies on the same upstream: (fast front, aiohttp only)."""
    async with (
        one_proxy(tmp_path, upstream, "fast", fast_path=True) as fast,
        one_proxy(tmp_path, upstream, "plain", fast_path=False) as plain,
    ):
        yield fast.port, plain.port


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    recorder = Upstream()
    async with run_http_server(recorder.app(), auto_decompress=False) as url:  # bodies raw
        yield recorder, url


def comparable(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses, without the headers that differ by the second they were sent (one
    whose body ends with the connection is taken as it came: the parser waits for more)."""
    parsed = replies(data)
    if not parsed and data:
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines)
        parsed = [(int(status_line.split()[1]), {k.lower(): v for k, v in fields.items()}, body)]
    out = []
    for status, headers, body in parsed:
        kept = {k: v for k, v in headers.items() if k not in {"date"}}
        out.append((status, kept, body))
    return out


async def test_bad_input_gets_the_aiohttp_answer_and_never_reaches_the_upstream(
    tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    """Every case on its own connection, to both proxies; all differences reported at once."""
    recorder, url = upstream
    problems = []
    async with proxies(tmp_path, url) as (fast, plain):
        for name, raw in BAD_INPUT.items():
            results = []
            for port in (fast, plain):
                recorder.seen.clear()
                data, closed = await talk(port, raw)
                await asyncio.sleep(0.05)  # a forward, if any, has reached the upstream
                results.append((comparable(data), closed, list(recorder.seen)))
            answers, _, seen = results[1]
            statuses = [status for status, _, _ in answers]
            if results[0] != results[1]:
                problems.append(f"{name}: fast {results[0]} != aiohttp {results[1]}")
            elif any("smuggled" in path for _, path, _ in seen):
                problems.append(f"{name}: a smuggled request reached the upstream: {seen}")
            elif name in REFUSED and (seen or statuses not in ([400], [413])):
                problems.append(f"{name}: not refused: {statuses}, upstream saw {seen}")
    assert not problems, "\n".join(problems)


async def test_relayed_answers_are_the_same_on_both_fronts(
    tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    """A big answer with a length, a chunked one, a 204, JSON, to 1.1 and 1.0 stations."""
    _, url = upstream
    cases = [
        get("/big"),
        get("/chunked"),
        get("/chunked", version="1.0"),
        get("/none"),
        get("/lookup/1", "Accept: application/json"),
        post(b'{"a": 1}', "Netwatch-Order-Key: s1"),
        get("/lookup/2", "Connection: close"),
        get("/lookup/3", "Connection: keep-alive", version="1.0"),
    ]
    async with proxies(tmp_path, url) as (fast, plain):
        for raw in cases:
            fast_data, fast_closed = await talk(fast, raw)
            plain_data, plain_closed = await talk(plain, raw)
            got, expected = comparable(fast_data), comparable(plain_data)
            assert [s for s, _, _ in got] == [s for s, _, _ in expected], raw
            (_, fast_headers, fast_body), (_, plain_headers, plain_body) = got[0], expected[0]
            assert fast_body == plain_body, raw
            if "content-type" not in fast_headers and fast_body:
                # aiohttp invents one for a body the upstream sent without it; the fast
                # front relays what the upstream sent. Every other header is the same.
                assert plain_headers.pop("content-type") == "application/octet-stream"
            assert fast_headers == plain_headers, raw
            assert fast_closed == plain_closed, raw


async def test_an_encoded_body_reaches_the_upstream_as_the_station_sent_it(
    tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    """Forwarded on both fronts, and queued then replayed: no front decodes a body."""
    recorder, url = upstream
    body = gzip.compress(b'{"citizen_id": "079201001234"}')
    digest = hashlib.sha1(body).hexdigest()[:8]
    raw = post(body, "Content-Encoding: gzip", "Content-Type: application/json")
    async with proxies(tmp_path, url) as (fast, plain):
        for port in (fast, plain):
            data, _ = await talk(port, raw)
            assert [status for status, _, _ in replies(data)] == [201]
    async with one_proxy(tmp_path, url, replay={"rate": "100/s"}) as proxy:
        proxy.override("offline")
        data, _ = await talk(proxy.port, raw)
        assert [status for status, _, _ in replies(data)] == [202]
        proxy.override("online")
        run = asyncio.get_running_loop().create_task(proxy.run())
        try:
            await wait_until(lambda: len(recorder.seen) == 3, timeout=10)
        finally:
            run.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await run
    assert recorder.seen == [("POST", WRITE, digest)] * 3


async def test_plain_requests_stay_on_the_fast_front_and_odd_ones_hand_over(
    tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    recorder, url = upstream
    async with one_proxy(tmp_path, url) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            for i in range(20):  # keep-alive, one at a time
                writer.write(post(json.dumps({"n": i}).encode()) if i % 2 else get(f"/r/{i}"))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                assert head.startswith(b"HTTP/1.1 20")
            assert proxy.status()["connections"]["handed_over"] == 0
            writer.write(post(b"{}", "Expect: 100-continue"))
            assert b"100 Continue" in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 201")
            assert proxy.status()["connections"]["handed_over"] == 1
        finally:
            writer.close()
    assert len(recorder.seen) == 21


async def test_pipelined_requests_are_answered_in_order_across_a_hand_over(
    tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    recorder, url = upstream
    chunked = (
        b"POST /api/applications HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\n\r\n"
    )
    batch = [get("/slow"), post(b'{"n": 1}'), get("/r/2"), chunked, get("/r/4"), post(b"{}")]
    async with one_proxy(tmp_path, url) as proxy:
        data, closed = await talk(proxy.port, b"".join(batch), quiet=0.5)
    assert not closed
    answers = replies(data)
    assert [status for status, _, _ in answers] == [200, 201, 200, 201, 200, 201]
    paths = [json.loads(body)["path"] for _, _, body in answers]
    assert paths == ["/slow", WRITE, "/r/2", WRITE, "/r/4", WRITE]
    assert [path for _, path, _ in recorder.seen] == paths


async def test_a_body_that_comes_late_is_awaited_and_one_that_never_comes_is_408(
    tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    recorder, url = upstream
    async with one_proxy(tmp_path, url, body_timeout="1s") as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        raw = post(b'{"late": true}')
        split = raw.index(b"\r\n\r\n") + 4
        writer.write(raw[:split])
        await asyncio.sleep(0.3)
        writer.write(raw[split:])
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 201")
        writer.close()
        assert proxy.status()["connections"]["handed_over"] == 0
        data, closed = await talk(proxy.port, raw[: split + 3])
        [(status, headers, body)] = replies(data)
        assert (status, json.loads(body)["error"], closed) == (408, "body_timeout", True)
        assert headers["connection"] == "close"
    assert [path for _, path, _ in recorder.seen] == [WRITE]


async def test_offline_writes_are_queued_and_reads_refused_on_the_fast_front(
    tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    recorder, url = upstream
    async with one_proxy(tmp_path, url) as proxy:
        proxy.override("offline")
        data, _ = await talk(proxy.port, post(b'{"n": 1}', "Netwatch-Order-Key: s1") + get("/r"))
        [(queued, headers, body), (refused, refused_headers, _)] = replies(data)
        assert (queued, refused) == (202, 503)
        ticket = json.loads(body)["ticket"]
        assert headers["netwatch-ticket"] == ticket
        assert headers["location"] == f"/_netwatch/tickets/{ticket}"
        assert refused_headers["retry-after"] == "5"
        assert proxy.status()["connections"]["handed_over"] == 0
    assert recorder.seen == []


async def test_shutdown_closes_kept_alive_fast_connections(
    tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    _, url = upstream
    async with one_proxy(tmp_path, url) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(get("/r/1"))
        await asyncio.wait_for(reader.readuntil(b'"bytes": 0}'), 5)
    # The proxy is gone: its kept-alive connection is closed, not left to a dead app.
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_a_request_in_progress_at_shutdown_is_still_answered(
    tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    _, url = upstream
    async with one_proxy(tmp_path, url) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(get("/slow"))  # the upstream takes 0.3 s; shutdown grants 2 s
        await asyncio.sleep(0.1)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    assert (
        await asyncio.wait_for(reader.read(), 5)
        == b'{"method": "GET", "path": "/slow", "bytes": 0}'
    )
    writer.close()


async def test_a_station_that_hangs_up_still_gets_its_write_forwarded(
    tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    recorder, url = upstream
    async with one_proxy(tmp_path, url) as proxy:
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(post(b'{"n": "gone"}', path="/slow"))
        await writer.drain()
        writer.transport.abort()
        await wait_until(lambda: len(recorder.seen) == 1, timeout=5)
    assert recorder.seen[0][1] == "/slow"


PIECES = [b"GET", b"POST /api/x", b" ", b"/a", b" HTTP/1.1", b"\r\n", b"\r", b"\n", b"X: y",
          b"\x00", b"\xc3\xa9", b"\t", b"GET /r HTTP/1.1\r\n", b"Host: x"]  # fmt: skip


@given(
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=12),
    st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=12),
)
def test_a_head_checked_as_it_trickles_in_is_judged_as_if_it_came_at_once(
    pieces: list[bytes], sizes: list[int]
) -> None:
    data = b"".join(pieces)
    if HEAD_END in data:
        return  # a complete head is judged whole (parse_head)
    scan, buf, plain, at = HeadScan(), bytearray(), True, 0
    for size in sizes * len(data):
        if at >= len(data):
            break
        buf += data[at : at + size]
        at += size
        if not scan.plain(buf):
            plain = False
            break
    # What the scan judged is what not_plain says of the same bytes seen at once (a CR at
    # the very end may still get its LF: it is judged with the next bytes, unless it cannot
    # make the head plain whatever follows).
    seen = bytes(buf)
    trimmed = seen[:-1] if seen.endswith(b"\r") else seen
    if plain:
        assert not not_plain(trimmed)
    else:
        assert not_plain(trimmed) or not_plain(seen + b"\n")


def trickle(port: int, data: bytes) -> bytes:
    """Send ``data`` a byte at a time (until the server closes), then read its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # answered and closed already
                break
            time.sleep(0.002)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


async def test_a_bare_lf_head_trickled_in_is_refused_at_once(
    tmp_path: Path, upstream: tuple[Upstream, str]
) -> None:
    """Not after the header timeout (10 s): a bare-LF head never shows the CRLF blank line."""
    _, url = upstream
    async with one_proxy(tmp_path, url, header_timeout="10s") as proxy:
        started = time.monotonic()
        answer = await asyncio.to_thread(trickle, proxy.port, b"GET /r HTTP/1.1\nHost: x\n\n")
        assert b" 400 " in answer.partition(b"\r\n")[0]
        assert time.monotonic() - started < 3
