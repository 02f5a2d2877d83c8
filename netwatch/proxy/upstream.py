"""A lean HTTP/1.1 client for the upstream: keep-alive connections on asyncio Protocols,
responses parsed by httptools (llhttp).

Only what a transparent proxy needs: the request goes out as given (no default headers,
no decompression, no redirects), framed by the body it carries (``Content-Length``, or
chunked for a stream of unknown length); the response comes back as a status, its headers
and a body read chunk by chunk. One request at a time per connection, connections kept
alive in a pool of at most ``limit`` (idle ones are reused newest first and closed after
``keepalive`` seconds).

Every failure is an ``UpstreamFailure`` (before the response headers) or a ``ResponseCut``
(after them): this module (connecting, sending) and ``upstream_exchange.py`` (the
connection and its response) are the only places that map socket and parser errors to
the reasons the mode machine sees. A failure says whether the request may have reached the
upstream (``in_doubt``): only a failure before a connection was obtained (refused, connect
timeout, TLS handshake) sent nothing for sure. ``retryable_now`` marks a connection that
died without an answer (closed or reset): maybe a keep-alive connection the upstream had
just dropped, worth one immediate retry on a fresh connection when resending is harmless.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterable, Iterable
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from netwatch.proxy.upstream_exchange import Connection, Response, ResponseCut, UpstreamFailure

__all__ = ["Response", "ResponseCut", "Sending", "UpstreamClient", "UpstreamFailure"]

POOL_SIZE = 100
KEEPALIVE = 30.0
SMALL_WRITE = 16 * 1024  # a body up to this size goes out in one write with its head
# Methods whose requests carry no body unless they say so: the others get an explicit
# "Content-Length: 0" when bodyless, as HTTP/1.1 servers expect of a POST or PUT.
GET_LIKE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class Sending:
    """Per attempt: has a connection been obtained (so the request may have gone out)?"""

    __slots__ = ("connected",)

    def __init__(self) -> None:
        self.connected = False


def _connect_failure(exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamFailure("connection refused", in_doubt=False)
    if isinstance(exc, TimeoutError):
        return UpstreamFailure("connect timeout", in_doubt=False)
    return UpstreamFailure("connect failed", in_doubt=False)


class UpstreamClient:
    """The pool of connections to one upstream (an async context manager)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        ca_file: str | None = None,
        limit: int = POOL_SIZE,
        keepalive: float = KEEPALIVE,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._host = parts.hostname
        self._port = parts.port or _DEFAULT_PORTS[parts.scheme]
        host = f"[{self._host}]" if ":" in self._host else self._host
        default = self._port == _DEFAULT_PORTS[parts.scheme]
        self.host_header = host if default else f"{host}:{self._port}"
        self.base_path = parts.path.rstrip("/")
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl.create_default_context(cafile=ca_file)
        self._connect_timeout = connect_timeout
        self._limit = limit
        self._keepalive = keepalive
        self._idle: list[Connection] = []
        self._open: set[Connection] = set()
        self._connecting = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- the pool --------------------------------------------------------------------------

    def idle(self, conn: Connection) -> None:
        if self.closed:
            conn.abort()
            return
        self._idle.append(conn)
        self._wake_one()

    def lost(self, conn: Connection) -> None:
        self._open.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _acquire(self, *, fresh: bool) -> Connection:
        loop = asyncio.get_running_loop()
        while True:
            if self.closed:
                raise UpstreamFailure("client closed", in_doubt=False)
            now = loop.time()
            while self._idle and not fresh:
                conn = self._idle.pop()  # the newest: the least likely to have been dropped
                transport = conn.transport
                usable = transport is not None and not conn.closed and not transport.is_closing()
                if usable and now - conn.idle_since < self._keepalive:
                    return conn
                conn.abort()
            if len(self._open) + self._connecting < self._limit:
                return await self._connect()
            if self._idle:
                self._idle.pop(0).abort()  # a fresh one is wanted: make room (oldest idle)
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if not waiter.done():
                    waiter.cancel()

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        self._connecting += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                    ssl_handshake_timeout=self._connect_timeout if self._ssl else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise _connect_failure(exc) from exc
        finally:
            self._connecting -= 1
            self._wake_one()
        if conn.closed:
            raise UpstreamFailure("disconnected", retryable_now=True, in_doubt=False)
        self._open.add(conn)
        return conn

    # --- requests --------------------------------------------------------------------------

    def _head(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], framing: str | None
    ) -> bytes:
        """The request head; ``framing`` is the body's own framing header line, or None to
        keep a Content-Length the caller gives (and add ``Content-Length: 0`` to a bodyless
        POST, PUT, PATCH or DELETE)."""
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        length_given = False
        for name, value in headers:
            lower = name.lower()
            if lower == "host":
                continue
            if lower == "content-length":
                if framing is not None:
                    continue
                length_given = True
            lines.append(f"{name}: {value}")
        if framing is not None:
            lines.append(framing)
        elif not length_given and method not in GET_LIKE:
            lines.append("Content-Length: 0")
        head = "\r\n".join(lines) + "\r\n\r\n"
        ends = len(lines) + 1
        if head.count("\n") != ends or head.count("\r") != ends:
            # A line break inside a name or value would let it smuggle another header.
            raise UpstreamFailure("upstream error: line break in a header", in_doubt=False)
        return head.encode("utf-8", "surrogateescape")

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None,
        *,
        sending: Sending,
        deadline: float,
        length: int | None = None,
        fresh: bool = False,
    ) -> Response:
        """Send one request and return once the response head is in (``release()`` it).

        ``body``: bytes, None, or a stream (sent with ``length`` as its Content-Length when
        known, chunked otherwise); ``deadline`` (loop time) bounds the body's reading;
        ``fresh``: a new connection, not a pooled one. The caller bounds the wait for the
        head (its cancellation closes the connection)."""
        if isinstance(body, bytes):
            framing: str | None = f"Content-Length: {len(body)}"
        elif body is None:
            framing = None
        elif length is not None:
            framing = f"Content-Length: {length}"
        else:
            framing = "Transfer-Encoding: chunked"
        head = self._head(method, target, headers, framing)
        conn = await self._acquire(fresh=fresh)
        sending.connected = True
        response = Response(conn, method, deadline)
        conn.response = response
        transport = conn.transport
        assert transport is not None  # set by connection_made before it is handed out
        try:
            if body is None:
                transport.write(head)
            elif isinstance(body, bytes):
                if len(body) <= SMALL_WRITE:
                    transport.write(head + body)
                else:
                    transport.write(head)
                    transport.write(body)
            elif not await _pump(conn, response, head, body, chunked=length is None):
                return response  # answered early: it stands
            response.request_sent = True
            await response.head()
        except BaseException:
            response.release()
            raise
        return response


async def _pump(
    conn: Connection,
    response: Response,
    head: bytes,
    body: AsyncIterable[bytes],
    *,
    chunked: bool,
) -> bool:
    """Stream ``body`` out after ``head``; False when the upstream answered before it was
    all sent. The head waits for the first chunk (nothing goes out for a body refused at
    once). An error of the body's own source is raised as is (the connection is closed)."""
    transport = conn.transport
    assert transport is not None
    pending: bytes | None = head
    async for chunk in body:
        if response.answered:  # an early answer (e.g. 413) ends the upload
            return False
        if conn.closed:
            await response.head()  # raises why the connection ended
        if not chunk:
            continue
        parts = [chunk] if pending is None else [pending, chunk]
        pending = None
        if chunked:
            parts[-1:] = [b"%x\r\n" % len(chunk), chunk, b"\r\n"]
        transport.writelines(parts)
        try:
            await conn.drain()
        except OSError:
            await response.head()  # raises why the connection ended
    transport.writelines([*([pending] if pending else []), *([b"0\r\n\r\n"] if chunked else [])])
    return True
