"""Prometheus metrics of the site monitor, on one injected registry.

Per-probe series are updated by plain functions as results arrive (children are cached per
target so the hot path does no label lookups); state that is a function of time (peak hours,
outage seconds) is computed at scrape time by a custom collector.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from probes import ProbeResult

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
PHASES = ("resolve", "connect", "tls", "processing", "transfer")
STATES = ("up", "degraded", "down", "unknown")
_TL = ("site", "target", "type")


@dataclass(frozen=True, slots=True)
class OutageTotals:
    """Outage seconds per target split by peak, open outages included."""

    target: str
    type: str
    off_peak_seconds: float
    peak_seconds: float


class _TargetChildren:
    """Pre-resolved metric children of one target (label lookups off the hot path)."""

    def __init__(self, m: MonitorMetrics, target: str, type_: str) -> None:
        labels = (m.site, target, type_)
        self.success = m.probe_success.labels(*labels)
        self.duration = m.probe_duration.labels(*labels)
        self.loss = m.probe_loss.labels(*labels)
        self.phases = {p: m.probe_phase.labels(*labels, p) for p in PHASES}
        self.link_up = m.link_up.labels(*labels)
        self.states = {s: m.link_state.labels(*labels, s) for s in STATES}
        self.labels = labels
        self.m = m


class MonitorMetrics:
    """Every monitor series named by the contract, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, site: str, version: str) -> None:
        self.site = site
        self.registry = registry
        self.probe_success = Gauge(
            "netwatch_probe_success",
            "Last probe of the target succeeded (1) or not (0).",
            _TL,
            registry=registry,
        )
        self.probe_duration = Histogram(
            "netwatch_probe_duration_seconds",
            "Probe round-trip time (ICMP: per reply).",
            _TL,
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.probe_phase = Gauge(
            "netwatch_probe_phase_seconds",
            "HTTP phases of the last probe.",
            (*_TL, "phase"),
            registry=registry,
        )
        self.probe_loss = Gauge(
            "netwatch_probe_loss_ratio",
            "ICMP loss ratio of the last round.",
            _TL,
            registry=registry,
        )
        self.probe_errors = Counter(
            "netwatch_probe_errors_total",
            "Failed probes by error class.",
            (*_TL, "error"),
            registry=registry,
        )
        self.cert_expiry = Gauge(
            "netwatch_probe_cert_expiry_days",
            "Days until the peer certificate expires (tls).",
            _TL,
            registry=registry,
        )
        self.link_up = Gauge(
            "netwatch_link_up",
            "Link state is up or degraded (1) or not (0).",
            _TL,
            registry=registry,
        )
        self.link_state = Gauge(
            "netwatch_link_state",
            "One series per link state, 1 on the current one.",
            (*_TL, "state"),
            registry=registry,
        )
        self.transitions = Counter(
            "netwatch_link_transitions_total",
            "Link state changes.",
            (*_TL, "to"),
            registry=registry,
        )
        self.outages = Counter(
            "netwatch_outages_total",
            'Outages begun; peak="true" when inside peak hours.',
            (*_TL, "peak"),
            registry=registry,
        )
        self.scheduler_lag = Histogram(
            "netwatch_scheduler_lag_seconds",
            "How late probes start against their schedule.",
            ("site",),
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.scheduler_skipped = Counter(
            "netwatch_scheduler_skipped_total",
            "Probe rounds skipped because the previous round of the target was still running.",
            ("site",),
            registry=registry,
        )
        Gauge(
            "netwatch_build_info", "Build information.", ("site", "version"), registry=registry
        ).labels(site, version).set(1)
        self._lag = self.scheduler_lag.labels(site)
        self._skipped = self.scheduler_skipped.labels(site)
        self._children: dict[str, _TargetChildren] = {}

    # --- hot path -------------------------------------------------------------------------

    def children(self, target: str, type_: str) -> _TargetChildren:
        child = self._children.get(target)
        if child is None:
            child = self._children[target] = _TargetChildren(self, target, type_)
        return child

    def observe_probe(self, child: _TargetChildren, result: ProbeResult) -> None:
        child.success.set(1 if result.success else 0)
        if result.success:
            for rtt in result.rtts or ((result.latency,) if result.latency is not None else ()):
                child.duration.observe(rtt)
        else:
            self.probe_errors.labels(*child.labels, result.error or "other").inc()
        if result.loss is not None:
            child.loss.set(result.loss)
        if result.phases:
            for phase, seconds in result.phases.items():
                gauge = child.phases.get(phase)
                if gauge is not None:
                    gauge.set(seconds)
        days = result.details.get("days_to_expiry") if result.details else None
        if isinstance(days, int | float):
            self.cert_expiry.labels(*child.labels).set(days)

    def observe_lag(self, seconds: float) -> None:
        self._lag.observe(max(0.0, seconds))

    def skipped_round(self) -> None:
        self._skipped.inc()

    def set_state(self, child: _TargetChildren, state: str, *, changed: bool) -> None:
        for name, gauge in child.states.items():
            gauge.set(1 if name == state else 0)
        child.link_up.set(1 if state in ("up", "degraded") else 0)
        if changed:
            self.transitions.labels(*child.labels, state).inc()

    def outage_began(self, child: _TargetChildren, *, peak: bool) -> None:
        self.outages.labels(*child.labels, "true" if peak else "false").inc()

    def ensure_outage_series(self, child: _TargetChildren) -> None:
        """Create the zero-valued outage counters so rate() works from the first outage."""
        for peak in ("true", "false"):
            self.outages.labels(*child.labels, peak)

    def forget(self, target: str) -> None:
        """Drop every series of a target removed by a config reload."""
        child = self._children.pop(target, None)
        if child is None:
            return
        for metric in (
            self.probe_success,
            self.probe_duration,
            self.probe_loss,
            self.link_up,
            self.cert_expiry,
        ):
            _remove(metric, child.labels)
        for phase in PHASES:
            _remove(self.probe_phase, (*child.labels, phase))
        for state in STATES:
            _remove(self.link_state, (*child.labels, state))
            _remove(self.transitions, (*child.labels, state))
        for peak in ("true", "false"):
            _remove(self.outages, (*child.labels, peak))


def _remove(metric: Gauge | Counter | Histogram, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


class TimeCollector(Collector):
    """Series that are functions of time, computed at scrape time."""

    def __init__(
        self,
        site: str,
        is_peak: Callable[[], bool],
        outage_totals: Callable[[], Iterable[OutageTotals]],
    ) -> None:
        self._site = site
        self._is_peak = is_peak
        self._outage_totals = outage_totals

    def collect(self) -> Iterable[Metric]:
        peak = GaugeMetricFamily(
            "netwatch_peak_hours", "The site is inside a peak window now.", labels=["site"]
        )
        peak.add_metric([self._site], 1 if self._is_peak() else 0)
        yield peak
        seconds = CounterMetricFamily(
            "netwatch_outage_seconds",
            "Time spent down, split by peak hours.",
            labels=["site", "target", "type", "peak"],
        )
        for t in self._outage_totals():
            seconds.add_metric([self._site, t.target, t.type, "true"], t.peak_seconds)
            seconds.add_metric([self._site, t.target, t.type, "false"], t.off_peak_seconds)
        yield seconds

    def describe(self) -> Iterable[Metric]:
        return []


def sample_map(
    registry: CollectorRegistry, name: str
) -> Mapping[tuple[tuple[str, str], ...], float]:
    """All samples of one metric name keyed by sorted label pairs (for status views and tests)."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out
