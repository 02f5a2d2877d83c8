"""The station-facing aiohttp app: forward, or queue; and the ``/_netwatch`` endpoints.

Decision per request (the mode comes from the mode machine, owned by ``station.py``):

- online: forward. Replayable requests are buffered (up to ``max_body``) and get an
  Idempotency-Key if they lack one, so that a failed forward can still be queued and any
  replay de-duplicated. Others stream both ways.
- a forward that fails on the network, or gets 502/503/504: passive failure (offline at
  once); a replayable request is then queued and answered 202 rather than failed. When the
  request may have reached the upstream (it was written, then no answer came), it is queued
  *in doubt*: never re-sent blindly, its rule's dedupe strategy settles it.
- an entry held in doubt for an operator counts as waiting: new writes queue behind it.
- offline or replaying, replayable: queued behind the backlog (committed before the 202).
- offline, anything else: 503 with Retry-After. While *replaying* the link is known good,
  so non-replayable requests (lookups) are still forwarded: the counter keeps working
  during a long drain.

Nothing here logs a body, a path or a header value: paths and bodies carry citizens' data.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry

from netwatch.auth import require_token
from netwatch.config.schema import Proxy
from netwatch.errors import QueueDamagedError, QueueDiskFullError, QueueError, QueueFullError
from netwatch.monitor.api import metrics_handler
from netwatch.proxy.dedupe import rule_for
from netwatch.proxy.forward import (
    UPSTREAM_DOWN_STATUSES,
    BodyTooLarge,
    CountedBody,
    Forwarder,
    ResponseCut,
    UpstreamFailure,
    outgoing_headers,
    read_limited,
)
from netwatch.proxy.metrics import ProxyMetrics
from netwatch.proxy.mode import Mode
from netwatch.proxy.queue import Entry, NewEntry
from netwatch.proxy.staff_page import public_status, staff_page

log = structlog.get_logger("netwatch.proxy.server")

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


def _order_key(request: web.Request) -> str:
    return request.headers.get(ORDER_KEY_HEADER, "")[:MAX_ORDER_KEY]


def _error(status: int, error: str, **extra: Any) -> web.Response:
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in {503, 507} else None
    return web.json_response({"error": error, **extra}, status=status, headers=headers)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _contain_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A handler bug answers 500 JSON instead of an HTML page; logged without any data."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except ResponseCut as cut:
        # The upstream failed after the headers were relayed: the only honest signal left
        # for the station is a cut connection.
        log.warning("proxy_response_cut", method=request.method, reason=str(cut))
        return _hang_up(request)
    except ConnectionResetError:
        # The station hung up while we were answering it: nobody is left to answer.
        log.debug("proxy_station_disconnected", method=request.method)
        return _hang_up(request)
    except Exception:
        log.exception("proxy_handler_failed", method=request.method)
        return _error(500, "internal_error")


def _hang_up(request: web.Request) -> web.Response:
    """Close the station's connection; the response returned is never written (aiohttp
    finds the transport closed and ends the request quietly)."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=499)


