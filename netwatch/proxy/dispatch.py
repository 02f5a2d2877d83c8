"""What to do with one station request: forward it, queue it, or refuse it.

Decision per request (the mode comes from the mode machine, owned by ``station.py``):

- online: forward. Replayable requests are buffered (up to ``max_body``) and get an
  Idempotency-Key if they lack one, so that a failed forward can still be queued and any
  replay de-duplicated. Others stream both ways.
- a forward that fails on the network, or gets 502/503/504: passive failure (offline at
  once); a replayable request is then queued and answered 202 rather than failed. When the
  request may have been applied upstream (it was written, then no answer came; or a gateway
  answered 502 or 504, which its origin may have applied), it is queued *in doubt*: never
  re-sent blindly, its rule's dedupe strategy settles it.
- an entry held in doubt for an operator counts as waiting: new writes queue behind it.
- offline or replaying, replayable: queued behind the backlog (committed before the 202).
- offline, anything else: 503 with Retry-After. While *replaying* the link is known good,
  so non-replayable requests (lookups) are still forwarded: the counter keeps working
  during a long drain.

The decision is the same whichever HTTP front received the request (the aiohttp app in
``server.py`` or the fast path in ``front.py``): each hands in an ``Incoming`` and writes
out what comes back, an ``Answer`` of the proxy's own or the upstream's ``Response``.

Nothing here logs a body, a path or a header value: paths and bodies carry citizens' data.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from multidict import CIMultiDict

from netwatch.config.schema import Proxy
from netwatch.errors import QueueDamagedError, QueueDiskFullError, QueueError, QueueFullError
from netwatch.proxy.dedupe import rule_for
from netwatch.proxy.forward import (
    GATEWAY_IN_DOUBT,
    UPSTREAM_DOWN_STATUSES,
    BodyTooLarge,
    CountedBody,
    Forwarder,
    Incoming,
    Response,
    UpstreamFailure,
    outgoing_headers,
)
from netwatch.proxy.metrics import ProxyMetrics
from netwatch.proxy.mode import Mode
from netwatch.proxy.queue import Entry, NewEntry

log = structlog.get_logger("netwatch.proxy.dispatch")

ORDER_KEY_HEADER = "Netwatch-Order-Key"
TICKET_HEADER = "Netwatch-Ticket"
MAX_ORDER_KEY = 200
RETRY_AFTER_S = 5
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class ProxyCore(Protocol):
    """What the HTTP layer needs from the station (``StationProxy`` implements it)."""

    @property
    def mode(self) -> Mode: ...

    def mode_for_write(self) -> Mode:
        """The mode, after checking the queue file for writes queued behind our back."""
        ...

    def passive_failure(self, reason: str) -> None: ...

    async def enqueue(self, new: NewEntry) -> tuple[Entry, int]: ...

    async def ticket(self, ticket: str) -> Entry | None: ...

    async def health(self) -> dict[str, str] | None: ...

    def status(self) -> dict[str, Any]: ...


class Station(Incoming, Protocol):
    """One station request as a front hands it in (``Incoming`` plus its body)."""

    @property
    def raw_path(self) -> str:
        """The path as received (percent-encoded), forwarded as it is."""
        ...

    @property
    def raw_query(self) -> str: ...

    @property
    def path(self) -> str:
        """The decoded path, matched against the replayable rules."""
        ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def body_exists(self) -> bool: ...

    def body_arrived(self) -> bool:
        """True when the whole body is in already (no wait, so no body timeout)."""
        ...

    async def read_body(self, limit: int) -> bytes:
        """The whole body; ``BodyTooLarge`` past ``limit``, ``ConnectionResetError`` if
        the station leaves first."""
        ...

    def streamed(self, limit: int) -> bytes | CountedBody:
        """The body for a forward that need not keep it: streamed when the front can."""
        ...


@dataclass(frozen=True, slots=True)
class Answer:
    """The proxy's own JSON answer (a front renders it; ``close`` ends the connection)."""

    status: int
    payload: Mapping[str, Any]
    headers: Mapping[str, str] | None = None
    close: bool = False


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


_keys = random.Random()  # seeded from os.urandom; keys need uniqueness, not secrecy


