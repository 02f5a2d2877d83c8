"""Talking to the upstream: one shared ``UpstreamClient`` for forwards and replays.

The proxy must be transparent: nothing is decompressed, no redirect is followed and no
header the station did not send is added (no default ``Accept``, ``Accept-Encoding``,
``User-Agent`` or ``Content-Type``). Only hop-by-hop headers are dropped, and
``X-Forwarded-For`` / ``-Proto`` are added.

Every network failure before the response headers (refused, reset, timeout, garbage) is
one ``UpstreamFailure`` carrying a short reason (mapped in ``upstream.py`` and
``upstream_exchange.py``, the only places that know sockets and the parser) and whether
the request may have reached the upstream (``in_doubt``): a failure before a connection
was obtained (refused, connect timeout, TLS handshake) never sent a byte; any failure
after it may have (the upstream may have applied the write and then lost the answer).
This module adds the deadlines: ``request_timeout``, ``queue_after`` for a write that can
be queued, and ``abandon_waiting`` when the proxy goes offline.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import structlog
from multidict import CIMultiDict, CIMultiDictProxy

from netwatch.config.schema import Lookup, Proxy, Replayable
from netwatch.proxy.dedupe import rule_for, strategy_for
from netwatch.proxy.queue import Entry
from netwatch.proxy.upstream import (
    Response,
    ResponseCut,
    Sending,
    UpstreamClient,
    UpstreamFailure,
)

__all__ = [
    "GATEWAY_IN_DOUBT",
    "UPSTREAM_DOWN_STATUSES",
    "BodyTooLarge",
    "CountedBody",
    "Forwarder",
    "Incoming",
    "Reply",
    "Response",
    "ResponseCut",
    "UpstreamFailure",
    "is_replayable",
    "outgoing_headers",
    "response_headers",
]

log = structlog.get_logger("netwatch.proxy.forward")

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
UPSTREAM_DOWN_STATUSES = frozenset({502, 503, 504})
# A gateway's answers that do not say the write was not applied: its origin may have applied
# it and then failed (502) or been too slow for the gateway (504). 503 is a refusal.
GATEWAY_IN_DOUBT = frozenset({502, 504})
CHUNK = 64 * 1024
# Responses up to this size (with a Content-Length) are relayed in one write.
SMALL_RESPONSE = 64 * 1024
BODYLESS = frozenset({204, 304})
_HOST = frozenset({"host"})  # the upstream's own Host goes out instead


class _Deadline:
    """The end of one attempt's wait for an answer: cancels the waiting task when it comes,
    as ``asyncio.timeout`` would (one timer, nothing more on the hot path), and says why:
    ``"limit"`` (queue_after or request_timeout) or ``"abandoned"`` (the proxy went
    offline, see ``Forwarder.abandon_waiting``)."""

    __slots__ = ("_cancelling", "_handle", "_task", "why")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline needs a task")
        self._task = task
        self._cancelling = task.cancelling()
        self.why: str | None = None
        self._handle = loop.call_at(when, self.expire, "limit")

    def expire(self, why: str) -> None:
        if self.why is None:
            self.why = why
            self._task.cancel()

    def ended(self) -> bool:
        """After a CancelledError: True when this deadline caused it (and only it: it is
        then absorbed), False when the task was cancelled from outside (propagate it)."""
        return self.why is not None and self._task.uncancel() <= self._cancelling

    def stop(self) -> None:
        self._handle.cancel()


class BodyTooLarge(Exception):
    """The request body is larger than ``proxy.max_body``."""


@dataclass(frozen=True, slots=True)
class Reply:
    """What a replay attempt got back (the body is kept for dead letters, bounded)."""

    status: int
    retry_after: str | None
    body: bytes


def is_replayable(rules: tuple[Replayable, ...], method: str, path: str) -> bool:
    return rule_for(rules, method, path) is not None


class Incoming(Protocol):
    """What the outgoing headers are built from (an aiohttp request, or the fast front's)."""

    @property
    def method(self) -> str: ...

    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]: ...

    @property
    def remote(self) -> str | None: ...

    @property
    def scheme(self) -> str: ...


