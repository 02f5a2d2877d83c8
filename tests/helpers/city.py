"""A simulated city for the city rules: sites, districts, ISPs, incident scenarios.

Writes ``promtool test rules`` files from scenarios: every site's series, before and after the
fault, and the exact set of alerts each scenario must fire (every other alert: none). The same
scenarios feed the Alertmanager test (tests/test_city_rules.py) and the simulated sites served
over HTTP (tests/helpers/city_sim.py).

    python tests/helpers/city.py --sites 12 --districts 3 --isps 4 \\
        > config/prometheus/rules/tests/city.yml
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus" / "rules"

ISPS = ("VNPT", "Viettel", "FPT", "CMC", "SPT", "NetNam")
DISTRICTS = (
    *(f"Quận {n}" for n in range(1, 13)),
    "Bình Thạnh",
    "Gò Vấp",
    "Phú Nhuận",
    "Tân Bình",
    "Tân Phú",
    "Bình Tân",
    "Thủ Đức",
    "Hóc Môn",
)
# (target, type, role): the layered path of every simulated site, the service last.
TARGETS = (
    ("lan-gw", "icmp", "gateway"),
    ("isp-edge", "icmp", "isp"),
    ("core-gw", "tcp", "core"),
    ("popdb-api", "http", "service"),
)
SERVICE = "popdb-api"
NORMAL_LATENCY = 0.2
SLOW_LATENCY = 2.5

Fault = Literal["silent", "service_down", "slow"]


@dataclass(frozen=True)
class Site:
    id: str
    district: str
    isp: str
    uplink: str

    @property
    def name(self) -> str:
        return f"UBND {self.id}"

    @property
    def labels(self) -> dict[str, str]:
        return {"site": self.id, "district": self.district, "isp": self.isp}


def make_city(sites: int = 300, districts: int = 20, isps: int = 4) -> list[Site]:
    """Sites spread round-robin so that every district mixes ISPs and every ISP districts."""
    if districts > len(DISTRICTS) or isps > len(ISPS):
        raise ValueError("too many districts or ISPs for the name tables")
    return [
        Site(
            id=f"s{i:04d}",
            district=DISTRICTS[i % districts],
            isp=ISPS[(i // districts) % isps],
            uplink="fiber" if i % 3 else "4g",
        )
        for i in range(sites)
    ]


@dataclass(frozen=True)
class Alert:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float = 1.0

    @classmethod
    def of(cls, name: str, value: float = 1.0, **labels: str) -> Alert:
        return cls(name, tuple(sorted(labels.items())), value)


@dataclass(frozen=True)
class Scenario:
    """Faults that start at ``start`` (seconds) and last ``duration`` (None: to the end)."""

    name: str
    faults: dict[str, Fault]
    expected: frozenset[Alert]  # firing at the verdict, un-inhibited or not
    broad: frozenset[str]  # the alert names Alertmanager must leave un-inhibited
    incidents: int  # notifications the on-call must get
    duration: float | None = None
    steady: frozenset[Alert] = field(default_factory=frozenset)  # firing later, at STEADY


def site_alerts(city: Sequence[Site], faults: dict[str, Fault]) -> set[Alert]:
    """What the per-site rules say about faulty sites (the narrow alerts)."""
    out: set[Alert] = set()
    for site in city:
        fault = faults.get(site.id)
        if fault == "silent":
            out.add(Alert.of("NetwatchSiteIsolated", 2, **site.labels))
        elif fault == "service_down":
            out.add(Alert.of("NetwatchSiteIsolated", 1, **site.labels))
            out.add(
                Alert.of(
                    "NetwatchLinkDown",
                    site=site.id,
                    target=SERVICE,
                    type="http",
                    state="down",
                )
            )
    return out


def absent(city: Sequence[Site], faults: dict[str, Fault]) -> set[Alert]:
    """Silent sites, minutes later: their `up` went stale too."""
    return {Alert.of("NetwatchSiteAbsent", site=s.id) for s in city if faults.get(s.id) == "silent"}


def scenarios(city: Sequence[Site]) -> list[Scenario]:
    districts = sorted({s.district for s in city})
    isps = sorted({s.isp for s in city})
    isp = isps[1 % len(isps)]
    district = districts[2 % len(districts)]
    in_isp = [s for s in city if s.isp == isp]
    in_district = [s for s in city if s.district == district]
    a = city[len(city) // 3]
    b = next(s for s in city[::-1] if s.district != a.district and s.isp != a.isp)
    everyone: dict[str, Fault] = {s.id: "service_down" for s in city}
    out: list[Scenario] = []

    def add(
        name: str,
        faults: dict[str, Fault],
        broad: set[Alert],
        incidents: int,
        duration: float | None = None,
    ) -> None:
        expected = frozenset(site_alerts(city, faults) | broad)
        steady = frozenset() if duration else frozenset(expected | absent(city, faults))
        out.append(
            Scenario(
                name=name,
                faults=faults,
                expected=expected,
                broad=frozenset(alert.name for alert in broad)
                or frozenset({"NetwatchSiteIsolated"}),
                incidents=incidents,
                duration=duration,
                steady=steady,
            )
        )

    add("one-site-cut", {a.id: "silent"}, set(), 1)
    add(
        "isp-down",
        {s.id: "silent" for s in in_isp},
        {Alert.of("NetwatchISPOutage", isp=isp)},
        1,
    )
    add(
        "district-down",
        {s.id: ("silent" if i % 2 else "service_down") for i, s in enumerate(in_district)},
        {Alert.of("NetwatchDistrictOutage", district=district)},
        1,
    )
    add("database-down", everyone, {Alert.of("NetwatchPopulationDBOutage")}, 1)
    add(
        "peak-brownout",
        {s.id: "slow" for s in city},
        {Alert.of("NetwatchPopulationDBSlow")},
        1,
        duration=BROWNOUT,
    )
    add("two-unrelated-sites", {a.id: "silent", b.id: "service_down"}, set(), 2)
    add(
        "isp-during-database",
        {**everyone, **{s.id: "silent" for s in in_isp}},
        {Alert.of("NetwatchPopulationDBOutage"), Alert.of("NetwatchISPOutage", isp=isp)},
        1,
    )
    # The database alert explains the ISP one too: only it is left un-inhibited.
    last = out[-1]
    out[-1] = Scenario(
        last.name,
        last.faults,
        last.expected,
        frozenset({"NetwatchPopulationDBOutage"}),
        1,
        steady=last.steady,
    )
    # Nothing at all arrives for 2.5 minutes, from every site at once: the central store
    # ingests late (or its own link hiccups). No site is silent compared with the others:
    # nothing fires, nobody is paged.
    out.append(
        Scenario(
            "central-store-late",
            dict.fromkeys((s.id for s in city), "silent"),
            frozenset(),
            frozenset(),
            0,
            duration=150,
        )
    )
    return out


# --- promtool test files --------------------------------------------------------------------

STEP = 15  # seconds between samples and rule evaluations
FAULT_AT = 300  # the fault starts 5 minutes in
BROWNOUT = 240  # a 4-minute brownout
BEFORE = 240  # evaluated before the fault: nothing fires
VERDICT = FAULT_AT + 120  # two minutes after the fault: the verdict
STEADY = FAULT_AT + 540  # nine minutes after: stale `up` of silent sites is absent too
END = STEADY + 60
STEPS = END // STEP


def _series_values(values: Sequence[float | None]) -> str:
    """promtool's notation; runs of equal steps are folded as ``a+bxn``."""
    parts: list[str] = []
    i = 0
    while i < len(values):
        v = values[i]
        if v is None:
            j = i
            while j < len(values) and values[j] is None:
                j += 1
            parts.append("_" if j - i == 1 else f"_x{j - i}")
            i = j
            continue
        j = i + 1
        step = values[j] - v if j < len(values) and values[j] is not None else None
        while j < len(values) and values[j] is not None and step is not None:
            nxt = values[j]
            assert nxt is not None
            if abs(nxt - (v + step * (j - i))) > 1e-9:
                break
            j += 1
        n = j - i - 1
        if n == 0:
            parts.append(_num(v))
        elif step == 0:
            parts.append(f"{_num(v)}x{n}")
        else:
            assert step is not None
            sign = "+" if step >= 0 else "-"
            parts.append(f"{_num(v)}{sign}{_num(abs(step))}x{n}")
        i = j
    return " ".join(parts)