# The version (4) and variant (RFC 4122) bits of a random UUID, as uuid.UUID sets them.
_UUID4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_idempotency_key() -> str:
    """A random (version 4) UUID without a system call per request (formatted directly:
    building a ``uuid.UUID`` costs more than the rest of the key)."""
    text = f"{(_keys.getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def error(status: int, code: str, *, close: bool = False, **extra: Any) -> Answer:
    """A JSON error: ``{"error": code, **extra}`` (Retry-After on 503 and 507)."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in {503, 507} else None
    return Answer(status, {"error": code, **extra}, headers, close)


class Dispatcher:
    """Forwards, queues or refuses station requests (see the module docstring)."""

    def __init__(
        self, settings: Proxy, core: ProxyCore, forwarder: Forwarder, metrics: ProxyMetrics
    ) -> None:
        self.settings = settings
        self._core = core
        self._forwarder = forwarder
        self._metrics = metrics

    def counted(self, method: str, outcome: str) -> None:
        self._metrics.request(method, outcome)

    def cut(self, reason: str) -> None:
        """The upstream's answer broke after its head was relayed: a passive failure."""
        self._core.passive_failure(reason)

    async def handle(self, request: Station) -> tuple[str, Answer | Response]:
        """The outcome (for the requests counter) and what to answer. An upstream
        ``Response`` is the caller's to relay and release."""
        limit = self.settings.max_body
        if request.content_length is not None and request.content_length > limit:
            return "rejected", error(413, "body_too_large", max_body=limit)
        headers = outgoing_headers(request)
        rule = rule_for(self.settings.replayable, request.method, request.path)
        if rule is None:
            mode = self._core.mode
            if mode == "offline":
                return "rejected", error(503, "upstream_unavailable", mode=mode)
            return await self._forward(request, headers, None)
        key = headers.get("Idempotency-Key", "")
        if not key:
            key = new_idempotency_key()
            headers["Idempotency-Key"] = key
        body = await self._read_body(request)
        if isinstance(body, Answer):
            return "rejected", body
        # Decided once the write has fully arrived, from the queue file's backlog: queued
        # behind anything waiting (even while replaying, or held in doubt), so it never
        # overtakes an older write on its order key, whoever put that one back in the queue.
        if self._core.mode_for_write() != "online":
            return await self._queue(request, headers, body, key)
        dedupe = self.settings.dedupe if rule.dedupe is None else rule.dedupe
        return await self._forward(
            request, headers, (body, key), resend_safe=dedupe == "idempotency-key"
        )

    async def _read_body(self, request: Station) -> bytes | Answer:
        """The whole body, or the answer that refuses it (too large, or too slow)."""
        limit = self.settings.max_body
        try:
            if request.body_arrived():  # all in already: nothing to wait for
                return await request.read_body(limit)
            async with asyncio.timeout(self.settings.body_timeout):
                return await request.read_body(limit)
        except BodyTooLarge:
            return error(413, "body_too_large", max_body=limit)
        except TimeoutError:
            # A body trickling in this slowly ties up a connection for nothing.
            timeout = self.settings.body_timeout
            return error(408, "body_timeout", close=True, body_timeout=timeout)

    async def _forward(
        self,
        request: Station,
        headers: CIMultiDict[str],
        buffered: tuple[bytes, str] | None,
        *,
        resend_safe: bool = False,
    ) -> tuple[str, Answer | Response]:
        """Forward; ``buffered`` is (body, idempotency key) for a replayable request, and
        ``resend_safe`` says whether the upstream de-duplicates it (its rule's strategy)."""
        fwd = self._forwarder
        method = request.method
        target = fwd.target(request.raw_path, request.raw_query)
        body: bytes | CountedBody | None
        if buffered is not None:
            body = buffered[0]
        elif request.body_exists:
            body = request.streamed(self.settings.max_body)
        else:
            body = None
        idempotent = resend_safe or (buffered is None and method in SAFE_METHODS and body is None)
        try:
            upstream = await fwd.send(
                method,
                target,
                headers,
                body,
                abandonable=buffered is not None,
                idempotent=idempotent,
            )
        except BodyTooLarge:
            return "rejected", error(413, "body_too_large", max_body=self.settings.max_body)
        except UpstreamFailure as failure:
            if not failure.abandoned:
                self._core.passive_failure(failure.reason)
            if buffered is not None:
                return await self._queue(request, headers, *buffered, doubt=failure.in_doubt)
            return "failed", error(502, "upstream_failed", reason=failure.reason)
        if upstream.status in UPSTREAM_DOWN_STATUSES:
            self._core.passive_failure(f"upstream {upstream.status}")
            if buffered is not None:
                upstream.release()
                doubt = upstream.status in GATEWAY_IN_DOUBT
                return await self._queue(request, headers, *buffered, doubt=doubt)
            return "failed", upstream
        return "forwarded", upstream

    async def _queue(
        self,
        request: Station,
        headers: CIMultiDict[str],
        body: bytes,
        key: str,
        *,
        doubt: bool = False,
    ) -> tuple[str, Answer]:
        # Content-Length is recomputed on replay; everything else is replayed as received.
        stored = tuple((k, v) for k, v in headers.items() if k.lower() != "content-length")
        new = NewEntry(
            method=request.method,
            path=request.raw_path,
            query=request.raw_query,
            headers=stored,
            body=body,
            idempotency_key=key,
            order_key=request.headers.get(ORDER_KEY_HEADER, "")[:MAX_ORDER_KEY],
            doubt=doubt,
        )
        try:
            entry, position = await self._core.enqueue(new)
        except QueueDiskFullError:
            return "rejected", error(507, "queue_full", reason="disk full")
        except QueueFullError:
            return "rejected", error(507, "queue_full", reason="max_bytes reached")
        except QueueDamagedError:
            # Never a 202 the file might not keep: the station keeps the application.
            return "failed", error(503, "queue_damaged", mode=self._core.mode)
        except QueueError:
            log.exception("proxy_enqueue_failed")
            return "failed", error(503, "queue_unavailable", mode=self._core.mode)
        payload: dict[str, Any] = {
            "status": "queued",
            "ticket": entry.id,
            "position": position,
            "queued_at": iso(entry.queued_at),
        }
        if doubt:
            payload["in_doubt"] = True  # the upstream may have it: settled before any re-send
        headers_out = {TICKET_HEADER: entry.id, "Location": f"/_netwatch/tickets/{entry.id}"}
        return "queued", Answer(202, payload, headers_out)