class BodySource(Protocol):
    """A station's body as it arrives (aiohttp's ``StreamReader``)."""

    async def read(self, n: int = -1) -> bytes: ...


def _listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """Hop-by-hop headers: the fixed set, plus any the Connection header names."""
    connection = headers.getall("Connection", ())
    if not connection:
        return HOP_BY_HOP
    return HOP_BY_HOP | {
        token.strip().lower() for value in connection for token in value.split(",")
    }


def outgoing_headers(request: Incoming) -> CIMultiDict[str]:
    """The station's headers minus hop-by-hop ones (and Host), plus the X-Forwarded-* pair."""
    incoming = request.headers
    drop = _listed(incoming) | _HOST
    headers: CIMultiDict[str] = CIMultiDict(
        [(name, value) for name, value in incoming.items() if name.lower() not in drop]
    )
    peer = request.remote or ""
    if peer:
        prior = headers.popall("X-Forwarded-For", [])
        headers["X-Forwarded-For"] = ", ".join([*prior, peer])
    headers.setdefault("X-Forwarded-Proto", request.scheme)
    return headers


def response_headers(upstream: CIMultiDict[str]) -> CIMultiDict[str]:
    drop = _listed(upstream)
    return CIMultiDict([(k, v) for k, v in upstream.items() if k.lower() not in drop])


class CountedBody:
    """Streams the station's body upstream, stopping once it passes ``limit``."""

    def __init__(self, content: BodySource, length: int | None, limit: int) -> None:
        self._content = content
        self._limit = limit
        self.exceeded = False
        # As the station announced it (None: chunked): the upstream gets the same framing.
        self.length = length

    async def __aiter__(self) -> AsyncIterator[bytes]:
        seen = 0
        content = self._content
        while True:
            try:
                chunk = await content.read(CHUNK)
            except Exception as exc:  # whatever the server reports: the station is gone
                raise ConnectionResetError("the station closed before sending its body") from exc
            if not chunk:
                return
            seen += len(chunk)
            if seen > self._limit:
                self.exceeded = True
                raise BodyTooLarge
            yield chunk


