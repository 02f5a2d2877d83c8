"""The station-facing aiohttp app: the proxy (``dispatch.py`` decides) and the
``/_netwatch`` endpoints.

Every request the fast front (``front.py``) does not take reaches this app: the
``/_netwatch`` namespace, and anything that is not a plain, complete request (chunked or
streamed bodies, ``Expect``, upgrades, malformed input: aiohttp's parser and its answers).

Nothing here logs a body, a path or a header value: paths and bodies carry citizens' data.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Sequence

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDictProxy
from prometheus_client import CollectorRegistry

from netwatch.auth import require_token
from netwatch.config.schema import Proxy
from netwatch.monitor.api import metrics_handler
from netwatch.proxy.dispatch import Answer, Dispatcher, ProxyCore, error, iso
from netwatch.proxy.forward import (
    BODYLESS,
    CHUNK,
    SMALL_RESPONSE,
    BodyTooLarge,
    CountedBody,
    Response,
    ResponseCut,
    response_headers,
)
from netwatch.proxy.staff_page import public_status, staff_page

log = structlog.get_logger("netwatch.proxy.server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(answer: Answer) -> web.Response:
    response = web.json_response(answer.payload, status=answer.status, headers=answer.headers)
    if answer.close:
        response.force_close()
    return response


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
        return _json(error(500, "internal_error"))


def _hang_up(request: web.Request) -> web.Response:
    """Close the station's connection; the response returned is never written (aiohttp
    finds the transport closed and ends the request quietly)."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response(status=499)


class _Request:
    """An aiohttp request as the dispatcher reads it (``dispatch.Station``)."""

    __slots__ = ("_request", "method", "path", "raw_path", "raw_query")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.method = request.method
        self.path = request.path
        url = request.rel_url
        self.raw_path = url.raw_path
        self.raw_query = url.raw_query_string

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self._request.headers

    @property
    def remote(self) -> str | None:
        return self._request.remote

    @property
    def scheme(self) -> str:
        return self._request.scheme

    @property
    def content_length(self) -> int | None:
        return self._request.content_length

    @property
    def body_exists(self) -> bool:
        return self._request.body_exists

    def body_arrived(self) -> bool:
        return self._request.content.is_eof()

    async def read_body(self, limit: int) -> bytes:
        """The whole body, or ``BodyTooLarge`` as soon as it passes ``limit`` (chunked too)."""
        request = self._request
        content = request.content
        if content.is_eof():
            # The usual case: the body came with its head and is all in; taken as it is.
            body = content.read_nowait(-1)
            if len(body) > limit:
                raise BodyTooLarge
            return body
        length = request.content_length
        if length is not None and length <= limit:
            # The common case: one read of a known length, no chunk iteration.
            try:
                return await content.readexactly(length)
            except asyncio.IncompleteReadError as exc:
                raise ConnectionResetError("the station closed before its body") from exc
        buffer = bytearray()
        async for chunk in content.iter_chunked(CHUNK):
            buffer += chunk
            if len(buffer) > limit:
                raise BodyTooLarge
        return bytes(buffer)

    def streamed(self, limit: int) -> CountedBody:
        request = self._request
        return CountedBody(request.content, request.content_length, limit)


async def relay(request: web.BaseRequest, upstream: Response) -> web.StreamResponse:
    """Stream the upstream response back to the station as it arrives; a small one of
    known length is read whole and answered in one write (headers and body together)."""
    length = upstream.content_length
    bodyless = request.method == "HEAD" or upstream.status in BODYLESS
    if length is not None and length <= SMALL_RESPONSE and not bodyless:
        try:
            body = await upstream.read()
        finally:
            upstream.release()
        return web.Response(
            status=upstream.status,
            reason=upstream.reason or None,
            headers=response_headers(upstream.headers),
            body=body,
        )
    response = web.StreamResponse(
        status=upstream.status,
        reason=upstream.reason or None,
        headers=response_headers(upstream.headers),
    )
    await response.prepare(request)
    try:
        # Once the headers are out, a ResponseCut can only cut the station's connection.
        while chunk := await upstream.read_chunk():
            await response.write(chunk)
    finally:
        upstream.release()
    await response.write_eof()
    return response


class ProxyServer:
    """Builds the aiohttp ``Application`` for one station proxy."""

    def __init__(
        self,
        settings: Proxy,
        core: ProxyCore,
        dispatcher: Dispatcher,
        registry: CollectorRegistry | None = None,
        *,
        middlewares: Sequence[Middleware] = (),
    ) -> None:
        self.settings = settings
        self._middlewares = tuple(middlewares)
        self._registry = registry
        self._core = core
        self._dispatcher = dispatcher

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
            return _json(error(404, "unknown_ticket"))
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
            return _json(error(404, "not_found"))
        dispatcher = self._dispatcher
        outcome, answer = await dispatcher.handle(_Request(request))
        if isinstance(answer, Answer):
            dispatcher.counted(request.method, outcome)
            return _json(answer)
        try:
            response = await relay(request, answer)
        except ResponseCut as cut:
            dispatcher.cut(cut.reason)
            dispatcher.counted(request.method, "failed")
            raise
        dispatcher.counted(request.method, outcome)
        return response