def _num(v: float) -> str:
    return f"{round(v, 6):g}"


def _selector(name: str, labels: dict[str, str]) -> str:
    inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{inner}}}"


def site_series(site: Site, fault: Fault | None, start: int, stop: int | None) -> dict[str, str]:
    """Every series one simulated site exports, sampled every STEP seconds from 0 to END."""
    times = [k * STEP for k in range(STEPS + 1)]

    def active(t: int) -> bool:
        return fault is not None and t >= start and (stop is None or t < stop)

    def sample(value: float, t: int) -> float | None:
        return None if active(t) and fault == "silent" else value

    def const(v: float) -> list[float | None]:
        return [sample(v, t) for t in times]

    down = [1.0 if active(t) and fault == "service_down" else 0.0 for t in times]
    slow = [active(t) and fault == "slow" for t in times]
    out: dict[str, list[float | None]] = {
        _selector(
            "netwatch_site_info",
            {**site.labels, "name": site.name, "uplink": site.uplink},
        ): const(1),
        _selector("up", {"job": "netwatch", "instance": f"{site.id}:9108", "site": site.id}): const(
            1
        ),
        _selector("netwatch_peak_hours", {"site": site.id}): const(1),
    }
    for target, kind, role in TARGETS:
        ids = {"site": site.id, "target": target, "type": kind}
        out[_selector("netwatch_target_info", {**ids, "role": role})] = const(1)
        if target != SERVICE:
            out[_selector("netwatch_link_up", ids)] = const(1)
            continue
        out[_selector("netwatch_link_up", ids)] = [
            sample(1 - d, t) for d, t in zip(down, times, strict=True)
        ]
        for state in ("up", "degraded", "down"):
            now = [
                "down" if d else "degraded" if s else "up" for d, s in zip(down, slow, strict=True)
            ]
            out[_selector("netwatch_link_state", {**ids, "state": state})] = [
                sample(float(n == state), t) for n, t in zip(now, times, strict=True)
            ]
        count, total = 0.0, 0.0
        counts: list[float | None] = []
        sums: list[float | None] = []
        for t, is_slow in zip(times, slow, strict=True):
            if t:
                count += 1
                total += SLOW_LATENCY if is_slow else NORMAL_LATENCY
            counts.append(sample(count, t))
            sums.append(sample(total, t))
        out[_selector("netwatch_probe_duration_seconds_count", ids)] = counts
        out[_selector("netwatch_probe_duration_seconds_sum", ids)] = sums
    return {name: _series_values(values) for name, values in out.items()}