class Forwarder:
    """Owns the shared ``UpstreamClient`` (an async context manager)."""

    def __init__(self, settings: Proxy) -> None:
        self.settings = settings
        self._client: UpstreamClient | None = None
        self._base_path = ""
        # Deadlines of forwards still waiting for response headers, so that going offline
        # can end them at once (their requests are then queued, see ``abandon_waiting``).
        self._waiting: set[_Deadline] = set()

    async def __aenter__(self) -> Self:
        settings = self.settings
        self._client = UpstreamClient(
            settings.upstream,
            connect_timeout=settings.connect_timeout,
            ca_file=settings.ca_file,
        )
        self._base_path = self._client.base_path
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def client(self) -> UpstreamClient:
        if self._client is None:
            raise RuntimeError("Forwarder used outside its context")
        return self._client

    def _closing(self) -> bool:
        return self._client is None or self._client.closed

    def target(self, raw_path: str, raw_query: str = "") -> str:
        """The request target upstream: the upstream URL's path, then the station's."""
        path = self._base_path + raw_path
        return f"{path}?{raw_query}" if raw_query else path

    def abandon_waiting(self) -> None:
        """End every forward still waiting for response headers (their callers queue them).

        Only replayable requests are abandoned, and one that was sent is queued in doubt:
        its replay is settled by the rule's dedupe strategy, never blindly re-sent.
        """
        for deadline in list(self._waiting):
            deadline.expire("abandoned")

    async def send(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | CountedBody | None,
        *,
        abandonable: bool = False,
        idempotent: bool = False,
    ) -> Response:
        """Send and return the response once its headers are in (the caller releases it).

        ``request_timeout`` bounds the whole exchange (the body's reading too); a queueable
        write waits at most ``queue_after`` for its answer, then is queued.

        ``idempotent`` requests (sending twice is harmless: a safe method, or a write to an
        upstream that honours Idempotency-Key; the body in memory) get one immediate retry,
        on a fresh connection, when their connection dies without an answer, so a stale
        keep-alive connection is not mistaken for a lost link. Any other request that may
        have been sent is never sent again here: the failure says ``in_doubt``.
        """
        streamed = isinstance(body, CountedBody)
        attempts = 2 if idempotent and not streamed else 1
        limit = self.settings.request_timeout
        wait = self.settings.queue_after if abandonable else None
        # Which limit ends the wait for the headers first: queue_after, or request_timeout.
        by_wait = wait is not None and wait < limit
        loop = asyncio.get_running_loop()
        client = self.client
        for attempt in range(attempts):
            started = loop.time()
            deadline = _Deadline(loop, started + (limit if wait is None else min(wait, limit)))
            sending = Sending()
            if abandonable:
                self._waiting.add(deadline)
            try:
                return await client.request(
                    method,
                    target,
                    headers.items(),
                    body,
                    sending=sending,
                    deadline=started + limit,
                    length=body.length if isinstance(body, CountedBody) else None,
                    fresh=attempt > 0,
                )
            except asyncio.CancelledError as exc:
                if not deadline.ended():
                    raise
                if isinstance(body, CountedBody) and body.exceeded:
                    raise BodyTooLarge from exc
                sent = sending.connected
                if deadline.why == "abandoned":
                    raise UpstreamFailure(
                        "abandoned: proxy offline", abandoned=True, in_doubt=sent
                    ) from exc
                if by_wait:
                    raise UpstreamFailure(f"no answer in {wait:g}s", in_doubt=sent) from exc
                reason = "timeout" if sent else "connect timeout"
                raise UpstreamFailure(reason, in_doubt=sent) from exc
            except UpstreamFailure as failure:
                # A closed client means the proxy is shutting down: no second attempt.
                if not failure.retryable_now or attempt == attempts - 1 or self._closing():
                    raise
                if failure.in_doubt:
                    # Said out loud: the upstream may now receive this request twice (it
                    # de-duplicates on this key, or the request is a read).
                    log.info(
                        "upstream_resent_in_doubt",
                        reason=failure.reason,
                        idempotency_key=headers.get("Idempotency-Key"),
                    )
            finally:
                deadline.stop()
                if abandonable:
                    self._waiting.discard(deadline)
        raise AssertionError("unreachable")  # pragma: no cover

    async def replay(self, entry: Entry, *, keep_body: int = 64 * 1024) -> Reply:
        """Re-send one queued request with its original Idempotency-Key (a stale pooled
        connection is retried at once only when its rule says the upstream de-duplicates)."""
        headers: CIMultiDict[str] = CIMultiDict(entry.headers)
        headers["Idempotency-Key"] = entry.idempotency_key
        settings = self.settings
        dedupe = strategy_for(settings.replayable, settings.dedupe, entry.method, entry.path)
        response = await self.send(
            entry.method,
            self.target(entry.path, entry.query),
            headers,
            entry.body,
            idempotent=dedupe == "idempotency-key",
        )
        try:
            body = await response.read(keep_body)
        except ResponseCut as cut:
            # The status is in; a broken body does not change the verdict.
            body = f"<body unreadable: {cut.reason}>".encode()
        finally:
            response.release()
        return Reply(response.status, response.headers.get("Retry-After"), body)

    async def lookup(self, entry: Entry, lookup: Lookup, path: str) -> int:
        """Ask the upstream whether ``entry`` was applied (``path`` is the rendered lookup
        URL); returns the status. It carries the entry's headers but none that describe a
        body, nor the Idempotency-Key (a lookup is not the write)."""
        headers: CIMultiDict[str] = CIMultiDict(
            (k, v)
            for k, v in entry.headers
            if not k.lower().startswith("content-") and k.lower() != "idempotency-key"
        )
        raw_path, _, raw_query = path.partition("?")
        response = await self.send(
            lookup.method, self.target(raw_path, raw_query), headers, None, idempotent=True
        )
        try:
            await response.read(SMALL_RESPONSE)  # read, so the connection is reused
        except ResponseCut:
            pass  # the status is the answer
        finally:
            response.release()
        return response.status
