"""A lean HTTP/1.1 client for the upstream: keep-alive connections on asyncio Protocols,
responses parsed by httptools (llhttp).

Only what a transparent proxy needs: the request goes out as given (no default headers,
no decompression, no redirects), framed by the body it carries (``Content-Length``, or
chunked for a stream of unknown length); the response comes back as a status, its headers
and a body read chunk by chunk. One request at a time per connection, connections kept
alive in a pool of at most ``limit`` (idle ones are reused newest first and closed after
``keepalive`` seconds).

Every failure is an ``UpstreamFailure`` (before the response headers) or a ``ResponseCut``
(after them): this module is the one place that maps socket and parser errors to the
reasons the mode machine sees. A failure says whether the request may have reached the
upstream (``in_doubt``): only a failure before a connection was obtained (refused, connect
timeout, TLS handshake) sent nothing for sure. ``retryable_now`` marks a connection that
died without an answer (closed or reset): maybe a keep-alive connection the upstream had
just dropped, worth one immediate retry on a fresh connection when resending is harmless.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections import deque
from collections.abc import AsyncIterable, Iterable
from types import TracebackType
from typing import Self, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

POOL_SIZE = 100
KEEPALIVE = 30.0
MAX_HEAD = 64 * 1024  # response status line and headers, together
HIGH_WATER = 256 * 1024  # response body buffered before reading from the upstream pauses
SMALL_WRITE = 16 * 1024  # a body up to this size goes out in one write with its head
# Methods whose requests carry no body unless they say so: the others get an explicit
# "Content-Length: 0" when bodyless, as HTTP/1.1 servers expect of a POST or PUT.
GET_LIKE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


class UpstreamFailure(Exception):
    """The upstream could not be reached or did not answer (before any response header)."""

    def __init__(
        self,
        reason: str,
        *,
        retryable_now: bool = False,
        abandoned: bool = False,
        in_doubt: bool = True,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        # Ended by ``abandon_waiting`` because the proxy already went offline.
        self.abandoned = abandoned
        # Maybe a dropped keep-alive connection: one immediate retry on a fresh one, when
        # sending twice is harmless (a read, or an upstream that honours Idempotency-Key).
        self.retryable_now = retryable_now
        # The request may have reached the upstream (its bytes were, or may have been,
        # written): it may have been applied. False only when nothing was sent for sure.
        self.in_doubt = in_doubt


class ResponseCut(Exception):
    """The upstream failed after the response headers were in."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Sending:
    """Per attempt: has a connection been obtained (so the request may have gone out)?"""

    __slots__ = ("connected",)

    def __init__(self) -> None:
        self.connected = False


def _is_reset(exc: BaseException | None) -> bool:
    return isinstance(exc, ConnectionResetError | BrokenPipeError) or (
        isinstance(exc, OSError) and exc.errno in {errno.ECONNRESET, errno.EPIPE}
    )


def _lost_reason(exc: BaseException | None) -> UpstreamFailure:
    """The connection ended before the response headers."""
    if exc is None:
        return UpstreamFailure("disconnected", retryable_now=True)
    if _is_reset(exc):
        return UpstreamFailure("connection reset", retryable_now=True)
    return UpstreamFailure(f"upstream error: {type(exc).__name__}")


