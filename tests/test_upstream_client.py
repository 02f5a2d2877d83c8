"""The proxy's own upstream client (``netwatch.proxy.upstream``) against real loopback
sockets: scripted raw HTTP servers (exact bytes both ways), an aiohttp server with TLS, and
the fault relay. Each test names the behaviour the forwarder relies on."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from helpers.relay import FaultRelay
from helpers.servers import free_port, run_http_server
from multidict import CIMultiDict

from netwatch.config.schema import Proxy
from netwatch.proxy.forward import Forwarder
from netwatch.proxy.upstream import ResponseCut, Sending, UpstreamClient, UpstreamFailure
from netwatch.proxy.upstream_exchange import MAX_HEAD

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RawServer:
    """A loopback TCP server running ``script`` per connection; counts connections and
    keeps every request head it read with ``read_head``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def read_head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                await reader.readexactly(int(line.split(b":")[1]))
        return head


@asynccontextmanager
async def raw_server(script: Callable[[RawServer], Script]) -> AsyncIterator[RawServer]:
    server = RawServer(lambda r, w: asyncio.sleep(0))
    server.script = script(server)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield server


def answers(*responses: bytes, then_close: bool = False) -> Callable[[RawServer], Script]:
    """Per connection: read a request, send the next response, for each response."""

    def script(server: RawServer) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for response in responses:
                await server.read_head(reader)
                writer.write(response)
                await writer.drain()
            if not then_close:
                await reader.read()  # keep the connection open until the client closes it

        return run

    return script


def in_turn(*responses: bytes) -> Callable[[RawServer], Script]:
    """Answer requests with ``responses`` in turn, whichever connection they come on."""
    pending = list(responses)

    def script(server: RawServer) -> Script:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while pending:
                await server.read_head(reader)
                writer.write(pending.pop(0))
                await writer.drain()
            await reader.read()

        return run

    return script


async def fetch(
    client: UpstreamClient,
    method: str = "GET",
    body: bytes | None = None,
    headers: tuple[tuple[str, str], ...] = (),
    *,
    timeout: float = 5.0,
) -> tuple[int, CIMultiDict[str], bytes]:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        response = await client.request(
            method, "/x", headers, body, sending=Sending(), deadline=loop.time() + timeout
        )
        try:
            return response.status, response.headers, await response.read()
        finally:
            response.release()


def client_for(port: int, **kwargs: Any) -> UpstreamClient:
    return UpstreamClient(f"http://127.0.0.1:{port}", connect_timeout=1.0, **kwargs)


async def test_a_connection_is_reused_for_the_next_request() -> None:
    async with raw_server(answers(OK, OK, OK)) as server, client_for(server.port) as client:
        for _ in range(3):
            assert (await fetch(client))[0] == 200
    assert server.connections == 1


async def test_the_request_carries_only_the_given_headers_and_its_own_framing() -> None:
    async with raw_server(answers(OK, OK, OK)) as server, client_for(server.port) as client:
        await fetch(client, "GET", None, (("X-Station", "s-1"), ("Host", "station.local")))
        await fetch(client, "POST", b'{"a": 1}', (("Content-Length", "999"),))
        await fetch(client, "DELETE")
    get, post, delete = (head.decode() for head in server.heads)
    port = server.port
    assert get == f"GET /x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Station: s-1\r\n\r\n"
    assert post == f"POST /x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 8\r\n\r\n"
    assert delete == f"DELETE /x HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n"


async def test_a_stream_of_known_length_goes_out_with_that_length_not_chunked() -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b"defg"

    async with raw_server(answers(OK)) as server, client_for(server.port) as client:
        loop = asyncio.get_running_loop()
        response = await client.request(
            "PUT", "/x", (), parts(), sending=Sending(), deadline=loop.time() + 5, length=7
        )
        assert (response.status, await response.read()) == (200, b"ok")
        response.release()
    assert server.heads[0].endswith(b"\r\nContent-Length: 7\r\n\r\n")
    assert b"Transfer-Encoding" not in server.heads[0]


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    async with raw_server(answers(OK)) as server, client_for(server.port) as client:
        with pytest.raises(UpstreamFailure) as caught:
            await fetch(client, headers=(("X-A", "1\r\nX-Injected: 2"),))
    assert not caught.value.in_doubt
    assert server.connections == 0


