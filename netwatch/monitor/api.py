"""``/metrics`` for aiohttp apps: the station proxy mounts it (the site daemon's endpoint is
``netwatch.monitor.httpd``, which answers ``/metrics`` from the same ``exposition.scrape``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing

from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry

from netwatch.monitor.exposition import FastCollector, scrape

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
