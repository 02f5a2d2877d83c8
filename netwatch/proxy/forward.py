"""Talking to the upstream: one shared aiohttp ClientSession for forwards and replays.

The proxy must be transparent, so the session never decompresses, never follows redirects
and never adds headers the station did not send (no default ``Accept-Encoding``,
``User-Agent`` or ``Content-Type``). Only hop-by-hop headers are dropped, and
``X-Forwarded-For`` / ``-Proto`` are added.

Every network failure before the response headers (refused, reset, timeout, garbage) becomes
one ``UpstreamFailure`` carrying a short reason: the single place where aiohttp's error tree
is mapped to what the mode machine calls a passive failure.
"""

from __future__ import annotations

import asyncio
import errno
import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from types import TracebackType
from typing import Self

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from netwatch.config.schema import Proxy, Replayable
from netwatch.proxy.queue import Entry

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        # The proxy already answered the station's 100-continue; the upstream must not.
        "expect",
    }
)
# The session would otherwise invent these; a transparent proxy sends only what it got.
SKIP_AUTO_HEADERS = ("Accept-Encoding", "User-Agent", "Content-Type")
UPSTREAM_DOWN_STATUSES = frozenset({502, 503, 504})
POOL_SIZE = 100
CHUNK = 64 * 1024
# Responses up to this size (with a Content-Length) are relayed in one write.
SMALL_RESPONSE = 64 * 1024


class UpstreamFailure(Exception):
    """The upstream could not be reached or did not answer (before any response header)."""

    def __init__(
        self, reason: str, *, retryable_now: bool = False, abandoned: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        # Ended by ``abandon_waiting`` because the proxy already went offline.
        self.abandoned = abandoned
        # A dropped keep-alive connection: one immediate retry on a fresh one is safe.
        self.retryable_now = retryable_now


class BodyTooLarge(Exception):
    """The request body is larger than ``proxy.max_body``."""


@dataclass(frozen=True, slots=True)
class Reply:
    """What a replay attempt got back (the body is kept for dead letters, bounded)."""

    status: int
    retry_after: str | None
    body: bytes


def is_replayable(rules: tuple[Replayable, ...], method: str, path: str) -> bool:
    return any(method in rule.methods and fnmatchcase(path, rule.path) for rule in rules)


def outgoing_headers(request: web.BaseRequest) -> CIMultiDict[str]:
    """The station's headers minus hop-by-hop ones, plus the X-Forwarded-* pair."""
    listed = {
        token.strip().lower()
        for value in request.headers.getall("Connection", [])
        for token in value.split(",")
    }
    drop = HOP_BY_HOP | listed | {"host"}
    headers: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in request.headers.items() if name.lower() not in drop
    )
    peer = request.remote or ""
    if peer:
        prior = headers.popall("X-Forwarded-For", [])
        headers["X-Forwarded-For"] = ", ".join([*prior, peer])
    headers.setdefault("X-Forwarded-Proto", request.scheme)
    return headers


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    listed = {
        token.strip().lower()
        for value in upstream.getall("Connection", [])
        for token in value.split(",")
    }
    drop = HOP_BY_HOP | listed
    return CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in drop)


