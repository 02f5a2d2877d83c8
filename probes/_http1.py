"""One HTTP/1.1 exchange on a fresh connection, for the http probe: the asyncio Protocol that
parses the response with httptools (llhttp) as it arrives.

The response ends by its Content-Length, its last chunk or the connection's close (a body
without either); a HEAD answer and 1xx/204/304 have none. Interim (1xx) answers are
skipped. The head is bounded (``MAX_HEAD``); the body is counted, and kept only when asked
and only up to ``MAX_KEPT`` (what a body regex is matched against). Failures are raised
to the waiting task as ``NoResponse`` (closed before any head), ``BodyCut`` (closed before
the body's end), ``BadResponse`` (not HTTP, or too large a head) or the socket's own
``OSError`` when the connection was reset before any head.
"""

from __future__ import annotations

import asyncio
import time
from typing import cast

import httptools

MAX_HEAD = 64 * 1024  # status line and headers, together
MAX_KEPT = 1024 * 1024  # body kept for matching; the rest is counted, not kept
_NO_BODY_STATUSES = frozenset({204, 304})


class NoResponse(Exception):
    """The server closed the connection without answering."""


class BodyCut(Exception):
    """The connection ended before the end of the response body."""


class BadResponse(Exception):
    """What came back is not an HTTP/1.x response the probe accepts."""


class Exchange(asyncio.Protocol):
    """One request's response: ``await head()``, then (unless done with it) ``await body()``.

    ``headers_at`` and ``body_at`` are the ``perf_counter`` times at which the head was
    parsed and the body ended."""

    __slots__ = (
        "_chunked",
        "_complete",
        "_error",
        "_head_only",
        "_head_size",
        "_interim",
        "_keep",
        "_kept",
        "_kept_size",
        "_parser",
        "_received",
        "_until_eof",
        "_waiter",
        "body_at",
        "charset",
        "content_length",
        "headers_at",
        "location",
        "size",
        "status",
        "transport",
    )

    def __init__(self, *, head_only: bool, keep_body: bool) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._head_only = head_only  # HEAD: the head is the whole answer
        self._keep = keep_body
        self._kept: list[bytes] = []
        self._kept_size = 0
        self._head_size = 0
        self._received = 0
        self._interim = False
        self._until_eof = False
        self._chunked = False
        self._complete = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.content_length: int | None = None
        self.charset: str | None = None
        self.location: str | None = None
        self.size = 0
        self.headers_at = 0.0
        self.body_at = 0.0

    # --- the connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._complete or self._error is not None:
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            # A callback below that refused the response has failed it already; bytes
            # after a complete answer do not matter.
            if not self._complete and self._error is None:
                self._fail(BadResponse(f"malformed response: {exc}"))
            return
        if not self.status:
            # Still no head: all that came is head (llhttp buffers a partial line).
            self._received += len(data)
            if self._received > MAX_HEAD:
                self._fail(BadResponse(f"response head over {MAX_HEAD} bytes"))

    def eof_received(self) -> bool:
        return False  # close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._complete or self._error is not None:
            return
        if not self.status:
            self._fail(exc or NoResponse("server closed the connection without a response"))
        elif self._until_eof and exc is None:
            self._finish()  # the close is the end of this body
        elif exc is not None:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
            self._fail(BodyCut(reason))
        elif self.content_length is not None:
            self._fail(
                BodyCut(f"connection closed after {self.size} of {self.content_length} bytes")
            )
        else:
            self._fail(BodyCut(f"connection closed mid-chunk after {self.size} bytes"))

    # --- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:  # a head that came in one read with its body
            self._refuse(f"response head over {MAX_HEAD} bytes")
        lower = name.lower()
        if lower == b"content-type":
            self.charset = _charset(value.decode("latin-1"))
        elif lower == b"location" or (lower == b"uri" and self.location is None):
            self.location = value.decode("utf-8", "surrogateescape")
        elif lower == b"content-length":
            self.content_length = int(value) if value.strip().isdigit() else None
        elif lower == b"transfer-encoding":
            self._chunked = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 100:
            self._refuse(f"bad status {status}")
        if status < 200:
            if status == 101:  # the probe never asks to switch protocols
                self._refuse("unasked protocol switch (101)")
            self._interim = True  # 100 Continue, 103 Early Hints: the answer follows
            self.charset = self.location = None
            self.content_length = None
            self._chunked = False
            return
        self.headers_at = time.perf_counter()
        self.status = status
        # llhttp ends a body at its Content-Length or last chunk; one that announces neither
        # ends with the connection, which httptools cannot be told of.
        self._until_eof = (
            self.content_length is None and not self._chunked and status not in _NO_BODY_STATUSES
        )
        self._wake()
        if self._head_only:
            self._finish()

    def on_body(self, body: bytes) -> None:
        if self._complete:
            return
        self.size += len(body)
        if self._keep and self._kept_size < MAX_KEPT:
            part = body[: MAX_KEPT - self._kept_size]
            self._kept.append(part)
            self._kept_size += len(part)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
        elif not self._complete:
            self._finish()

    # --- for the waiting task --------------------------------------------------------------

    async def head(self) -> None:
        """Until the status and headers are in."""
        while not self.status:
            await self._next_event()

    async def body(self) -> None:
        """Until the body has ended."""
        while not self._complete:
            await self._next_event()

    def kept(self) -> bytes:
        """The body's first ``MAX_KEPT`` bytes (only when asked to keep it)."""
        return b"".join(self._kept)

    def close(self) -> None:
        """Drop the connection (no reuse: every probe measures a fresh one)."""
        if self.transport is not None:
            self.transport.abort()

    # --- internals -------------------------------------------------------------------------

    def _refuse(self, reason: str) -> None:
        """Fail the response from a parser callback, and stop the parser."""
        self._fail(BadResponse(reason))
        raise BadResponse(reason)

    async def _next_event(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _finish(self) -> None:
        self.body_at = time.perf_counter()
        self._complete = True
        self._wake()

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._wake()
        self.close()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _charset(content_type: str) -> str | None:
    """The ``charset`` parameter of a Content-Type value, if any."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"') or None
    return None