def _connect_failure(exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamFailure("connection refused", in_doubt=False)
    if isinstance(exc, TimeoutError):
        return UpstreamFailure("connect timeout", in_doubt=False)
    return UpstreamFailure("connect failed", in_doubt=False)


_NO_HEADERS: CIMultiDict[str] = CIMultiDict()  # until the head is in (never written to)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; the response in progress parses what arrives."""

    __slots__ = ("_drained", "_paused", "client", "closed", "idle_since", "response", "transport")

    def __init__(self, client: UpstreamClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False
        self._drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.response is None:
            # The upstream spoke out of turn on an idle connection (an unasked 408 before
            # closing, or garbage): nothing on it can be trusted any more.
            self.abort()
            return
        self.response.feed(data)

    def eof_received(self) -> bool:
        return False  # close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.client.lost(self)
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(exc or ConnectionResetError("connection lost"))
        if self.response is not None:
            self.response.lost(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("connection lost")
        if self._paused:
            self._drained = asyncio.get_running_loop().create_future()
            try:
                await self._drained
            finally:
                self._drained = None

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()


class Response:
    """One exchange on one connection: the response head, then its body in chunks.

    ``release()`` when done: the connection goes back to the pool only when the whole
    response was read and both sides agreed to keep it alive; otherwise it is closed."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_complete",
        "_conn",
        "_deadline",
        "_error",
        "_head",
        "_head_only",
        "_head_size",
        "_interim",
        "_keep_alive",
        "_loop",
        "_parser",
        "_raw",
        "_reading_paused",
        "_reason",
        "_released",
        "_timer",
        "_until_eof",
        "_waiter",
        "content_length",
        "headers",
        "reason",
        "request_sent",
        "status",
    )

    def __init__(self, conn: _Connection, method: str, deadline: float) -> None:
        self._conn = conn
        self._loop = loop = asyncio.get_running_loop()
        self._parser = httptools.HttpResponseParser(self)
        self._head: asyncio.Future[None] = loop.create_future()
        self._head_size = 0
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = _NO_HEADERS
        self.content_length: int | None = None
        self._raw: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._interim = False  # parsing a 1xx answer (skipped)
        # HEAD: the head is the whole answer (the parser cannot be told so; the connection
        # is not reused, as a Content-Length may announce a body that never comes).
        self._head_only = method == "HEAD"
        self._until_eof = False  # a body delimited by the connection's close
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: Exception | None = None
        self._keep_alive = False
        self.request_sent = False
        self._released = False
        self._deadline = deadline
        self._timer: asyncio.TimerHandle | None = None

    # --- httptools callbacks ---------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise ValueError("bytes after the response")

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:  # the proxy never asks to switch protocols
                raise ValueError("unasked protocol switch")
            # Interim (103 Early Hints, an unasked 100): skipped, the answer follows.
            self._interim = True
            self._raw.clear()
            self._reason = b""
            return
        self.status = status
        self.reason = self._reason.decode("latin-1")
        self.headers = headers = CIMultiDict(
            [
                (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
                for name, value in self._raw
            ]
        )
        self._raw.clear()
        length = headers.get("Content-Length")
        if length is not None:
            self.content_length = int(length)
        coding = headers.get("Transfer-Encoding")
        chunked = coding is not None and coding.rsplit(",", 1)[-1].strip().lower() == "chunked"
        self._keep_alive = self._parser.should_keep_alive() and not self._head_only
        self._until_eof = self.content_length is None and not chunked and status not in {204, 304}
        self._head.set_result(None)
        if self._head_only:
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        self._wake()
        if self._buffered > HIGH_WATER and not self._reading_paused and self._conn.transport:
            self._reading_paused = True
            self._conn.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self._complete:
            self._finish()

    # --- from the connection -------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            if self._complete:  # trailing bytes: the answer is in, the connection is not
                self._keep_alive = False
            else:
                self._fail("upstream error: malformed response")
            self._conn.abort()
            return
        if not self._head.done():
            self._head_size += len(data)
            if self._head_size > MAX_HEAD:
                self._fail("upstream error: response head too large")
                self._conn.abort()

    def lost(self, exc: BaseException | None) -> None:
        if self._complete:
            return
        if self._head.done() and self._until_eof and exc is None:
            self._finish()  # the close is the end of this body
            return
        if self._head.done():
            self._fail("upstream closed mid-body" if exc is None else _lost_reason(exc).reason)
        else:
            self._fail(_lost_reason(exc))

    def _fail(self, failure: str | UpstreamFailure) -> None:
        if not self._head.done():
            error = failure if isinstance(failure, UpstreamFailure) else UpstreamFailure(failure)
            self._head.set_exception(error)
            self._error = ResponseCut(error.reason)
        elif self._error is None:
            reason = failure.reason if isinstance(failure, UpstreamFailure) else failure
            self._error = ResponseCut(reason)
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _expire(self) -> None:
        self._timer = None
        self._fail("timeout")
        self._conn.abort()

    # --- for the caller --------------------------------------------------------------------

    @property
    def answered(self) -> bool:
        return self._head.done()

    async def head(self) -> None:
        """Wait for the status and headers (an ``UpstreamFailure`` if they never come)."""
        await self._head

    async def read_chunk(self) -> bytes:
        """The body that has arrived (joined), waiting for some if none; b"" at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._waiter = self._loop.create_future()
            if self._timer is None:
                self._timer = self._loop.call_at(self._deadline, self._expire)
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._reading_paused and self._conn.transport is not None:
            self._reading_paused = False
            self._conn.transport.resume_reading()
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body, or its first ``limit`` bytes."""
        parts = []
        size = 0
        while limit is None or size < limit:
            chunk = await self.read_chunk()
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
        body = b"".join(parts)
        return body if limit is None else body[:limit]

    def release(self) -> None:
        """Give the connection back (reused only after a complete, kept-alive answer)."""
        if self._released:
            return
        self._released = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn = self._conn
        conn.response = None
        if self._complete and self._keep_alive and self.request_sent and not conn.closed:
            conn.idle_since = self._loop.time()
            conn.client.idle(conn)
        else:
            conn.abort()


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
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
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

    def idle(self, conn: _Connection) -> None:
        if self.closed:
            conn.abort()
            return
        self._idle.append(conn)
        self._wake_one()

    def lost(self, conn: _Connection) -> None:
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

    async def _acquire(self, *, fresh: bool) -> _Connection:
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

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        self._connecting += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self),
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
    conn: _Connection,
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
