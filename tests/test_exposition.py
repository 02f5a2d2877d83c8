"""``/metrics`` as a scraper sees it: streamed in chunks, gzip when asked, the same text
either way, and the rest of the registry formatted in parts that add up to exactly what
prometheus_client writes."""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from helpers.aiohttp_site import aiohttp_site
from helpers.daemon import free_tcp_port
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from netwatch.monitor.exposition import (
    PART_SAMPLES,
    FastCollector,
    chunks,
    family_parts,
    gzipped,
    render,
    snapshot,
)
from netwatch.monitor.metrics import MonitorMetrics, OutageTotals, TimeCollector
from probes import ProbeResult

SITE = "q1-ben-nghe"
BIG = 3 * PART_SAMPLES + 17  # samples of the large ordinary family


class ManyTargets(Collector):
    """An ordinary collector with one family larger than a slice (like target_info)."""

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily("t_info", 'Help with "quotes" \\ and\nnewline.', labels=["t"])
        for i in range(BIG):
            family.add_metric([f"target-{i}"], 1)
        yield family

    def describe(self) -> Iterable[Metric]:
        return []


def site_registry(targets: int = 120) -> tuple[CollectorRegistry, list[FastCollector]]:
    """A registry as the daemon builds it: fast per-target collectors and ordinary ones."""
    registry = CollectorRegistry()
    metrics = MonitorMetrics(registry, SITE, "1.2.3")
    totals = []
    for i in range(targets):
        series = metrics.children(f"t{i:03d}", "tcp")
        metrics.observe_probe(
            series, ProbeResult(type="tcp", target="x", success=True, latency=i / 1000)
        )
        metrics.set_state(series, "up", changed=True)
        totals.append(OutageTotals(f"t{i:03d}", "tcp", float(i), 0.5))
    metrics.observe_lag(0.0007)
    time_series = TimeCollector(SITE, lambda: False, lambda: totals)
    registry.register(time_series)
    registry.register(ManyTargets())
    return registry, [metrics.targets, time_series]


@asynccontextmanager
async def metrics_server(
    registry: CollectorRegistry, fast: list[FastCollector], token: str | None = None
) -> AsyncIterator[str]:
    listen = f"127.0.0.1:{free_tcp_port()}"
    async with aiohttp_site(registry, dict, fast, listen, token=token):
        yield f"http://{listen}/metrics"


async def scrape(
    url: str, headers: dict[str, str], method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """The response as sent: no automatic decompression."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.request(method, url, headers=headers) as response,
    ):
        return response.status, dict(response.headers), await response.read()


async def test_scrape_is_streamed_and_equals_the_plain_render() -> None:
    registry, fast = site_registry()
    async with metrics_server(registry, fast) as url:
        status, headers, body = await scrape(url, {"Accept-Encoding": "identity"})
    assert status == 200
    assert headers["Transfer-Encoding"] == "chunked"
    assert "Content-Encoding" not in headers
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert body == await render(registry, fast)
    assert b'netwatch_link_up{site="q1-ben-nghe",target="t119",type="tcp"} 1.0\n' in body
    assert body.count(b"# TYPE t_info gauge\n") == 1


async def test_gzip_is_honoured_and_decompresses_to_the_plain_render() -> None:
    registry, fast = site_registry()
    async with metrics_server(registry, fast) as url:
        # Prometheus' own header.
        accept = "gzip"
        status, headers, body = await scrape(url, {"Accept-Encoding": accept})
        _, _, plain = await scrape(url, {"Accept-Encoding": "identity"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Vary"] == "Accept-Encoding"
    assert gzip.decompress(body) == plain
    assert len(body) * 10 < len(plain)


async def test_gzip_stream_is_one_member_whatever_the_chunks() -> None:
    async def source() -> AsyncIterator[bytes]:
        for i in range(50):
            yield f"line {i}\n".encode() * i
            yield b""

    compressed = b"".join([chunk async for chunk in gzipped(source())])
    assert gzip.decompress(compressed) == b"".join(f"line {i}\n".encode() * i for i in range(50))


async def test_head_has_the_headers_and_no_body() -> None:
    registry, fast = site_registry(targets=3)
    async with metrics_server(registry, fast) as url:
        status, headers, body = await scrape(url, {"Accept-Encoding": "gzip"}, method="HEAD")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert body == b""


async def test_concurrent_scrapes_each_get_every_series_once() -> None:
    """The fast collectors are muted while the rest is collected; two scrapes whose
    renders interleave must neither lose nor duplicate the per-target series."""
    registry, fast = site_registry()
    expected = await render(registry, fast)
    async with metrics_server(registry, fast) as url:
        answers = await asyncio.gather(
            *(scrape(url, {"Accept-Encoding": "identity"}) for _ in range(4))
        )
    assert [body for _, _, body in answers] == [expected] * 4


async def test_scrape_still_needs_the_token() -> None:
    registry, fast = site_registry(targets=2)
    async with metrics_server(registry, fast, token="s3cret") as url:
        status, headers, body = await scrape(url, {"Accept-Encoding": "gzip"})
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer ")
        assert b"netwatch_" not in body
        status, _, body = await scrape(
            url, {"Accept-Encoding": "gzip", "Authorization": "Bearer s3cret"}
        )
    assert status == 200
    assert b"netwatch_link_up" in gzip.decompress(body)


def test_a_large_family_is_formatted_in_parts_that_add_up_to_one_piece() -> None:
    registry = CollectorRegistry()
    registry.register(ManyTargets())
    requests = Counter("requests", "Requests.", ["n"], registry=registry)
    for i in range(BIG):
        requests.labels(str(i)).inc(i)  # each child has a _created sample, moved after
    Histogram("wait_seconds", "Wait.", registry=registry).observe(0.2)
    text = b""
    for family in registry.collect():
        parts = list(family_parts(family))
        if len(family.samples) > PART_SAMPLES:
            assert len(parts) > 1, family.name
            assert all(part.count(b"\n") <= PART_SAMPLES + 4 for part in parts)
        text += b"".join(parts)
    assert text == generate_latest(registry)


async def test_the_rest_of_the_registry_renders_byte_for_byte_as_prometheus_client() -> None:
    registry = CollectorRegistry()
    registry.register(ManyTargets())
    Counter("requests", "Requests.", ["n"], registry=registry).labels("a").inc()
    parts = [chunk async for chunk in chunks(snapshot(registry, []), [])]
    assert len(parts) > BIG // PART_SAMPLES
    assert b"".join(parts) == generate_latest(registry)


async def test_a_scraper_leaving_mid_body_is_no_error(caplog: pytest.LogCaptureFixture) -> None:
    registry, fast = site_registry(targets=1000)
    async with metrics_server(registry, fast) as url:
        host, port = url.removeprefix("http://").removesuffix("/metrics").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: netwatch\r\nAccept-Encoding: gzip\r\n\r\n")
        await reader.read(1000)
        writer.transport.abort()  # as a scrape timeout does, mid-body
        await asyncio.sleep(0.5)
        status, _, body = await scrape(url, {"Accept-Encoding": "gzip"})
    assert status == 200
    assert gzip.decompress(body) == await render(registry, fast)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
