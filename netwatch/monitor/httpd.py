"""The site daemon's HTTP endpoint (``/metrics``, ``/healthz``, ``/api/v1/status``) on
asyncio protocols and httptools' request parser, without aiohttp.

Why it exists: a site daemon that probes TCP, ICMP or DNS targets, with no webhook and no
proxy, used aiohttp only to serve these three paths, and aiohttp with what it pulls in
(attrs, multidict, yarl, aiodns, frozenlist, ...) is about 10 MB of a daemon that must stay
under 60 MB with 1,000 targets on old ward PCs. This server answers the same requests with
the same bodies and headers (``/metrics`` is streamed by the same renderer as the aiohttp
handler in ``netwatch.monitor.api``, which the station proxy still mounts).

It is a small HTTP/1.1 server and no more: GET and HEAD only, no request bodies (``413``),
keep-alive with pipelined requests answered in order, ``Connection: close`` honoured,
HTTP/1.0 closed after its answer. A malformed request gets ``400`` and the connection is
closed; a request head over ``Limits.head_bytes`` gets ``431``. Slow clients are bounded by
the time to send a request head, the idle time between keep-alive requests and the time a
blocked write may wait, and the number of open connections is capped.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

import httptools
import structlog
from prometheus_client import CollectorRegistry

from netwatch import auth
from netwatch.config.units import split_listen
from netwatch.httpdate import http_date
from netwatch.monitor.exposition import FastCollector, scrape

log = structlog.get_logger("netwatch.httpd")

StatusProvider = Callable[[], dict[str, Any]]

# Seconds a refused connection (too many open) stays half-open after its 503.
REFUSED_GRACE = 1.0
ALLOWED = "GET, HEAD"
JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may hold: bytes of a request head, seconds to send it, seconds idle
    between keep-alive requests, seconds a write may wait for the client to read; requests
    read ahead of their answers (then reading pauses) and connections open at once."""

    head_bytes: int = 16 * 1024
    head_timeout: float = 10.0
    idle_timeout: float = 30.0
    write_timeout: float = 30.0
    pipeline: int = 16
    connections: int = 64


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case, repeated ones joined with ", "
    keep_alive: bool
    chunked: bool  # the client reads chunked transfer encoding (HTTP/1.1)


@dataclass(frozen=True, slots=True)
class Response:
    """``body`` is either the whole body (sent with ``Content-Length``) or a stream of
    chunks (chunked transfer encoding; to an HTTP/1.0 client, delimited by the close)."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | AsyncIterator[bytes] = b""
    close: bool = False


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, {"Content-Type": JSON, **(headers or {})}, json.dumps(data).encode())


def text_response(status: int, *, close: bool = False, **headers: str) -> Response:
    """A status with its phrase as the body, as aiohttp answers its own errors."""
    body = f"{status}: {HTTPStatus(status).phrase}".encode()
    return Response(status, {"Content-Type": TEXT, **headers}, body, close)


class SiteEndpoint:
    """What the site daemon serves; ``/metrics`` and ``/api/v1/status`` need ``token`` when
    one is set, ``/healthz`` stays open for health checks (it says nothing)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        status: StatusProvider,
        fast: Sequence[FastCollector] = (),
        *,
        token: str | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.registry = registry
        self.status = status
        self.fast = fast
        self.token = token
        self.limits = limits or Limits()
        self._routes: dict[str, tuple[bool, Callable[[Request], Response]]] = {
            "/metrics": (True, self.metrics),
            "/healthz": (False, lambda _: json_response({"ok": True})),
            "/api/v1/status": (True, lambda _: json_response(self.status())),
        }

    def answer(self, request: Request) -> Response:
        route = self._routes.get(request.path)
        if route is None:
            return text_response(404)
        if request.method not in ("GET", "HEAD"):
            return text_response(405, Allow=ALLOWED)
        guarded, handler = route
        if (
            guarded
            and self.token
            and not auth.authorized(request.headers.get("authorization", ""), self.token)
        ):
            return json_response(auth.REFUSAL, auth.UNAUTHORIZED, auth.CHALLENGE)
        return handler(request)

    def metrics(self, request: Request) -> Response:
        """The text exposition, streamed as it is rendered; gzip when the scraper accepts it."""
        headers, body = scrape(self.registry, self.fast, request.headers.get("accept-encoding", ""))
        return Response(200, headers, body)