def _annotations() -> dict[str, dict[str, str]]:
    out = {}
    for name in ("alerts.yml", "city.yml"):
        for group in yaml.safe_load((RULES / name).read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    out[rule["alert"]] = {
                        "labels": rule.get("labels", {}),
                        "annotations": rule["annotations"],
                    }
    return out


def humanize_percentage(value: float) -> str:
    """Prometheus' humanizePercentage: Go's %.4g of value * 100, then %."""
    text = f"{value * 100:.4g}"
    return f"{text}%"


def render(template: str, labels: dict[str, str], value: float, peak: bool) -> str:
    """The handful of Go-template forms our rule annotations use."""
    text = re.sub(
        r"\{\{ with (?:(?!\}\}).)*\bquery\b(?:(?!\}\}).)*\}\}(.*?)\{\{ end \}\}",
        lambda m: m.group(1) if peak else "",
        template,
    )
    text = re.sub(
        r"\{\{ with \$labels\.(\w+) \}\}(.*?)\{\{ \. \}\}\{\{ else \}\}(.*?)\{\{ end \}\}",
        lambda m: m.group(2) + labels[m.group(1)] if labels.get(m.group(1)) else m.group(3),
        text,
    )
    text = re.sub(
        r"\{\{ if eq \$value ([0-9.]+) \}\}(.*?)\{\{ else \}\}(.*?)\{\{ end \}\}",
        lambda m: m.group(2) if value == float(m.group(1)) else m.group(3),
        text,
    )
    text = text.replace("{{ $value | humanizePercentage }}", humanize_percentage(value))
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], text)
    assert "{{" not in text, text
    return text


