"""The daemon's own HTTP endpoint: ``/metrics``, ``/healthz`` and ``/api/v1/status``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from typing import Any

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry

from netwatch.auth import require_token
from netwatch.config.units import split_listen
from netwatch.monitor.exposition import FastCollector, scrape

StatusProvider = Callable[[], dict[str, Any]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def metrics_handler(registry: CollectorRegistry, fast: Sequence[FastCollector] = ()) -> Handler:
    """A ``/metrics`` handler for ``registry`` (also mounted by the station proxy); the
    ``fast`` collectors (registered in it too) render themselves in slices on the loop.

    The body is streamed chunk by chunk as it is rendered (chunked transfer encoding), and
    gzip-compressed when the scraper accepts it, as Prometheus does: 2.6 MB of text for
    1,000 targets goes out as about 100 kB, and no write holds the loop for long."""

    async def metrics(request: web.Request) -> web.StreamResponse:
        headers, body = scrape(registry, fast, request.headers.get(hdrs.ACCEPT_ENCODING, ""))
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        async with aclosing(body):
            try:
                if request.method != hdrs.METH_HEAD:
                    async for chunk in body:
                        await response.write(chunk)
                await response.write_eof()
            except ConnectionResetError:
                pass  # the scraper left (its scrape timeout): nobody to render for
        return response

    return metrics


def build_app(
    registry: CollectorRegistry,
    status: StatusProvider,
    fast: Sequence[FastCollector] = (),
    *,
    token: str | None = None,
) -> web.Application:
    """``/metrics`` and ``/api/v1/status`` need ``token`` when one is set; ``/healthz``
    stays open for container and load-balancer health checks (it says nothing)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def api_status(_: web.Request) -> web.Response:
        return web.json_response(status())

    app = web.Application()
    app.router.add_get("/metrics", require_token(token, metrics_handler(registry, fast)))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/status", require_token(token, api_status))
    return app


@asynccontextmanager
async def serve(app: web.Application, listen: str) -> AsyncIterator[web.AppRunner]:
    """Serve ``app`` on ``host:port`` for the lifetime of the context."""
    host, port = split_listen(listen)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield runner
    finally:
        await runner.cleanup()
