"""Prometheus metrics of the site monitor, on one injected registry.

The per-target series (the bulk of a large site: about 30 lines per target) live in
``TargetSeries`` objects updated by plain functions as results arrive, and are exported by
one collector that also renders itself fast (see ``exposition.py``). Series that are a
function of time (peak hours, outage seconds) are computed at scrape time. The few
site-wide series (scheduler lag, build info) are ordinary prometheus_client metrics.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from netwatch.monitor.exposition import escape, header, in_slices, value
from probes import ProbeResult

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 2.5, 5.0, 10.0)
LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
PHASES = ("resolve", "connect", "tls", "processing", "transfer")
STATES = ("up", "degraded", "down", "unknown")
PEAKS = ("true", "false")
_LE = (*(value(b) for b in DURATION_BUCKETS), "+Inf")


@dataclass(frozen=True, slots=True)
class OutageTotals:
    """Outage seconds per target split by peak, open outages included."""

    target: str
    type: str
    off_peak_seconds: float
    peak_seconds: float


Split = Callable[[datetime, datetime], tuple[float, float]]


class OutageMeter:
    """The outage seconds of one target, ``(off_peak, peak)``: a counter that never goes
    back and never counts a step of the wall clock as time spent down.

    How long comes from the monotonic clock; the wall clock only places that time in the
    week, to split it at peak-window boundaries (``split`` is ``PeakSchedule.split``). The
    open stretch of an outage is laid from the wall time of its last ``fold`` for as long
    as the monotonic clock says; each ``fold`` (every probe round) banks it and takes the
    wall clock afresh, so after a step the time that follows is peak or not by the new
    wall time, and the stretch around the step is off by at most one probe interval.
    """

    __slots__ = ("_open_mono", "_open_wall", "off_peak", "peak")

    def __init__(self) -> None:
        self.off_peak = 0.0
        self.peak = 0.0
        self._open_wall: datetime | None = None
        self._open_mono = 0.0

    @property
    def open(self) -> bool:
        return self._open_wall is not None

    def begin(self, wall: datetime, mono: float) -> None:
        self._open_wall, self._open_mono = wall, mono

    def fold(self, wall: datetime, mono: float, split: Split) -> None:
        """Bank the open stretch up to ``mono`` and restart it at ``wall`` (no-op if closed)."""
        off, on = self._stretch(mono, split)
        self.off_peak += off
        self.peak += on
        if self._open_wall is not None:
            self._open_wall, self._open_mono = wall, max(mono, self._open_mono)

    def end(self, wall: datetime, mono: float, split: Split) -> None:
        self.fold(wall, mono, split)
        self._open_wall = None

    def totals(self, mono: float, split: Split) -> tuple[float, float]:
        """``(off_peak, peak)`` seconds at ``mono``, the open stretch included."""
        off, on = self._stretch(mono, split)
        return self.off_peak + off, self.peak + on

    def _stretch(self, mono: float, split: Split) -> tuple[float, float]:
        if self._open_wall is None:
            return 0.0, 0.0
        elapsed = max(0.0, mono - self._open_mono)
        return split(self._open_wall, self._open_wall + timedelta(seconds=elapsed))


class TargetSeries:
    """Every per-target number the monitor exports, as plain attributes."""

    __slots__ = (
        "buckets",
        "cert_days",
        "count",
        "errors",
        "labels",
        "loss",
        "outages",
        "phases",
        "state",
        "success",
        "sum",
        "target",
        "transitions",
        "type",
    )

    def __init__(self, site: str, target: str, type_: str) -> None:
        self.target = target
        self.type = type_
        self.labels = f'site="{escape(site)}",target="{escape(target)}",type="{escape(type_)}"'
        self.success: float | None = None
        self.loss: float | None = None
        self.phases: dict[str, float] = {}
        self.cert_days: float | None = None
        self.state = "unknown"
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0
        self.errors: dict[str, int] = {}
        self.transitions = dict.fromkeys(STATES, 0)
        self.outages = dict.fromkeys(PEAKS, 0)

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.count += 1
        self.sum += seconds

    def cumulative(self) -> list[int]:
        out, total = [], 0
        for n in self.buckets:
            total += n
            out.append(total)
        return out


# name, kind, help: the per-target families, in exposition order.
_FAMILIES = (
    ("netwatch_probe_success", "gauge", "Last probe of the target succeeded (1) or not (0)."),
    ("netwatch_probe_duration_seconds", "histogram", "Probe round-trip time (ICMP: per reply)."),
    ("netwatch_probe_phase_seconds", "gauge", "HTTP phases of the last probe."),
    ("netwatch_probe_loss_ratio", "gauge", "ICMP loss ratio of the last round."),
    ("netwatch_probe_errors_total", "counter", "Failed probes by error class."),
    ("netwatch_probe_cert_expiry_days", "gauge", "Days until the peer certificate expires."),
    ("netwatch_link_up", "gauge", "Link state is up or degraded (1) or not (0)."),
    ("netwatch_link_state", "gauge", "One series per link state, 1 on the current one."),
    ("netwatch_link_transitions_total", "counter", "Link state changes."),
    ("netwatch_outages_total", "counter", 'Outages begun; peak="true" when inside peak hours.'),
)


Samples = Callable[[TargetSeries], list[tuple[str, float]]]

# Per non-histogram family: (extra label or "", the samples of one target as
# (extra label value, number)). One table serves both the fast renderer and ``collect()``.
_SAMPLES: dict[str, tuple[str, Samples]] = {
    "netwatch_probe_success": ("", lambda s: [] if s.success is None else [("", s.success)]),
    "netwatch_probe_phase_seconds": ("phase", lambda s: list(s.phases.items())),
    "netwatch_probe_loss_ratio": ("", lambda s: [] if s.loss is None else [("", s.loss)]),
    "netwatch_probe_errors_total": (
        "error",
        lambda s: [(e, float(n)) for e, n in s.errors.items()],
    ),
    "netwatch_probe_cert_expiry_days": (
        "",
        lambda s: [] if s.cert_days is None else [("", s.cert_days)],
    ),
    "netwatch_link_up": ("", lambda s: [("", 1.0 if s.state in ("up", "degraded") else 0.0)]),
    "netwatch_link_state": (
        "state",
        lambda s: [(st, 1.0 if st == s.state else 0.0) for st in STATES],
    ),
    "netwatch_link_transitions_total": (
        "to",
        lambda s: [(st, float(n)) for st, n in s.transitions.items()],
    ),
    "netwatch_outages_total": ("peak", lambda s: [(p, float(n)) for p, n in s.outages.items()]),
}


def _lines(name: str, s: TargetSeries) -> list[str]:
    """The text lines of one family for one target (never split across a yield)."""
    lbl = s.labels
    if name == "netwatch_probe_duration_seconds":
        cum = s.cumulative()
        out = [
            f'{name}_bucket{{{lbl},le="{le}"}} {value(n)}\n' for le, n in zip(_LE, cum, strict=True)
        ]
        out.append(f"{name}_count{{{lbl}}} {value(s.count)}\n")
        out.append(f"{name}_sum{{{lbl}}} {value(s.sum)}\n")
        return out
    extra, samples = _SAMPLES[name]
    if not extra:
        return [f"{name}{{{lbl}}} {value(n)}\n" for _, n in samples(s)]
    return [f'{name}{{{lbl},{extra}="{v}"}} {value(n)}\n' for v, n in samples(s)]


class TargetCollector(Collector):
    """Exports every ``TargetSeries``; renders itself fast for ``/metrics``."""

    def __init__(self, site: str) -> None:
        self.site = site
        self.series: dict[str, TargetSeries] = {}
        self.muted = False

    def render_slices(self) -> Iterator[list[str]]:
        return in_slices(self._text(list(self.series.values())))

    @staticmethod
    def _text(targets: list[TargetSeries]) -> Iterator[str]:
        for name, kind, help_text in _FAMILIES:
            yield header(name, kind, help_text)
            for s in targets:
                # One target's lines are computed together, so they are consistent even
                # when a probe result lands while the renderer is yielding. A target with
                # no line in a family (a TCP target has no HTTP phases) still counts as one,
                # so a run of sparse families is sliced too: five of them over 1,000
                # targets took 5 ms without a yield.
                yield from _lines(name, s) or ("",)

    def collect(self) -> Iterable[Metric]:
        if self.muted:
            return
        targets = list(self.series.values())
        labels = ["site", "target", "type"]
        for name, kind, help_text in _FAMILIES:
            if kind == "histogram":
                hist = HistogramMetricFamily(name, help_text, labels=labels)
                for s in targets:
                    buckets = list(zip(_LE, s.cumulative(), strict=True))
                    hist.add_metric([self.site, s.target, s.type], buckets, s.sum)
                yield hist
                continue
            extra, samples = _SAMPLES[name]
            names = [*labels, extra] if extra else labels
            family: GaugeMetricFamily | CounterMetricFamily
            if kind == "counter":
                family = CounterMetricFamily(name.removesuffix("_total"), help_text, labels=names)
            else:
                family = GaugeMetricFamily(name, help_text, labels=names)
            for s in targets:
                key = [self.site, s.target, s.type]
                for extra_value, number in samples(s):
                    family.add_metric([*key, extra_value] if extra else key, number)
            yield family

    def describe(self) -> Iterable[Metric]:
        return []


class MonitorMetrics:
    """Every monitor series named by the contract, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry, site: str, version: str) -> None:
        self.site = site
        self.registry = registry
        self.targets = TargetCollector(site)
        registry.register(self.targets)
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

    # --- hot path -------------------------------------------------------------------------

    def children(self, target: str, type_: str) -> TargetSeries:
        series = self.targets.series.get(target)
        if series is None:
            series = self.targets.series[target] = TargetSeries(self.site, target, type_)
        return series

    def observe_probe(self, s: TargetSeries, result: ProbeResult) -> None:
        s.success = 1.0 if result.success else 0.0
        if result.success:
            if result.rtts:
                for rtt in result.rtts:
                    s.observe(rtt)
            elif result.latency is not None:
                s.observe(result.latency)
        else:
            error = result.error or "other"
            s.errors[error] = s.errors.get(error, 0) + 1
        if result.loss is not None and s.type == "icmp":
            s.loss = result.loss
        if result.phases:
            s.phases = {p: v for p, v in result.phases.items() if p in PHASES}
        days = result.details.get("days_to_expiry") if result.details else None
        if isinstance(days, int | float):
            s.cert_days = float(days)

    def observe_lag(self, seconds: float) -> None:
        self._lag.observe(max(0.0, seconds))

    def skipped_round(self) -> None:
        self._skipped.inc()

    def set_state(self, s: TargetSeries, state: str, *, changed: bool) -> None:
        s.state = state
        if changed:
            s.transitions[state] += 1

    def outage_began(self, s: TargetSeries, *, peak: bool) -> None:
        s.outages["true" if peak else "false"] += 1

    def ensure_outage_series(self, s: TargetSeries) -> None:
        """Outage counters exist at zero from the start, so rate() works from the first."""
        del s  # TargetSeries starts every counter at zero

    def forget(self, target: str) -> None:
        """Drop every series of a target removed by a config reload."""
        self.targets.series.pop(target, None)


