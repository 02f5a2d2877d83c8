"""The monitor's metrics: the fast text renderer says exactly what prometheus_client would,
and the registry answers ``get_sample_value`` for the same series."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from netwatch.monitor.exposition import escape, render, value
from netwatch.monitor.metrics import MonitorMetrics, OutageTotals, TimeCollector
from probes import ProbeResult


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def populated() -> tuple[CollectorRegistry, MonitorMetrics, TimeCollector]:
    registry = CollectorRegistry()
    metrics = MonitorMetrics(registry, "q1-ben-nghe", "1.2.3")
    http = metrics.children('api "main"', "http")
    metrics.observe_probe(
        http,
        ProbeResult(
            type="http",
            target="x",
            success=True,
            latency=0.042,
            phases={
                "resolve": 0.001,
                "connect": 0.002,
                "tls": 0.01,
                "processing": 0.02,
                "transfer": 0.009,
            },
        ),
    )
    metrics.set_state(http, "up", changed=True)
    icmp = metrics.children("gw", "icmp")
    metrics.observe_probe(
        icmp,
        ProbeResult(
            type="icmp",
            target="x",
            success=True,
            latency=0.002,
            rtts=(0.001, 0.002, 0.003),
            loss=0.25,
        ),
    )
    metrics.set_state(icmp, "degraded", changed=True)
    tls = metrics.children("cert", "tls")
    metrics.observe_probe(
        tls,
        ProbeResult(
            type="tls", target="x", success=False, error="tls", details={"days_to_expiry": 12.5}
        ),
    )
    metrics.set_state(tls, "down", changed=True)
    metrics.outage_began(tls, peak=True)
    time_series = TimeCollector(
        "q1-ben-nghe", lambda: True, lambda: [OutageTotals("cert", "tls", 3.0, 4.5)]
    )
    registry.register(time_series)
    return registry, metrics, time_series


def test_fast_render_equals_prometheus_client_rendering() -> None:
    registry, metrics, time_series = populated()
    fast = asyncio.run(render(registry, [metrics.targets, time_series]))
    assert samples(fast) == samples(generate_latest(registry))
    # Every family appears exactly once, with its HELP and TYPE.
    names = [line.split()[2] for line in fast.decode().splitlines() if line.startswith("# TYPE")]
    assert len(names) == len(set(names))


def test_series_follow_the_contract() -> None:
    registry, _, _ = populated()
    labels = {"site": "q1-ben-nghe", "target": "gw", "type": "icmp"}
    get = registry.get_sample_value
    assert get("netwatch_probe_duration_seconds_count", labels) == 3  # ICMP: per reply
    assert get("netwatch_probe_duration_seconds_bucket", {**labels, "le": "0.005"}) == 3
    assert get("netwatch_probe_loss_ratio", labels) == 0.25
    assert get("netwatch_link_up", labels) == 1  # degraded is still reachable
    assert get("netwatch_link_state", {**labels, "state": "degraded"}) == 1
    assert get("netwatch_link_state", {**labels, "state": "up"}) == 0
    api = {"site": "q1-ben-nghe", "target": 'api "main"', "type": "http"}
    assert get("netwatch_probe_phase_seconds", {**api, "phase": "tls"}) == 0.01
    assert get("netwatch_probe_loss_ratio", api) is None  # loss is an ICMP series
    cert = {"site": "q1-ben-nghe", "target": "cert", "type": "tls"}
    assert get("netwatch_probe_errors_total", {**cert, "error": "tls"}) == 1
    assert get("netwatch_probe_cert_expiry_days", cert) == 12.5
    assert get("netwatch_outages_total", {**cert, "peak": "true"}) == 1
    assert get("netwatch_outages_total", {**cert, "peak": "false"}) == 0
    assert get("netwatch_outage_seconds_total", {**cert, "peak": "true"}) == 4.5
    assert get("netwatch_peak_hours", {"site": "q1-ben-nghe"}) == 1
    assert get("netwatch_build_info", {"site": "q1-ben-nghe", "version": "1.2.3"}) == 1


def test_a_forgotten_target_disappears() -> None:
    registry, metrics, _ = populated()
    metrics.forget("gw")
    assert (
        registry.get_sample_value(
            "netwatch_link_up", {"site": "q1-ben-nghe", "target": "gw", "type": "icmp"}
        )
        is None
    )


def test_value_and_escape_follow_the_text_format() -> None:
    assert value(1) == "1.0"
    assert value(float("inf")) == "+Inf"
    assert value(float("nan")) == "NaN"
    assert escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