def head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Date: {http_date()}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _ClientGone(Exception):
    """The client stopped reading: its connection is aborted."""


class _Connection(asyncio.Protocol):
    """One client connection: the parser's callbacks queue requests, one task answers them
    in order."""

    def __init__(
        self, endpoint: SiteEndpoint, served: set[_Connection], refused: set[_Connection]
    ) -> None:
        self._endpoint = endpoint
        self._limits = endpoint.limits
        self._served = served
        self._refused = refused
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request | Response] = deque()
        self._wake = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._input_done = False  # nothing more is read: error, upgrade or end of input
        self._paused = False
        # The request being parsed.
        self._in_head = False
        self._head_bytes = 0  # of the request line and headers, as parsed
        self._raw_head = 0  # of the reads that came while a head was incomplete
        self._url = b""
        self._headers: dict[str, str] = {}

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass
        self._transport = transport
        if len(self._served) >= self._limits.connections:
            log.warning("http_connection_refused", reason="too many connections")
            response = text_response(503, close=True)
            assert isinstance(response.body, bytes)
            transport.write(head(503, self._fixed_headers(response, keep=False)) + response.body)
            # Half-closed, and what the client sends is read and dropped for a moment: a
            # close with unread data would reset the connection before the 503 is read.
            self._refused.add(self)
            self._input_done = True
            transport.write_eof()
            self._arm(REFUSED_GRACE)
            return
        self._served.add(self)
        self._task = asyncio.get_running_loop().create_task(self._serve())
        self._arm(self._limits.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self._input_done:
            return
        if self._in_head:
            # httptools buffers a header until it ends: this bounds what it can hold.
            self._raw_head += len(data)
            if self._raw_head > 2 * self._limits.head_bytes:
                self._reject(431)
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._stop_input()  # what came before is answered, then the connection closes
        except httptools.HttpParserError:
            self._reject(400)

    def eof_received(self) -> bool:
        self._stop_input()
        # Keep the write side open: requests already read are still answered.
        return self._task is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self._served.discard(self)
        self._refused.discard(self)
        self._input_done = True
        self._disarm()
        self._writable.set()
        if self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._raw_head = 0
        self._url = b""
        self._headers = {}
        self._arm(self._limits.head_timeout)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow_head(len(name) + len(value) + 4)
        if self._input_done:
            return
        key = name.decode("latin-1").lower()
        text = value.decode("utf-8", "surrogateescape")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        if self._input_done:
            return
        length = self._headers.get("content-length", "0").strip()
        if length != "0" or "transfer-encoding" in self._headers:
            self._reject(413)

    def on_message_complete(self) -> None:
        if self._input_done:
            return
        http11 = self._parser.get_http_version() == "1.1"
        keep = http11 and self._parser.should_keep_alive()
        try:  # origin form (/metrics?x) or absolute form (http://host/metrics)
            target = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            self._reject(400)
            return
        path = (target.path or b"").decode("utf-8", "surrogateescape")
        method = self._parser.get_method().decode("latin-1")
        self._push(Request(method, path, self._headers, keep, http11))
        if len(self._queue) >= self._limits.pipeline and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    # --- reading --------------------------------------------------------------------------

    def _grow_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._limits.head_bytes and not self._input_done:
            self._reject(431)

    def _reject(self, status: int) -> None:
        """Answer ``status`` after the requests already read, then close."""
        self._push(text_response(status, close=True))
        self._stop_input()

    def _stop_input(self) -> None:
        self._input_done = True
        self._in_head = False
        self._wake.set()

    def _push(self, item: Request | Response) -> None:
        self._queue.append(item)
        self._wake.set()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        log.debug("http_connection_timed_out", in_head=self._in_head)
        if self._transport is not None:
            self._transport.close()

    # --- answering ------------------------------------------------------------------------

    async def _serve(self) -> None:
        transport = self._transport
        assert transport is not None
        while True:
            while not self._queue:
                if self._input_done:
                    transport.close()
                    return
                self._wake.clear()
                await self._wake.wait()
            item = self._queue.popleft()
            if self._paused and len(self._queue) < self._limits.pipeline // 2:
                self._paused = False
                transport.resume_reading()
            try:
                keep = await self._answer(item)
            except _ClientGone:
                return
            if not keep or transport.is_closing():
                transport.close()
                return
            if not self._queue and not self._in_head and not self._input_done:
                self._arm(self._limits.idle_timeout)

    async def _answer(self, item: Request | Response) -> bool:
        """Write one answer; whether the connection stays open."""
        if isinstance(item, Response):
            return await self._write(item, head_only=False, keep=False, stream=True)
        try:
            response = self._endpoint.answer(item)
        except Exception:
            log.exception("http_request_failed", method=item.method, path=item.path)
            response = text_response(500)
        keep = item.keep_alive and not response.close
        return await self._write(
            response, head_only=item.method == "HEAD", keep=keep, stream=item.chunked
        )

    def _fixed_headers(self, response: Response, *, keep: bool) -> dict[str, str]:
        headers = dict(response.headers)
        if isinstance(response.body, bytes):
            headers["Content-Length"] = str(len(response.body))
        if not keep:
            headers["Connection"] = "close"
        return headers

    async def _write(
        self, response: Response, *, head_only: bool, keep: bool, stream: bool
    ) -> bool:
        """``stream``: the client reads chunked encoding (HTTP/1.1); otherwise a streamed
        body ends with the connection."""
        transport = self._transport
        assert transport is not None
        body = response.body
        if isinstance(body, bytes):
            headers = self._fixed_headers(response, keep=keep)
            transport.write(head(response.status, headers) + (b"" if head_only else body))
            await self._drain()
            return keep
        chunked = stream
        keep = keep and chunked
        headers = self._fixed_headers(response, keep=keep)
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        transport.write(head(response.status, headers))
        if head_only:
            await self._drain()
            return keep
        try:
            async for chunk in body:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                await self._drain()
        except _ClientGone:
            raise
        except Exception:
            # The status line is out: all that can be said now is a broken body.
            log.exception("http_stream_failed", status=response.status)
            transport.abort()
            return False
        if chunked:
            transport.write(b"0\r\n\r\n")
        await self._drain()
        return keep

    async def _drain(self) -> None:
        """Wait while the transport's buffer is full, at most ``Limits.write_timeout``."""
        if self._writable.is_set():
            return
        try:
            async with asyncio.timeout(self._limits.write_timeout):
                await self._writable.wait()
        except TimeoutError:
            log.info("http_client_too_slow", timeout=self._limits.write_timeout)
            if self._transport is not None:
                self._transport.abort()
            raise _ClientGone from None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task


@asynccontextmanager
async def serve(app: SiteEndpoint, listen: str) -> AsyncIterator[asyncio.Server]:
    """Serve ``app`` on ``host:port`` for the lifetime of the context; on the way out, open
    connections are closed and their answers cancelled."""
    host, port = split_listen(listen)
    served: set[_Connection] = set()
    refused: set[_Connection] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(app, served, refused), host, port)
    try:
        yield server
    finally:
        server.close()
        connections = [*served, *refused]
        for connection in connections:
            connection.close()
        tasks = [c.task for c in connections if c.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