async def read_limited(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, or ``BodyTooLarge`` as soon as it passes ``limit`` (chunked too)."""
    length = request.content_length
    if length is not None and length <= limit:
        # The common case: one read of a known length, no chunk iteration.
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError("the station closed before sending its body") from exc
    buffer = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        buffer += chunk
        if len(buffer) > limit:
            raise BodyTooLarge
    return bytes(buffer)


class CountedBody:
    """Streams the station's body upstream, stopping once it passes ``limit``."""

    def __init__(self, request: web.BaseRequest, limit: int) -> None:
        self._request = request
        self._limit = limit
        self.exceeded = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self._request.content.iter_chunked(CHUNK):
            seen += len(chunk)
            if seen > self._limit:
                self.exceeded = True
                raise BodyTooLarge
            yield chunk


def _is_reset(exc: aiohttp.ClientOSError) -> bool:
    """A reset or broken pipe, also when aiohttp wraps it without an errno (a reset while
    the request body is being written arrives as "Can not write request body")."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionResetError | BrokenPipeError):
            return True
        if isinstance(seen, OSError) and seen.errno in {errno.ECONNRESET, errno.EPIPE}:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _failure(exc: BaseException) -> UpstreamFailure:
    """Map aiohttp's error tree to one reason string (the only place that knows it)."""
    retryable = False
    match exc:
        case aiohttp.ClientConnectorError() if exc.os_error.errno == errno.ECONNREFUSED:
            reason = "connection refused"
        case aiohttp.ConnectionTimeoutError():
            reason = "connect timeout"
        case aiohttp.ClientConnectorError():
            reason = "connect failed"
        case aiohttp.ServerDisconnectedError():
            reason, retryable = "disconnected", True
        case aiohttp.ClientOSError() if _is_reset(exc):
            reason, retryable = "connection reset", True
        case TimeoutError() | aiohttp.ServerTimeoutError():
            reason = "timeout"
        case _:
            reason = f"upstream error: {type(exc).__name__}"
    return UpstreamFailure(reason, retryable_now=retryable)


class Forwarder:
    """Owns the shared ClientSession (an async context manager)."""

    def __init__(self, settings: Proxy) -> None:
        self.settings = settings
        self._base = settings.upstream.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        # Deadlines of forwards still waiting for response headers, so that going offline
        # can end them at once (their requests are then queued, see ``abandon_waiting``).
        self._waiting: set[asyncio.Timeout] = set()
        self._abandoned: set[asyncio.Timeout] = set()

    async def __aenter__(self) -> Self:
        ssl_context: ssl.SSLContext | bool = True
        if self.settings.ca_file:
            ssl_context = ssl.create_default_context(cafile=self.settings.ca_file)
        connector = aiohttp.TCPConnector(
            limit=POOL_SIZE, limit_per_host=POOL_SIZE, ssl=ssl_context, keepalive_timeout=30
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=self.settings.request_timeout, sock_connect=self.settings.connect_timeout
            ),
            skip_auto_headers=SKIP_AUTO_HEADERS,
        )
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("Forwarder used outside its context")
        return self._session

    def _closing(self) -> bool:
        return self._session is None or self._session.closed

    def url(self, raw_path: str, raw_query: str = "") -> URL:
        return URL(self._base + raw_path + (f"?{raw_query}" if raw_query else ""), encoded=True)

    def abandon_waiting(self) -> None:
        """End every forward still waiting for response headers (their callers queue them).

        Safe because only replayable requests with an Idempotency-Key are abandoned: if the
        upstream did apply one, the replay is answered from its idempotency record.
        """
        loop = asyncio.get_running_loop()
        for deadline in list(self._waiting):
            self._abandoned.add(deadline)
            deadline.reschedule(loop.time())

    @contextmanager
    def _abandonable(self, deadline: asyncio.Timeout, on: bool) -> Iterator[None]:
        if on:
            self._waiting.add(deadline)
        try:
            yield
        finally:
            self._waiting.discard(deadline)
            self._abandoned.discard(deadline)

    async def send(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        body: bytes | CountedBody | None,
        *,
        abandonable: bool = False,
        idempotent: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send and return the response once its headers are in (the caller releases it).

        ``idempotent`` requests (an Idempotency-Key, or a safe method; the body in memory)
        get one immediate retry when a pooled keep-alive connection turns out to be dead,
        so a stale connection is not mistaken for a lost link.
        """
        attempts = 2 if idempotent and not isinstance(body, CountedBody) else 1
        # A queueable write waits at most queue_after for its answer, then is queued.
        wait = self.settings.queue_after if abandonable else None
        for attempt in range(attempts):
            deadline = asyncio.timeout(wait)
            abandoned = False
            try:
                async with deadline:
                    with self._abandonable(deadline, abandonable):
                        try:
                            return await self.session.request(
                                method, url, headers=headers, data=body, allow_redirects=False
                            )
                        finally:
                            abandoned = deadline in self._abandoned
            except (aiohttp.ClientError, TimeoutError) as exc:
                if isinstance(body, CountedBody) and body.exceeded:
                    raise BodyTooLarge from exc
                if deadline.expired() and abandoned:
                    raise UpstreamFailure("abandoned: proxy offline", abandoned=True) from exc
                if deadline.expired():
                    raise UpstreamFailure(f"no answer in {wait:g}s") from exc
                failure = _failure(exc)
                # A closed session means the proxy is shutting down: no second attempt.
                if not failure.retryable_now or attempt == attempts - 1 or self._closing():
                    raise failure from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def counted(self, request: web.BaseRequest) -> CountedBody:
        return CountedBody(request, self.settings.max_body)

    async def relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Stream the upstream response back to the station as it arrives; a small one of
        known length is read whole and answered in one write (headers and body together)."""
        length = upstream.content_length
        bodyless = request.method == "HEAD" or upstream.status in (204, 304)
        if length is not None and length <= SMALL_RESPONSE and not bodyless:
            try:
                body = await upstream.content.readexactly(length)
            except (aiohttp.ClientError, TimeoutError, asyncio.IncompleteReadError) as exc:
                raise ResponseCut("upstream closed mid-body") from exc
            finally:
                upstream.release()
            return web.Response(
                status=upstream.status,
                reason=upstream.reason,
                headers=response_headers(upstream.headers),
                body=body,
            )
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=response_headers(upstream.headers),
        )
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are out: nothing to do but cut the station's connection too.
            raise ResponseCut(_failure(exc).reason) from exc
        finally:
            upstream.release()
        await response.write_eof()
        return response

    async def replay(self, entry: Entry, *, keep_body: int = 64 * 1024) -> Reply:
        """Re-send one queued request with its original Idempotency-Key."""
        headers: CIMultiDict[str] = CIMultiDict(entry.headers)
        headers["Idempotency-Key"] = entry.idempotency_key
        url = self.url(entry.path, entry.query)
        response = await self.send(entry.method, url, headers, entry.body, idempotent=True)
        try:
            body = await _read_prefix(response, keep_body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The status is in; a broken body does not change the verdict.
            body = f"<body unreadable: {type(exc).__name__}>".encode()
        finally:
            response.release()
        return Reply(response.status, response.headers.get("Retry-After"), body)


async def _read_prefix(response: aiohttp.ClientResponse, limit: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < limit:
        chunk = await response.content.read(limit - len(buffer))
        if not chunk:
            break
        buffer += chunk
    return bytes(buffer)


class ResponseCut(Exception):
    """The upstream failed after the response headers were relayed to the station."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