async def test_chunked_and_close_delimited_bodies_are_read_whole() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    until_close = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it, then the close"
    async with (
        raw_server(answers(chunked, until_close, then_close=True)) as server,
        client_for(server.port) as client,
    ):
        assert (await fetch(client))[2] == b"hello world"
        assert (await fetch(client))[2] == b"all of it, then the close"
        # The close-delimited answer used the connection up: the next request opens another.
        assert (await fetch(client))[2] == b"hello world"
    assert server.connections == 2


async def test_head_204_and_304_answers_have_no_body_and_interim_answers_are_skipped() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    no_content = b"HTTP/1.1 204 No Content\r\n\r\n"
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + OK
    async with (
        raw_server(in_turn(head, no_content, hints)) as server,
        client_for(server.port) as client,
    ):
        status, headers, body = await fetch(client, "HEAD")
        assert (status, headers["Content-Length"], body) == (200, "1000", b"")
        assert (await fetch(client))[::2] == (204, b"")
        status, headers, body = await fetch(client)
        assert (status, body, "Link" in headers) == (200, b"ok", False)
    # After a HEAD the connection is not trusted again (its announced body never comes).
    assert server.connections == 2


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 2OO OK\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
    ],
)
async def test_a_malformed_answer_is_a_clean_failure_in_doubt(garbage: bytes) -> None:
    async with (
        raw_server(answers(garbage, then_close=True)) as server,
        client_for(server.port) as client,
    ):
        with pytest.raises(UpstreamFailure) as caught:
            await fetch(client)
    assert caught.value.reason == "upstream error: malformed response"
    assert caught.value.in_doubt  # the request went out: it may have been applied
    assert not caught.value.retryable_now


async def test_an_oversized_response_head_is_refused() -> None:
    huge = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * (2 * MAX_HEAD) + b"\r\n\r\n"
    async with raw_server(answers(huge)) as server, client_for(server.port) as client:
        with pytest.raises(UpstreamFailure) as caught:
            await fetch(client)
    assert caught.value.reason == "upstream error: response head too large"


async def test_a_body_cut_mid_way_is_a_response_cut() -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000
    async with (
        raw_server(answers(cut, then_close=True)) as server,
        client_for(server.port) as client,
    ):
        with pytest.raises(ResponseCut):
            await fetch(client)


