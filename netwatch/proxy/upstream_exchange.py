"""One exchange with the upstream on one keep-alive connection: the connection's asyncio
Protocol, and the ``Response`` it feeds through httptools' parser (llhttp).

A response is parsed as it arrives: interim (1xx) answers are skipped, the head is
bounded (``MAX_HEAD``), the body is buffered up to ``HIGH_WATER`` (then reading from the
socket pauses until the caller catches up) and ends by its Content-Length, its last chunk,
or the connection's close. Failures before the head are ``UpstreamFailure``, after it
``ResponseCut``: with ``upstream.py`` the only place that maps sockets and the parser to
reasons. The pool (``upstream.UpstreamClient``) decides what happens to a connection once
its response is released.
"""

from __future__ import annotations

import asyncio
import errno
from collections import deque
from typing import Protocol, cast

import httptools
from multidict import CIMultiDict

from netwatch.proxy.flow import WriteGate

MAX_HEAD = 64 * 1024  # response status line and headers, together
HIGH_WATER = 256 * 1024  # response body buffered before reading from the upstream pauses


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


class Pool(Protocol):
    """What a connection tells its pool."""

    def idle(self, conn: Connection) -> None:
        """``conn`` answered in full and may carry the next request."""
        ...

    def lost(self, conn: Connection) -> None:
        """``conn`` is closed."""
        ...


_NO_HEADERS: CIMultiDict[str] = CIMultiDict()  # until the head is in (never written to)


class Connection(asyncio.Protocol):
    """One keep-alive connection; the response in progress parses what arrives."""

    __slots__ = ("_gate", "client", "closed", "idle_since", "response", "transport")

    def __init__(self, client: Pool) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self._gate = WriteGate()

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
        self._gate.lose(exc)
        if self.response is not None:
            self.response.lost(exc)

    def pause_writing(self) -> None:
        self._gate.pause()

    def resume_writing(self) -> None:
        self._gate.resume()

    async def drain(self) -> None:
        await self._gate.wait()

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

    def __init__(self, conn: Connection, method: str, deadline: float) -> None:
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
