"""Generate the netwatch Grafana dashboards as JSON (plain dicts, no SDK).

    .venv/bin/python grafana/build_dashboards.py           # rewrite grafana/dashboards/*.json
    .venv/bin/python grafana/build_dashboards.py --check   # exit 1 if the JSON is out of date

The JSON is committed so that Grafana provisioning needs no Python; tests/test_operators_pack.py
fails when it differs from what this script produces. Every panel and query is bound to the
``${datasource}`` variable, and the uids are stable so that links and bookmarks survive.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "dashboards"

DS = {"type": "prometheus", "uid": "${datasource}"}
SITE = 'site=~"$site"'
SEL = 'site=~"$site", target=~"$target"'
# Offices run on Asia/Ho_Chi_Minh (UTC+7, no daylight saving); PromQL's hour() is UTC.
TZ_OFFSET_HOURS = 7
SITE_LINK = "/d/netwatch-site/site-detail?var-site=${__field.labels.site}&${datasource:queryparam}"

Json = dict[str, Any]


# --- queries ------------------------------------------------------------------------------


def q(
    expr: str,
    legend: str = "",
    *,
    instant: bool = False,
    fmt: str = "time_series",
    interval: str = "",
) -> Json:
    target: Json = {
        "datasource": DS,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "format": fmt,
        "instant": instant,
        "range": not instant,
    }
    if interval:
        target["interval"] = interval
    return target


def state_code(metric: str, label: str, by: str, selector: str, codes: dict[str, int]) -> str:
    """One number per series from a one-hot ``{state}`` gauge, robust to missing states."""
    parts = [f'({metric}{{{selector}, {label}="{v}"}} == 1) * {code}' for v, code in codes.items()]
    return f"max by ({by}) ({' or '.join(parts)})"


LINK_CODES = {"up": 0, "degraded": 1, "down": 2, "unknown": 3}
MODE_CODES = {"online": 0, "replaying": 1, "offline": 2}
LINK_STATE = state_code("netwatch_link_state", "state", "site, target", SEL, LINK_CODES)
PROXY_MODE = state_code("netwatch_proxy_mode", "mode", "site", SITE, MODE_CODES)


def quantile(metric: str, phi: float, by: str, selector: str, window: str) -> str:
    return (
        f"histogram_quantile({phi}, sum by ({by}, le) "
        f"(rate({metric}_bucket{{{selector}}}[{window}])))"
    )


def outages_by_hour_of_day() -> str:
    """Outages begun in each local hour of day over the dashboard range, split by peak.

    A 1h-step subquery evaluates increase(...[1h]) at whole UTC hours; the sample at T covers
    the hour before T, hence ``time() - 3600``. Each hour of day gets its own ``hour`` label so
    one table query feeds a bar chart.
    """
    inner = f"sum by (peak) (increase(netwatch_outages_total{{{SEL}}}[1h]))"
    parts = []
    for hour in range(24):
        utc_hour = (hour - TZ_OFFSET_HOURS) % 24
        in_hour = f"and on () (hour(vector(time() - 3600)) == {utc_hour})"
        parts.append(
            f"label_replace(sum by (peak) (sum_over_time(({inner} {in_hour})[$__range:1h])), "
            f'"hour", "{hour:02d}h", "", "")'
        )
    return " or ".join(parts)


# --- panels -------------------------------------------------------------------------------

STATE_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "0": {"text": "up", "color": "green", "index": 0},
            "1": {"text": "degraded", "color": "yellow", "index": 1},
            "2": {"text": "down", "color": "red", "index": 2},
            "3": {"text": "unknown", "color": "gray", "index": 3},
        },
    }
]
MODE_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "0": {"text": "online", "color": "green", "index": 0},
            "1": {"text": "replaying", "color": "blue", "index": 1},
            "2": {"text": "offline", "color": "red", "index": 2},
        },
    }
]
UP_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "0": {"text": "DOWN", "color": "red", "index": 0},
            "1": {"text": "UP", "color": "green", "index": 1},
        },
    }
]


def thresholds(*steps: tuple[float | None, str]) -> Json:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


GREEN = thresholds((None, "green"))
ZERO_GOOD = thresholds((None, "green"), (1, "red"))


def panel(
    kind: str,
    title: str,
    targets: list[Json],
    *,
    w: int,
    h: int,
    unit: str = "short",
    description: str = "",
    options: Json | None = None,
    defaults: Json | None = None,
    transformations: list[Json] | None = None,
    links: list[Json] | None = None,
) -> Json:
    refs = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    field_defaults: Json = {"unit": unit, "thresholds": GREEN, "links": links or []}
    field_defaults.update(defaults or {})
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"w": w, "h": h},
        "targets": [dict(t, refId=refs[i]) for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": field_defaults, "overrides": []},
        "options": options or {},
        "transformations": transformations or [],
    }


def stat(
    title: str,
    expr: str,
    legend: str = "",
    *,
    unit: str = "short",
    color: Json = GREEN,
    w: int = 4,
    **kw: Any,
) -> Json:
    return panel(
        "stat",
        title,
        [q(expr, legend, instant=True)],
        w=w,
        h=4,
        unit=unit,
        defaults={"thresholds": color, **kw.pop("defaults", {})},
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "auto",
        },
        **kw,
    )


def timeseries(
    title: str, targets: list[Json], *, unit: str = "short", w: int = 12, h: int = 8, **kw: Any
) -> Json:
    stacked = kw.pop("stacked", False)
    bars = kw.pop("bars", False)
    custom = {
        "drawStyle": "bars" if bars else "line",
        "fillOpacity": 60 if bars else 10,
        "lineWidth": 1,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
    }
    return panel(
        "timeseries",
        title,
        targets,
        w=w,
        h=h,
        unit=unit,
        defaults={"custom": custom, **kw.pop("defaults", {})},
        options={
            "legend": {
                "displayMode": "table",
                "placement": "right",
                "calcs": ["max", "lastNotNull"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        **kw,
    )


def state_timeline(title: str, expr: str, legend: str, mappings: list[Json], **kw: Any) -> Json:
    return panel(
        "state-timeline",
        title,
        [q(expr, legend)],
        w=kw.pop("w", 24),
        h=kw.pop("h", 10),
        defaults={"mappings": mappings, "color": {"mode": "thresholds"}},
        options={
            "mergeValues": True,
            "showValue": "never",
            "alignValue": "left",
            "rowHeight": 0.9,
            "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"},
            "tooltip": {"mode": "single"},
        },
        **kw,
    )


def table(title: str, targets: list[Json], *, w: int = 12, h: int = 8, **kw: Any) -> Json:
    return panel(
        "table",
        title,
        [dict(t, format="table", instant=True, range=False) for t in targets],
        w=w,
        h=h,
        options={"showHeader": True, "cellHeight": "sm", "footer": {"show": False}},
        **kw,
    )


def hide_time() -> Json:
    return {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {}}}


# --- dashboards ---------------------------------------------------------------------------


def variables(*, site_multi: bool = True) -> list[Json]:
    def query_var(name: str, label: str, query: str, *, multi: bool) -> Json:
        return {
            "type": "query",
            "name": name,
            "label": label,
            "datasource": DS,
            "definition": query,
            "query": {"query": query, "refId": f"{name}-var"},
            "refresh": 2,
            "sort": 1,
            "multi": multi,
            "includeAll": multi,
            "allValue": ".*" if multi else None,
            "current": {},
            "options": [],
            "hide": 0,
        }

    return [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Prometheus",
            "query": "prometheus",
            "current": {},
            "options": [],
            "refresh": 1,
            "hide": 0,
        },
        query_var("site", "Site", "label_values(netwatch_link_up, site)", multi=site_multi),
        query_var(
            "target", "Target", 'label_values(netwatch_link_up{site=~"$site"}, target)', multi=True
        ),
    ]


def layout(panels: list[Json]) -> list[Json]:
    """Flow panels left to right in rows of 24 columns; ids in order."""
    x = y = row_h = 0
    for number, p in enumerate(panels, start=1):
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["id"] = number
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x, row_h = x + w, max(row_h, h)
    return panels


def dashboard(uid: str, title: str, panels: list[Json], *, site_multi: bool = True) -> Json:
    return {
        "uid": uid,
        "title": title,
        "tags": ["netwatch"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-24h", "to": "now"},
        "templating": {"list": variables(site_multi=site_multi)},
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["netwatch"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "title": "netwatch",
            }
        ],
        "panels": layout(panels),
    }


def city_overview() -> Json:
    site_link = [{"title": "Site detail", "url": SITE_LINK}]
    return dashboard(
        "netwatch-city",
        "netwatch / City overview",
        [
            stat("Sites reporting", f"count(count by (site) (netwatch_link_up{{{SITE}}}))"),
            stat(
                "Sites with a link down",
                f'count(max by (site) (netwatch_link_state{{{SEL}, state="down"}}) == 1)'
                " or vector(0)",
                color=ZERO_GOOD,
            ),
            stat(
                "Sites with stations offline",
                f'count(max by (site) (netwatch_proxy_mode{{{SITE}, mode="offline"}}) == 1)'
                " or vector(0)",
                color=ZERO_GOOD,
            ),
            stat(
                "Sites not scraped",
                f'count(max by (site) (up{{job="netwatch", {SITE}}}) == 0) or vector(0)',
                color=ZERO_GOOD,
            ),
            stat(
                "Availability over the range",
                f"avg(avg_over_time(netwatch_link_up{{{SEL}}}[$__range]))",
                unit="percentunit",
                color=thresholds((None, "red"), (0.99, "yellow"), (0.999, "green")),
                defaults={"decimals": 2},
            ),
            stat(
                "Sites in peak hours now",
                f"count(netwatch_peak_hours{{{SITE}}} == 1) or vector(0)",
            ),
            state_timeline(
                "Link state, every site x target",
                LINK_STATE,
                "{{site}} / {{target}}",
                STATE_MAPPINGS,
                h=14,
                links=site_link,
                description="Gaps mean no data: the site was not scraped (see Sites not scraped).",
            ),
            table(
                "Sites down or offline now",
                [
                    q(f'max by (site, target) (netwatch_link_state{{{SEL}, state="down"}}) == 1'),
                    q(f'max by (site) (netwatch_proxy_mode{{{SITE}, mode="offline"}}) == 1'),
                    q(f'max by (site) (up{{job="netwatch", {SITE}}}) == 0'),
                ],
                links=site_link,
                transformations=[
                    {"id": "merge", "options": {}},
                    {
                        "id": "organize",
                        "options": {
                            "excludeByName": {"Time": True},
                            "renameByName": {
                                "Value #A": "link down",
                                "Value #B": "stations offline",
                                "Value #C": "scrape up",
                            },
                        },
                    },
                ],
            ),
            panel(
                "bargauge",
                "Availability over the range, worst 20",
                [
                    q(
                        "bottomk(20, avg by (site, target) "
                        f"(avg_over_time(netwatch_link_up{{{SEL}}}[$__range])))",
                        "{{site}} / {{target}}",
                        instant=True,
                    )
                ],
                w=12,
                h=8,
                unit="percentunit",
                links=site_link,
                defaults={
                    "min": 0,
                    "max": 1,
                    "decimals": 2,
                    "thresholds": thresholds((None, "red"), (0.99, "yellow"), (0.999, "green")),
                },
                options={
                    "orientation": "horizontal",
                    "displayMode": "basic",
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                },
            ),
            panel(
                "barchart",
                "Outages by hour of day (ICT), peak vs off-peak",
                [q(outages_by_hour_of_day(), fmt="table", instant=True)],
                w=12,
                h=9,
                description="Outages begun in each local hour over the dashboard range.",
                transformations=[
                    {
                        "id": "groupingToMatrix",
                        "options": {
                            "columnField": "peak",
                            "rowField": "hour",
                            "valueField": "Value",
                        },
                    },
                    {"id": "sortBy", "options": {"sort": [{"field": "hour\\peak"}]}},
                ],
                options={
                    "stacking": "normal",
                    "xField": "hour\\peak",
                    "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"},
                },
            ),
            timeseries(
                "Outages begun per hour, peak vs off-peak",
                [
                    q(
                        f"sum by (peak) (increase(netwatch_outages_total{{{SEL}}}[1h]))",
                        "peak={{peak}}",
                        interval="1h",
                    )
                ],
                bars=True,
                stacked=True,
            ),
            table(
                "Worst latency (p95 over the range)",
                [
                    q(
                        "topk(10, "
                        + quantile(
                            "netwatch_probe_duration_seconds",
                            0.95,
                            "site, target",
                            SEL,
                            "$__range",
                        )
                        + ")"
                    )
                ],
                unit="s",
                links=site_link,
                transformations=[hide_time()],
            ),
            table(
                "Worst loss (average over the range)",
                [
                    q(
                        "topk(10, avg by (site, target) "
                        f"(avg_over_time(netwatch_probe_loss_ratio{{{SEL}}}[$__range])))"
                    )
                ],
                unit="percentunit",
                links=site_link,
                transformations=[hide_time()],
            ),
            timeseries(
                "p95 latency, worst 10 site x target",
                [
                    q(
                        "topk(10, "
                        + quantile(
                            "netwatch_probe_duration_seconds",
                            0.95,
                            "site, target",
                            SEL,
                            "$__rate_interval",
                        )
                        + ")",
                        "{{site}} / {{target}}",
                    )
                ],
                unit="s",
            ),
            timeseries(
                "Share of the last hour down, worst 10 sites",
                [
                    q(
                        f"topk(10, max by (site) (site_target:netwatch_outage:ratio_1h{{{SEL}}}))",
                        "{{site}}",
                    )
                ],
                unit="percentunit",
            ),
        ],
    )


def site_detail() -> Json:
    duration = "netwatch_probe_duration_seconds"
    return dashboard(
        "netwatch-site",
        "netwatch / Site detail",
        [
            stat(
                "Link usable",
                f"netwatch_link_up{{{SEL}}}",
                "{{target}}",
                color=thresholds((None, "red"), (1, "green")),
                defaults={"mappings": UP_MAPPINGS},
                w=8,
            ),
            stat(
                "Availability, last 24h",
                f"min(site_target:netwatch_link_availability:ratio_1d{{{SEL}}})",
                unit="percentunit",
                color=thresholds((None, "red"), (0.99, "yellow"), (0.999, "green")),
                defaults={"decimals": 2},
            ),
            stat(
                "Peak hours now",
                f"max(netwatch_peak_hours{{{SITE}}})",
                defaults={
                    "mappings": [
                        {
                            "type": "value",
                            "options": {
                                "0": {"text": "off-peak", "color": "blue", "index": 0},
                                "1": {"text": "PEAK", "color": "orange", "index": 1},
                            },
                        }
                    ]
                },
            ),
            stat(
                "Outages in range",
                f"sum(increase(netwatch_outages_total{{{SEL}}}[$__range])) or vector(0)",
                color=ZERO_GOOD,
                defaults={"decimals": 0},
            ),
            stat(
                "Version",
                f"count by (version) (netwatch_build_info{{{SITE}}})",
                defaults={"displayName": "${__field.labels.version}"},
            ),
            state_timeline("Link state", LINK_STATE, "{{target}}", STATE_MAPPINGS, h=7),
            panel(
                "heatmap",
                "Round-trip time (histogram buckets)",
                [
                    q(
                        f"sum by (le) (increase({duration}_bucket{{{SEL}}}[$__rate_interval]))",
                        "{{le}}",
                        fmt="heatmap",
                    )
                ],
                w=12,
                h=9,
                unit="s",
                options={
                    "calculate": False,
                    "yAxis": {"unit": "s", "axisPlacement": "left"},
                    "rowsFrame": {"layout": "le"},
                    "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                    "cellGap": 1,
                    "tooltip": {"show": True, "yHistogram": True},
                },
            ),
            timeseries(
                "Round-trip time p50 / p95",
                [
                    q(
                        quantile(duration, 0.5, "target", SEL, "$__rate_interval"),
                        "p50 {{target}}",
                    ),
                    q(
                        quantile(duration, 0.95, "target", SEL, "$__rate_interval"),
                        "p95 {{target}}",
                    ),
                ],
                unit="s",
                h=9,
            ),
            timeseries(
                "Probe success",
                [q(f"netwatch_probe_success{{{SEL}}}", "{{target}}")],
                unit="bool_yes_no",
                defaults={"min": 0, "max": 1},
            ),
            timeseries(
                "Loss (ICMP)",
                [q(f"netwatch_probe_loss_ratio{{{SEL}}}", "{{target}}")],
                unit="percentunit",
                defaults={"min": 0, "max": 1},
            ),
            timeseries(
                "HTTP phases of the last probe",
                [q(f"netwatch_probe_phase_seconds{{{SEL}}}", "{{target}} {{phase}}")],
                unit="s",
                stacked=True,
            ),
            timeseries(
                "Probe errors by cause",
                [
                    q(
                        "sum by (target, error) "
                        f"(rate(netwatch_probe_errors_total{{{SEL}}}[$__rate_interval]))",
                        "{{target}} {{error}}",
                    )
                ],
                unit="ops",
                stacked=True,
            ),
            table(
                "Outages in the range",
                [
                    q(
                        "sum by (target, peak) "
                        f"(increase(netwatch_outages_total{{{SEL}}}[$__range]))"
                    ),
                    q(
                        "sum by (target, peak) "
                        f"(increase(netwatch_outage_seconds_total{{{SEL}}}[$__range]))"
                    ),
                ],
                transformations=[
                    {"id": "merge", "options": {}},
                    {
                        "id": "organize",
                        "options": {
                            "excludeByName": {"Time": True},
                            "renameByName": {"Value #A": "outages", "Value #B": "seconds down"},
                        },
                    },
                ],
            ),
            timeseries(
                "Outages begun",
                [
                    q(
                        "sum by (target) (increase("
                        f'netwatch_link_transitions_total{{{SEL}, to="down"}}[$__interval]))',
                        "{{target}}",
                    )
                ],
                bars=True,
            ),
            timeseries(
                "Scheduler lag",
                [
                    q(
                        quantile(
                            "netwatch_scheduler_lag_seconds", 0.5, "site", SITE, "$__rate_interval"
                        ),
                        "p50",
                    ),
                    q(
                        quantile(
                            "netwatch_scheduler_lag_seconds", 0.99, "site", SITE, "$__rate_interval"
                        ),
                        "p99",
                    ),
                ],
                unit="s",
            ),
            timeseries(
                "TLS certificate expiry",
                [q(f"netwatch_probe_cert_expiry_days{{{SEL}}}", "{{target}}")],
                unit="d",
            ),
            timeseries(
                "MQTT and webhooks",
                [
                    q(f"netwatch_mqtt_connected{{{SITE}}}", "MQTT connected"),
                    q(
                        f"sum(rate(netwatch_mqtt_published_total{{{SITE}}}[$__rate_interval]))",
                        "published/s",
                    ),
                    q(
                        "sum by (kind) "
                        f"(rate(netwatch_mqtt_dropped_total{{{SITE}}}[$__rate_interval]))",
                        "dropped/s {{kind}}",
                    ),
                    q(
                        "sum by (outcome) "
                        f"(rate(netwatch_webhook_total{{{SITE}}}[$__rate_interval]))",
                        "webhook/s {{outcome}}",
                    ),
                ],
                w=24,
            ),
        ],
        site_multi=False,
    )


def stations() -> Json:
    return dashboard(
        "netwatch-stations",
        "netwatch / Stations",
        [
            stat(
                "Sites offline now",
                f'count(netwatch_proxy_mode{{{SITE}, mode="offline"}} == 1) or vector(0)',
                color=ZERO_GOOD,
            ),
            stat("Requests queued", f"sum(netwatch_queue_depth{{{SITE}}})"),
            stat(
                "Oldest queued request",
                f"max(netwatch_queue_oldest_age_seconds{{{SITE}}})",
                unit="s",
                color=thresholds((None, "green"), (600, "yellow"), (3600, "red")),
            ),
            stat(
                "Dead letters",
                f"sum(netwatch_dead_letters{{{SITE}}})",
                color=ZERO_GOOD,
            ),
            stat("Queue on disk", f"sum(netwatch_queue_bytes{{{SITE}}})", unit="bytes"),
            stat(
                "Delivered in range",
                f'sum(increase(netwatch_replay_total{{{SITE}, outcome="delivered"}}[$__range]))'
                " or vector(0)",
                defaults={"decimals": 0},
            ),
            state_timeline("Proxy mode", PROXY_MODE, "{{site}}", MODE_MAPPINGS, h=8),
            state_timeline(
                "Guard link state", LINK_STATE, "{{site}} / {{target}}", STATE_MAPPINGS, h=8
            ),
            timeseries(
                "Queue depth",
                [q(f"sum by (site) (netwatch_queue_depth{{{SITE}}})", "{{site}}")],
            ),
            timeseries(
                "Oldest queued request age",
                [q(f"max by (site) (netwatch_queue_oldest_age_seconds{{{SITE}}})", "{{site}}")],
                unit="s",
            ),
            timeseries(
                "Replay rate by outcome",
                [
                    q(
                        "sum by (outcome) "
                        f"(rate(netwatch_replay_total{{{SITE}}}[$__rate_interval]))",
                        "{{outcome}}",
                    )
                ],
                unit="reqps",
                stacked=True,
            ),
            timeseries(
                "Replay lag (queued to delivered)",
                [
                    q(
                        quantile(
                            "netwatch_replay_lag_seconds", 0.5, "site", SITE, "$__rate_interval"
                        ),
                        "p50 {{site}}",
                    ),
                    q(
                        quantile(
                            "netwatch_replay_lag_seconds", 0.95, "site", SITE, "$__rate_interval"
                        ),
                        "p95 {{site}}",
                    ),
                ],
                unit="s",
            ),
            timeseries(
                "Dead letters",
                [q(f"max by (site) (netwatch_dead_letters{{{SITE}}})", "{{site}}")],
            ),
            timeseries(
                "Station requests by outcome",
                [
                    q(
                        "sum by (outcome) "
                        f"(rate(netwatch_proxy_requests_total{{{SITE}}}[$__rate_interval]))",
                        "{{outcome}}",
                    )
                ],
                unit="reqps",
                stacked=True,
            ),
            timeseries(
                "Queue on disk",
                [q(f"max by (site) (netwatch_queue_bytes{{{SITE}}})", "{{site}}")],
                unit="bytes",
                w=24,
            ),
        ],
    )


# --- city view: where is the fault? (config/prometheus/rules/city.yml) ----------------------

SCOPE_CODES = {"none": 0, "site": 1, "district": 2, "isp": 3, "national": 4}
SCOPE_COLORS = {"none": "green", "site": "yellow", "district": "orange", "isp": "red"}
SCOPE_MAPPINGS = [
    {
        "type": "value",
        "options": {
            str(code): {"text": name, "color": SCOPE_COLORS.get(name, "dark-red"), "index": code}
            for name, code in SCOPE_CODES.items()
        },
    }
]
# The broadest scope the city rules see now: 4 national, 3 ISP, 2 district, 1 site, 0 none.
CITY_SCOPE = (
    "max(netwatch:city_db_outage:bool) * 4 > 0"
    " or max(isp:netwatch_city_outage:bool) * 3 > 0"
    " or max(district:netwatch_city_outage:bool) * 2 > 0"
    " or max(site:netwatch_city_cut:bool) > 0"
    " or vector(0)"
)
DOMAIN_CODES = {"none": 0, "lan": 1, "isp": 2, "core": 3, "service": 4, "silent": 5}
DOMAIN_COLORS = ["green", "purple", "orange", "red", "dark-red", "gray"]
DOMAIN_MAPPINGS = [
    {
        "type": "value",
        "options": {
            str(code): {"text": name, "color": DOMAIN_COLORS[code], "index": code}
            for name, code in DOMAIN_CODES.items()
        },
    }
]
# Per site: where along its path the fault is (netwatch_site_fault), or "silent" when the
# site stopped reporting (then it cannot say where).
SITE_DOMAIN = (
    f"(max by (site) (site:netwatch_city_silent:bool{{{SITE}}} == 1) * 5) or "
    + state_code(
        "netwatch_site_fault",
        "domain",
        "site",
        SITE,
        {k: v for k, v in DOMAIN_CODES.items() if k != "silent"},
    )
)
CITY_ALERT_SCOPES = 'ALERTS{alertstate="firing", scope=~"national|isp|district|site"}'


def share_bars(title: str, expr: str, label: str) -> Json:
    """A horizontal bar per group (ISP, district): the share of its sites cut off."""
    return panel(
        "bargauge",
        title,
        [q(expr, "{{" + label + "}}", instant=True)],
        w=8,
        h=8,
        unit="percentunit",
        defaults={
            "min": 0,
            "max": 1,
            "thresholds": thresholds((None, "green"), (0.2, "yellow"), (0.5, "red")),
        },
        options={"orientation": "horizontal", "displayMode": "gradient"},
    )


def city_view() -> Json:
    site_link = [{"title": "Site detail", "url": SITE_LINK}]
    latency = "site:netwatch_city_service_latency_seconds:mean1m"
    overlay = timeseries(
        "Population database latency across sites, peak hours shaded",
        [
            q(f"quantile(0.5, {latency}{{{SITE}}})", "p50 of sites"),
            q(f"quantile(0.95, {latency}{{{SITE}}})", "p95 of sites"),
            q("netwatch:city_peak_hours:ratio", "peak hours"),
        ],
        unit="s",
        description="Mean service-probe round trip per site over 1m, across sites. The shaded "
        "band is the share of sites inside their peak hours: a brownout at 9:00 shows here.",
    )
    overlay["fieldConfig"]["overrides"] = [
        {
            "matcher": {"id": "byName", "options": "peak hours"},
            "properties": [
                {"id": "unit", "value": "percentunit"},
                {"id": "min", "value": 0},
                {"id": "max", "value": 1},
                {"id": "custom.axisPlacement", "value": "right"},
                {"id": "custom.drawStyle", "value": "bars"},
                {"id": "custom.fillOpacity", "value": 15},
                {"id": "color", "value": {"mode": "fixed", "fixedColor": "yellow"}},
            ],
        }
    ]
    grid = panel(
        "stat",
        "Sites by fault domain (every site, one tile)",
        [q(SITE_DOMAIN, "{{site}}", instant=True)],
        w=24,
        h=12,
        links=site_link,
        description="One tile per site, coloured by where along its path the fault is: lan, "
        "isp, core, service (netwatch_site_fault), or silent (stopped reporting). Fits 300 "
        "sites; hover or click for the site.",
        defaults={"mappings": DOMAIN_MAPPINGS, "color": {"mode": "thresholds"}},
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "name",
            "orientation": "horizontal",
            "justifyMode": "center",
            "text": {"titleSize": 8},
        },
    )
    return dashboard(
        "netwatch-city-view",
        "netwatch / City view: where is the fault?",
        [
            stat(
                "Scope of the current incident",
                CITY_SCOPE,
                w=6,
                defaults={"mappings": SCOPE_MAPPINGS, "color": {"mode": "thresholds"}},
                description="The broadest verdict of the city rules: national (the population "
                "database), an ISP, a district, single sites, or none.",
            ),
            stat(
                "Sites cut off",
                f"sum(site:netwatch_city_cut:bool{{{SITE}}}) or vector(0)",
                color=ZERO_GOOD,
            ),
            stat(
                "Sites silent",
                f"sum(site:netwatch_city_silent:bool{{{SITE}}}) or vector(0)",
                color=ZERO_GOOD,
            ),
            stat(
                "Reporting sites that see the database down",
                "netwatch:city_db_down:ratio",
                unit="percentunit",
                color=thresholds((None, "green"), (0.1, "yellow"), (0.5, "red")),
            ),
            stat(
                "Sites seeing the database slow",
                "netwatch:city_slow:ratio",
                unit="percentunit",
                w=4,
                color=thresholds((None, "green"), (0.2, "yellow"), (0.5, "red")),
            ),
            table(
                "Current incidents (city alerts firing)",
                [q(f"max by (alertname, scope, isp, district, site) ({CITY_ALERT_SCOPES})")],
                w=12,
                h=8,
                links=site_link,
                transformations=[hide_time()],
                description="Alertmanager inhibits the narrow ones a broad alert explains; "
                "this table lists them all, broadest first when sorted by scope.",
            ),
            state_timeline(
                "Incident timeline: city verdict, ISPs, districts",
                CITY_SCOPE,
                "city verdict",
                SCOPE_MAPPINGS,
                w=12,
                h=8,
            ),
            grid,
            share_bars("Cut-off share by ISP", "isp:netwatch_city_cut:ratio", "isp"),
            share_bars("Cut-off share by district", "district:netwatch_city_cut:ratio", "district"),
            table(
                "Sites cut off now",
                [
                    q(
                        f"max by (site, district, isp) (site:netwatch_city_cut:reason{{{SITE}}})",
                    )
                ],
                w=8,
                h=8,
                links=site_link,
                defaults={
                    "mappings": [
                        {
                            "type": "value",
                            "options": {
                                "1": {"text": "service down", "color": "red", "index": 0},
                                "2": {"text": "silent", "color": "gray", "index": 1},
                            },
                        }
                    ]
                },
                transformations=[hide_time()],
            ),
            overlay,
            timeseries(
                "Sites cut off, by ISP",
                [q("isp:netwatch_city_cut:count", "{{isp}}")],
                stacked=True,
                description="Cut sites each ISP's outage would explain (after the national "
                "verdict): one ISP rising alone is an ISP outage.",
            ),
        ],
    )


DASHBOARDS = {
    "city-overview.json": city_overview,
    "city-view.json": city_view,
    "site-detail.json": site_detail,
    "stations.json": stations,
}


def render() -> dict[str, str]:
    """File name -> JSON text, exactly as committed."""
    return {
        name: json.dumps(build(), indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str]) -> int:
    rendered = render()
    if "--check" in argv:
        stale = [n for n, text in rendered.items() if _read(OUT_DIR / n) != text]
        for name in stale:
            sys.stderr.write(f"{OUT_DIR / name} is out of date: run grafana/build_dashboards.py\n")
        return 1 if stale else 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (OUT_DIR / name).write_text(text, encoding="utf-8")
    return 0


def _read(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.exists() else None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