class ProxyServer:
    """Builds the aiohttp ``Application`` for one station proxy."""

    def __init__(
        self,
        settings: Proxy,
        core: ProxyCore,
        forwarder: Forwarder,
        metrics: ProxyMetrics,
        registry: CollectorRegistry | None = None,
        *,
        middlewares: Sequence[Middleware] = (),
    ) -> None:
        self.settings = settings
        self._middlewares = tuple(middlewares)
        self._registry = registry
        self._core = core
        self._forwarder = forwarder
        self._metrics = metrics

    def _wrapped(self, handler: Handler) -> Handler:
        """``handler`` inside the middlewares (the first outermost), composed once here:
        aiohttp's own middleware chain adds a layer per request (every request matches a
        route, the catch-all at least, so none bypasses them)."""
        for outer in reversed((*self._middlewares, _contain_errors)):
            handler = functools.partial(outer, handler=handler)
        return handler

    def app(self) -> web.Application:
        app = web.Application()
        wrap = self._wrapped
        token = self.settings.admin_token
        app.router.add_get("/_netwatch/tickets/{ticket}", wrap(self._ticket))
        app.router.add_get("/_netwatch/status", wrap(require_token(token, self._status)))
        app.router.add_get("/_netwatch/healthz", wrap(self._healthz))
        if self._registry is not None:
            # A stand-alone `netwatch proxy` has no daemon endpoint: its metrics live here.
            metrics = require_token(token, metrics_handler(self._registry))
            app.router.add_get("/_netwatch/metrics", wrap(metrics))
        # The counter staff's page: with an admin token it reads the public subset.
        data_url = "/_netwatch/public" if token else "/_netwatch/status"
        app.router.add_get("/_netwatch/", wrap(staff_page(data_url)))
        app.router.add_get("/_netwatch", wrap(self._to_page))
        app.router.add_get("/_netwatch/public", wrap(self._public))
        app.router.add_route("*", "/{tail:.*}", wrap(self._proxy))
        return app

    # --- /_netwatch -----------------------------------------------------------------------

    async def _ticket(self, request: web.Request) -> web.Response:
        entry = await self._core.ticket(request.match_info["ticket"])
        if entry is None:
            return _error(404, "unknown_ticket")
        return web.json_response(
            {
                "ticket": entry.id,
                "state": entry.ticket_state,
                "attempts": entry.attempts,
                "upstream_status": entry.upstream_status,
                "queued_at": iso(entry.queued_at),
                "delivered_at": iso(entry.delivered_at),
                "reason": entry.reason,
                "attempts_in_doubt": entry.doubts,
                "awaiting_operator": entry.state == "in_doubt",
            }
        )

    async def _status(self, _request: web.Request) -> web.Response:
        return web.json_response(self._core.status())

    async def _public(self, _request: web.Request) -> web.Response:
        return web.json_response(public_status(self._core.status()))

    async def _to_page(self, request: web.Request) -> web.Response:
        query = request.rel_url.raw_query_string
        raise web.HTTPFound("/_netwatch/" + (f"?{query}" if query else ""))

    async def _healthz(self, _request: web.Request) -> web.Response:
        problem = await self._core.health()
        if problem is None:
            return web.json_response({"ok": True})
        return web.json_response({"ok": False, **problem}, status=503)

    # --- the proxy ------------------------------------------------------------------------

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/_netwatch/"):
            # The proxy's own namespace is never forwarded, whatever the method.
            return _error(404, "not_found")
        try:
            outcome, response = await self._handle(request)
        except ResponseCut:
            self._metrics.request(request.method, "failed")
            raise
        self._metrics.request(request.method, outcome)
        return response

    async def _handle(self, request: web.Request) -> tuple[str, web.StreamResponse]:
        limit = self.settings.max_body
        if request.content_length is not None and request.content_length > limit:
            return "rejected", _error(413, "body_too_large", max_body=limit)
        headers = outgoing_headers(request)
        rule = rule_for(self.settings.replayable, request.method, request.path)
        if rule is None:
            mode = self._core.mode
            if mode == "offline":
                return "rejected", _error(503, "upstream_unavailable", mode=mode)
            return await self._forward(request, headers, None)
        key = headers.get("Idempotency-Key", "")
        if not key:
            key = new_idempotency_key()
            headers["Idempotency-Key"] = key
        body = await self._read_body(request)
        if isinstance(body, web.Response):
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

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        """The whole body, or the answer that refuses it (too large, or too slow)."""
        limit = self.settings.max_body
        try:
            if request.content.is_eof():  # all in already: nothing to wait for
                return await read_limited(request, limit)
            async with asyncio.timeout(self.settings.body_timeout):
                return await read_limited(request, limit)
        except BodyTooLarge:
            return _error(413, "body_too_large", max_body=limit)
        except TimeoutError:
            # A body trickling in this slowly ties up a connection for nothing.
            response = _error(408, "body_timeout", body_timeout=self.settings.body_timeout)
            response.force_close()
            return response

    async def _forward(
        self,
        request: web.Request,
        headers: CIMultiDict[str],
        buffered: tuple[bytes, str] | None,
        *,
        resend_safe: bool = False,
    ) -> tuple[str, web.StreamResponse]:
        """Forward; ``buffered`` is (body, idempotency key) for a replayable request, and
        ``resend_safe`` says whether the upstream de-duplicates it (its rule's strategy)."""
        fwd = self._forwarder
        method = request.method
        url = request.rel_url
        target = fwd.target(url.raw_path, url.raw_query_string)
        body: bytes | CountedBody | None
        if buffered is not None:
            body = buffered[0]
        elif request.body_exists:
            body = fwd.counted(request)
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
            return "rejected", _error(413, "body_too_large", max_body=self.settings.max_body)
        except UpstreamFailure as failure:
            if not failure.abandoned:
                self._core.passive_failure(failure.reason)
            if buffered is not None:
                return await self._queue(request, headers, *buffered, doubt=failure.in_doubt)
            return "failed", _error(502, "upstream_failed", reason=failure.reason)
        outcome = "forwarded"
        if upstream.status in UPSTREAM_DOWN_STATUSES:
            self._core.passive_failure(f"upstream {upstream.status}")
            if buffered is not None:
                upstream.release()
                return await self._queue(request, headers, *buffered)
            outcome = "failed"
        try:
            return outcome, await fwd.relay(request, upstream)
        except ResponseCut as cut:
            self._core.passive_failure(cut.reason)
            raise

    async def _queue(
        self,
        request: web.Request,
        headers: CIMultiDict[str],
        body: bytes,
        key: str,
        *,
        doubt: bool = False,
    ) -> tuple[str, web.StreamResponse]:
        # Content-Length is recomputed on replay; everything else is replayed as received.
        stored = tuple((k, v) for k, v in headers.items() if k.lower() != "content-length")
        new = NewEntry(
            method=request.method,
            path=request.rel_url.raw_path,
            query=request.rel_url.raw_query_string,
            headers=stored,
            body=body,
            idempotency_key=key,
            order_key=_order_key(request),
            doubt=doubt,
        )
        try:
            entry, position = await self._core.enqueue(new)
        except QueueDiskFullError:
            return "rejected", _error(507, "queue_full", reason="disk full")
        except QueueFullError:
            return "rejected", _error(507, "queue_full", reason="max_bytes reached")
        except QueueDamagedError:
            # Never a 202 the file might not keep: the station keeps the application.
            return "failed", _error(503, "queue_damaged", mode=self._core.mode)
        except QueueError:
            log.exception("proxy_enqueue_failed")
            return "failed", _error(503, "queue_unavailable", mode=self._core.mode)
        payload = {
            "status": "queued",
            "ticket": entry.id,
            "position": position,
            "queued_at": iso(entry.queued_at),
        }
        if doubt:
            payload["in_doubt"] = True  # the upstream may have it: settled before any re-send
        headers_out = {TICKET_HEADER: entry.id, "Location": f"/_netwatch/tickets/{entry.id}"}
        return "queued", web.json_response(payload, status=202, headers=headers_out)
