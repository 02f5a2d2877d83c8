"""Prometheus series of the station proxy, on the injected registry (never the global one).

Counters and the mode gauge are updated by plain calls as things happen. Queue figures
come from a cached ``QueueStats`` (refreshed once a second by the station's housekeeping)
and are exported at scrape time by a custom collector, so a scrape never touches SQLite.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from netwatch.proxy.mode import MODES
from netwatch.proxy.queue import QueueStats

REQUEST_OUTCOMES = ("forwarded", "queued", "rejected", "failed")
# found: an entry in doubt that a lookup showed applied; held: left for an operator.
REPLAY_OUTCOMES = ("delivered", "retried", "dead", "found", "held")
# Anything else collapses to OTHER: a station sending odd verbs must not grow the series.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LAG_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)


class _QueueCollector(Collector):
    def __init__(self, metrics: ProxyMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        stats = self._metrics.queue_stats
        if stats is None:
            return
        site = self._metrics.site
        for name, doc, value in (
            ("netwatch_queue_depth", "Entries waiting in the station queue.", stats.depth),
            (
                "netwatch_queue_oldest_age_seconds",
                "Age of the oldest waiting entry.",
                stats.oldest_age_s,
            ),
            ("netwatch_queue_bytes", "On-disk size of the station queue.", stats.bytes),
            ("netwatch_dead_letters", "Entries in the dead-letter set.", stats.dead),
            (
                "netwatch_queue_in_doubt",
                "Entries that may have been applied upstream without an answer.",
                stats.in_doubt,
            ),
        ):
            family = GaugeMetricFamily(name, doc, labels=["site"])
            family.add_metric([site], float(value))
            yield family


class ProxyMetrics:
    """Every proxy series named by the contract, labelled with ``site``."""

    def __init__(self, registry: CollectorRegistry, site: str) -> None:
        self.site = site
        self.queue_stats: QueueStats | None = None
        self._mode = Gauge(
            "netwatch_proxy_mode",
            "Station proxy mode: 1 on the current one.",
            ["site", "mode"],
            registry=registry,
        )
        self._requests = Counter(
            "netwatch_proxy_requests",
            "Station requests by outcome.",
            ["site", "method", "outcome"],
            registry=registry,
        )
        self._replays = Counter(
            "netwatch_replay",
            "Replay attempts by outcome.",
            ["site", "outcome"],
            registry=registry,
        )
        self._lag = Histogram(
            "netwatch_replay_lag_seconds",
            "Time from queued to delivered.",
            ["site"],
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        for outcome in REPLAY_OUTCOMES:
            self._replays.labels(site, outcome)
        self._request_children: dict[tuple[str, str], Counter] = {}
        registry.register(_QueueCollector(self))

    def set_mode(self, mode: str) -> None:
        for each in MODES:
            self._mode.labels(self.site, each).set(1.0 if each == mode else 0.0)

    def request(self, method: str, outcome: str) -> None:
        key = (method if method in METHODS else "OTHER", outcome)
        child = self._request_children.get(key)
        if child is None:  # label lookups cost more than the increment: once per pair
            child = self._request_children[key] = self._requests.labels(self.site, *key)
        child.inc()

    def replayed(self, outcome: str, lag: float | None = None) -> None:
        self._replays.labels(self.site, outcome).inc()
        if lag is not None:
            self._lag.labels(self.site).observe(max(0.0, lag))