def alert_labels(alert: Alert, rules: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {**dict(alert.labels), **rules[alert.name]["labels"]}


def expected_alert(alert: Alert, rules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    labels = alert_labels(alert, rules)
    return {
        "exp_labels": labels,
        "exp_annotations": {
            key: render(text, labels, alert.value, peak=True)
            for key, text in rules[alert.name]["annotations"].items()
        },
    }


def promtool_test(city: Sequence[Site], scenario: Scenario) -> dict[str, Any]:
    """One promtool test case: the city's series under this scenario, the exact alerts."""
    rules = _annotations()
    stop = FAULT_AT + int(scenario.duration) if scenario.duration else None
    series: dict[str, str] = {}
    for site in city:
        series.update(site_series(site, scenario.faults.get(site.id), FAULT_AT, stop))
    checks = []
    for eval_time, firing in (
        (BEFORE, frozenset[Alert]()),
        (VERDICT, scenario.expected),
        (STEADY, scenario.steady),
    ):
        for name in sorted(rules):
            alerts = sorted(
                (a for a in firing if a.name == name), key=lambda a: (a.labels, a.value)
            )
            checks.append(
                {
                    "eval_time": f"{eval_time}s",
                    "alertname": name,
                    "exp_alerts": [expected_alert(a, rules) for a in alerts],
                }
            )
    return {
        "name": scenario.name,
        "interval": f"{STEP}s",
        "input_series": [{"series": k, "values": v} for k, v in series.items()],
        "alert_rule_test": checks,
    }


def promtool_file(city: Sequence[Site], chosen: Iterable[Scenario], rules_dir: Path) -> str:
    doc = {
        "rule_files": [str(rules_dir / "city.yml"), str(rules_dir / "alerts.yml")],
        "evaluation_interval": f"{STEP}s",
        "tests": [promtool_test(city, s) for s in chosen],
    }
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=1000)


HEADER = """\
# GENERATED by tests/helpers/city.py from its scenarios; do not edit. Regenerate with:
#   .venv/bin/python tests/helpers/city.py --sites {sites} --districts {districts} --isps {isps} \\
#     > config/prometheus/rules/tests/city.yml
# Run: promtool test rules config/prometheus/rules/tests/city.yml
# tests/test_city_rules.py runs the same scenarios over 300 sites, 20 districts and 4 ISPs.
"""


def committed_file(sites: int, districts: int, isps: int) -> str:
    city = make_city(sites, districts, isps)
    body = promtool_file(city, scenarios(city), Path(".."))
    return HEADER.format(sites=sites, districts=districts, isps=isps) + body


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=12)
    parser.add_argument("--districts", type=int, default=3)
    parser.add_argument("--isps", type=int, default=4)
    args = parser.parse_args(argv)
    sys.stdout.write(committed_file(args.sites, args.districts, args.isps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