async def test_a_connection_closed_before_the_answer_is_retryable_and_in_doubt() -> None:
    def script(server: RawServer) -> Script:
        async def run(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
            await server.read_head(reader)

        return run

    async with raw_server(script) as server, client_for(server.port) as client:
        with pytest.raises(UpstreamFailure) as caught:
            await fetch(client)
    assert (caught.value.reason, caught.value.retryable_now) == ("disconnected", True)
    assert caught.value.in_doubt


async def test_refused_is_not_in_doubt() -> None:
    async with client_for(free_port()) as client:
        with pytest.raises(UpstreamFailure) as caught:
            await fetch(client)
    assert (caught.value.reason, caught.value.in_doubt) == ("connection refused", False)


async def test_large_bodies_stream_both_ways_through_a_slow_reader() -> None:
    seen: dict[str, str] = {}
    payload = bytes(range(256)) * 16384  # 4 MiB

    async def echo(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen["sha"] = hashlib.sha256(body).hexdigest()
        seen["te"] = request.headers.get("Transfer-Encoding", "")
        response = web.StreamResponse()
        await response.prepare(request)
        for i in range(0, len(payload), 65536):
            await response.write(payload[i : i + 65536])
        await response.write_eof()
        return response

    async def upload() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]

    app = web.Application(client_max_size=64 * 1024**2)
    app.router.add_post("/x", echo)
    loop = asyncio.get_running_loop()
    async with run_http_server(app) as url, UpstreamClient(url, connect_timeout=1.0) as client:
        response = await client.request(
            "POST", "/x", (), upload(), sending=Sending(), deadline=loop.time() + 30
        )
        received = bytearray()
        while chunk := await response.read_chunk():
            received += chunk
            await asyncio.sleep(0)  # a reader slower than the socket: reading pauses
        response.release()
    assert seen == {"sha": hashlib.sha256(payload).hexdigest(), "te": "chunked"}
    assert bytes(received) == payload


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_upstream_with_a_private_ca(ca: trustme.CA, tmp_path: Path) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="over tls")

    app = web.Application()
    app.router.add_get("/x", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        url = f"https://127.0.0.1:{port}"
        async with UpstreamClient(url, connect_timeout=2.0, ca_file=str(ca_file)) as client:
            assert (await fetch(client))[::2] == (200, b"over tls")
            assert client.host_header == f"127.0.0.1:{port}"
        # Without the CA the handshake fails: nothing was sent.
        async with UpstreamClient(url, connect_timeout=2.0) as client:
            with pytest.raises(UpstreamFailure) as caught:
                await fetch(client)
        assert (caught.value.reason, caught.value.in_doubt) == ("connect failed", False)
    finally:
        await runner.cleanup()


# --- through the Forwarder: retries, deadlines, abandon --------------------------------------


def forwarder(upstream: str, tmp_path: Path, **overrides: Any) -> Forwarder:
    data: dict[str, Any] = {
        "upstream": upstream,
        "queue": {"path": str(tmp_path / "q.db")},
        "connect_timeout": "1s",
        "request_timeout": "5s",
        **overrides,
    }
    return Forwarder(Proxy.model_validate(data))


def stale_second_request(server: RawServer) -> Script:
    """The first connection answers once, then closes on reading the next request without
    answering it (a keep-alive connection the upstream dropped); later ones answer."""

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = server.connections == 1
        await server.read_head(reader)
        writer.write(OK)
        await writer.drain()
        if first:
            await server.read_head(reader)
            return
        await reader.read()

    return run


@pytest.mark.parametrize("idempotent", [True, False])
async def test_a_dead_pooled_connection_is_retried_once_only_when_idempotent(
    tmp_path: Path, idempotent: bool
) -> None:
    async with (
        raw_server(stale_second_request) as server,
        forwarder(f"http://127.0.0.1:{server.port}", tmp_path) as fwd,
    ):
        first = await fwd.send("POST", "/x", CIMultiDict(), b"1", idempotent=idempotent)
        await first.read()
        first.release()
        if idempotent:
            second = await fwd.send("POST", "/x", CIMultiDict(), b"2", idempotent=True)
            assert (second.status, await second.read()) == (200, b"ok")
            second.release()
        else:
            with pytest.raises(UpstreamFailure) as caught:
                await fwd.send("POST", "/x", CIMultiDict(), b"2")
            assert (caught.value.reason, caught.value.in_doubt) == ("disconnected", True)
    # Sent twice (once on the dead connection, once fresh) only when that is harmless.
    assert len(server.heads) == (3 if idempotent else 2)


async def test_a_black_holed_request_times_out_in_doubt_and_abandon_ends_it_at_once(
    tmp_path: Path,
) -> None:
    async with raw_server(answers(OK)) as server, FaultRelay("127.0.0.1", server.port) as relay:
        async with forwarder(relay.url, tmp_path, request_timeout="300ms") as fwd:
            relay.mode = "blackhole"
            with pytest.raises(UpstreamFailure) as caught:
                await fwd.send("GET", "/x", CIMultiDict(), None)
            assert (caught.value.reason, caught.value.in_doubt) == ("timeout", True)

        async with forwarder(relay.url, tmp_path, queue_after="10s") as fwd:
            task = asyncio.create_task(
                fwd.send("POST", "/x", CIMultiDict(), b"{}", abandonable=True)
            )
            await asyncio.sleep(0.2)
            fwd.abandon_waiting()
            with pytest.raises(UpstreamFailure) as caught:
                await asyncio.wait_for(task, 2)
            assert caught.value.abandoned
            assert caught.value.in_doubt  # connected (the relay accepted): maybe sent


async def test_the_upstream_path_prefixes_the_station_path(tmp_path: Path) -> None:
    async with raw_server(answers(OK)) as server:
        url = f"http://127.0.0.1:{server.port}/popdb/v1/"
        async with forwarder(url, tmp_path) as fwd:
            response = await fwd.send("GET", fwd.target("/api/a%20b", "q=1"), CIMultiDict(), None)
            response.release()
    assert server.heads[0].startswith(b"GET /popdb/v1/api/a%20b?q=1 HTTP/1.1\r\n")


async def test_request_timeout_also_bounds_a_body_that_stalls(tmp_path: Path) -> None:
    stalled = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
    async with (
        raw_server(answers(stalled)) as server,
        forwarder(f"http://127.0.0.1:{server.port}", tmp_path, request_timeout="300ms") as fwd,
    ):
        response = await fwd.send("GET", "/x", CIMultiDict(), None)
        with pytest.raises(ResponseCut) as caught:
            await asyncio.wait_for(response.read(), 3)
        response.release()
    assert caught.value.reason == "timeout"
