"""Fast Prometheus text exposition for the per-target series of a large site.

prometheus_client renders about 35,000 samples (1,000 targets) in half a second of CPU while
holding the GIL, which stalls the probe scheduler during every scrape. The monitor's series
are kept as plain numbers with their label strings escaped once, and rendered here on the
event loop in slices (yielding between targets), so a scrape costs little and delays no
probe. The same collectors still implement ``collect()`` for ``registry.get_sample_value``
and for any ordinary ``generate_latest`` of the registry.

The rest of the registry (scheduler, city, proxy, MQTT series) is collected in one go and
then formatted by prometheus_client family by family, a large family in parts of
``PART_SAMPLES`` samples: formatting the 1,000 ``netwatch_target_info`` samples at once took
12 ms of CPU (about 12 us a sample), long enough to start several probes late at 500
probes/s. The body is produced as a stream of chunks (``chunks``), gzip-compressed chunk by
chunk when the scraper accepts it (``gzipped``), so no step of a scrape holds the loop for
long.
"""

from __future__ import annotations

import asyncio
import copy
import math
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import gzip_accepted
from prometheus_client.registry import Collector

# Lines rendered between two yields to the event loop (about a millisecond of work).
SLICE_LINES = 600
# Samples prometheus_client formats between two yields (slower a line: about a millisecond).
PART_SAMPLES = 100
# zlib level of a gzip-encoded scrape: level 1 compresses a 1,000-target body (2.6 MB) 25
# times in 6 ms of CPU; the default level 6 is 12 % smaller for 3.4 times the CPU.
GZIP_LEVEL = 1
# prometheus_client moves these samples of a family to their own gauge after the family.
_TRAILING = ("_created", "_gsum", "_gcount")


def escape(value: str) -> str:
    """A label value escaped for the text format."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def header(name: str, kind: str, help_text: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def value(number: float) -> str:
    """A sample value as the text format writes it (``repr`` parses back exactly)."""
    d = float(number)
    if d != d:  # noqa: PLR0124 - the NaN test
        return "NaN"
    if d in (math.inf, -math.inf):
        return "+Inf" if d > 0 else "-Inf"
    return repr(d)


def in_slices(lines: Iterable[str]) -> Iterator[list[str]]:
    """Group lines into chunks of about ``SLICE_LINES`` (the renderer yields between)."""
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) >= SLICE_LINES:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class FastCollector(Protocol):
    """A collector that can also render itself straight to text, in slices."""

    muted: bool

    def render_slices(self) -> Iterable[list[str]]:
        """Lines of the text format, in chunks; the renderer yields between chunks."""
        ...


class _Family(Collector):
    """One metric family as a collector, for ``generate_latest``."""

    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterable[Metric]:
        return [self._metric]

    def describe(self) -> Iterable[Metric]:
        return []


def family_parts(metric: Metric) -> Iterator[bytes]:
    """``generate_latest`` of one family, in parts of at most ``PART_SAMPLES`` samples whose
    concatenation is exactly the family's text."""
    samples = metric.samples
    if len(samples) <= PART_SAMPLES:
        yield generate_latest(_Family(metric))
        return
    moved = {metric.name + suffix for suffix in _TRAILING}
    groups = [[s for s in samples if s.name not in moved]]
    groups += [[s for s in samples if s.name == metric.name + x] for x in sorted(_TRAILING)]
    first = True
    for trailing, group in enumerate(groups):
        for start in range(0, len(group), PART_SAMPLES):
            part = copy.copy(metric)
            part.samples = group[start : start + PART_SAMPLES]
            text = generate_latest(_Family(part))
            # Each part comes with the family's HELP and TYPE lines (one line each: help
            # text is escaped), and a trailing group's part with that group's too: kept
            # only where the whole family's text has them.
            skip = (0 if first else 2) + (2 if trailing and start else 0)
            yield text.split(b"\n", skip)[skip] if skip else text
            first = False


def snapshot(registry: CollectorRegistry, fast: Sequence[FastCollector]) -> list[Metric]:
    """Every family of the registry but the fast collectors', collected at once (so a
    concurrent scrape never sees a fast collector unmuted)."""
    for collector in fast:
        collector.muted = True
    try:
        return list(registry.collect())
    finally:
        for collector in fast:
            collector.muted = False


async def chunks(
    rest: Sequence[Metric], fast: Sequence[FastCollector]
) -> AsyncGenerator[bytes, None]:
    """The text format in chunks, yielding to the loop between chunks: ``rest`` (from
    ``snapshot``) by prometheus_client, then the fast collectors by their own renderer."""
    for family in rest:
        for part in family_parts(family):
            yield part
            await asyncio.sleep(0)
    for collector in fast:
        for chunk in collector.render_slices():
            yield "".join(chunk).encode()
            await asyncio.sleep(0)


async def render(registry: CollectorRegistry, fast: Sequence[FastCollector]) -> bytes:
    """The whole text exposition of the registry as one body."""
    return b"".join([chunk async for chunk in chunks(snapshot(registry, fast), fast)])


async def gzipped(source: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """``source`` as one gzip stream, compressed chunk by chunk (each a fraction of a
    millisecond at ``GZIP_LEVEL``); chunks zlib keeps buffered are not yielded empty."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    async for chunk in source:
        data = compressor.compress(chunk)
        if data:
            yield data
    yield compressor.flush()


def scrape(
    registry: CollectorRegistry, fast: Sequence[FastCollector], accept_encoding: str
) -> tuple[dict[str, str], AsyncGenerator[bytes, None]]:
    """What a ``/metrics`` answer is made of, for both servers that give one (the station
    proxy's aiohttp app and the site endpoint): its headers, and its body streamed as it is
    rendered, gzip-compressed when the scraper accepts it, as Prometheus does. The registry
    is collected here, before the status line goes out: a failure is still a 500."""
    rest = snapshot(registry, fast)
    headers = {"Content-Type": CONTENT_TYPE_LATEST, "Vary": "Accept-Encoding"}
    body = chunks(rest, fast)
    if gzip_accepted(accept_encoding):
        headers["Content-Encoding"] = "gzip"
        body = gzipped(body)
    return headers, body
