"""The site endpoint as it was served by aiohttp before ``netwatch.monitor.httpd``: the
proxy's ``/metrics`` handler (still in production, mounted by the station proxy) behind the
same token check, with ``/healthz`` and ``/api/v1/status``. Tests run it to check that
handler, and to compare the two servers' answers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from netwatch.auth import require_token
from netwatch.config.units import split_listen
from netwatch.monitor.api import metrics_handler
from netwatch.monitor.exposition import FastCollector


@asynccontextmanager
async def aiohttp_site(
    registry: CollectorRegistry,
    status: Callable[[], dict[str, Any]],
    fast: Sequence[FastCollector],
    listen: str,
    *,
    token: str | None = None,
) -> AsyncIterator[None]:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def api_status(_: web.Request) -> web.Response:
        return web.json_response(status())

    app = web.Application()
    app.router.add_get("/metrics", require_token(token, metrics_handler(registry, fast)))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/v1/status", require_token(token, api_status))
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, *split_listen(listen)).start()
        yield
    finally:
        await runner.cleanup()