class TimeCollector(Collector):
    """Series that are functions of time, computed at scrape time."""

    def __init__(
        self,
        site: str,
        is_peak: Callable[[], bool],
        outage_totals: Callable[[], Iterable[OutageTotals]],
    ) -> None:
        self._site = site
        self._labels = f'site="{escape(site)}"'
        self._is_peak = is_peak
        self._outage_totals = outage_totals
        self.muted = False

    def render_slices(self) -> Iterator[list[str]]:
        return in_slices(self._text())

    def _text(self) -> Iterator[str]:
        yield header("netwatch_peak_hours", "gauge", "The site is inside a peak window now.")
        yield f"netwatch_peak_hours{{{self._labels}}} {value(self._is_peak())}\n"
        yield header("netwatch_outage_seconds_total", "counter", _OUTAGE_HELP)
        name = "netwatch_outage_seconds_total"
        for t in self._outage_totals():
            lbl = f'{self._labels},target="{escape(t.target)}",type="{escape(t.type)}"'
            yield f'{name}{{{lbl},peak="true"}} {value(t.peak_seconds)}\n'
            yield f'{name}{{{lbl},peak="false"}} {value(t.off_peak_seconds)}\n'

    def collect(self) -> Iterable[Metric]:
        if self.muted:
            return
        peak = GaugeMetricFamily(
            "netwatch_peak_hours", "The site is inside a peak window now.", labels=["site"]
        )
        peak.add_metric([self._site], 1 if self._is_peak() else 0)
        yield peak
        seconds = CounterMetricFamily(
            "netwatch_outage_seconds",
            _OUTAGE_HELP,
            labels=["site", "target", "type", "peak"],
        )
        for t in self._outage_totals():
            seconds.add_metric([self._site, t.target, t.type, "true"], t.peak_seconds)
            seconds.add_metric([self._site, t.target, t.type, "false"], t.off_peak_seconds)
        yield seconds

    def describe(self) -> Iterable[Metric]:
        return []


_OUTAGE_HELP = "Time spent down, split at peak-window boundaries."
