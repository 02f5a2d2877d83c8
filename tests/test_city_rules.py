"""City rules: where is the fault? Scenarios over 300 simulated sites, 20 districts, 4 ISPs.

For each scenario a generator (tests/helpers/city.py) writes a ``promtool test rules`` file:
every site's series, and the exact set of alerts that must fire, by name and labels, before
the fault (none), at the verdict and minutes later; every other alert: none. Then a real
Alertmanager, with the shipped config, is fed those alerts: only the broad one is left
un-inhibited and exactly one notification per incident reaches a loopback webhook.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from helpers.city import (
    RULES,
    Alert,
    Scenario,
    _annotations,
    alert_labels,
    committed_file,
    make_city,
    promtool_file,
    scenarios,
)
from helpers.city_stack import (
    ALERTMANAGER_BIN,
    Api,
    alertmanager_config,
    run_alertmanager,
    run_webhook,
)
from helpers.servers import wait_until

CITY = make_city(300, 20, 4)
SCENARIOS = scenarios(CITY)
BY_NAME = {s.name: s for s in SCENARIOS}
ROOT = Path(__file__).resolve().parent.parent

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool")
needs_alertmanager = pytest.mark.skipif(
    shutil.which(ALERTMANAGER_BIN) is None, reason="no prometheus-alertmanager"
)


def promtool(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", "test", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


def test_the_simulated_city_has_300_sites_in_20_districts_and_4_isps() -> None:
    assert len({s.id for s in CITY}) == 300
    assert len({s.district for s in CITY}) == 20
    assert len({s.isp for s in CITY}) == 4
    # Every district mixes ISPs, so an ISP outage is not mistaken for a district one.
    for district in {s.district for s in CITY}:
        isps = [s.isp for s in CITY if s.district == district]
        assert max(isps.count(i) for i in set(isps)) / len(isps) < 0.5
    assert [s.name for s in SCENARIOS] == [
        "one-site-cut",
        "isp-down",
        "district-down",
        "database-down",
        "peak-brownout",
        "two-unrelated-sites",
        "isp-during-database",
        "central-store-late",
    ]


@needs_promtool
@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_promtool_the_right_alert_with_the_right_labels_and_nothing_else(
    scenario: Scenario, tmp_path: Path
) -> None:
    path = tmp_path / f"{scenario.name}.yml"
    path.write_text(promtool_file(CITY, [scenario], RULES), encoding="utf-8")
    result = promtool(path)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_rejects_a_wrong_verdict(tmp_path: Path) -> None:
    """The generated checks bite: an ISP outage claimed to be a district outage fails."""
    isp = BY_NAME["isp-down"]
    district = next(s.district for s in CITY if s.id in isp.faults)
    wrong = {a for a in isp.expected if a.name != "NetwatchISPOutage"}
    wrong.add(Alert.of("NetwatchDistrictOutage", district=district))
    path = tmp_path / "wrong.yml"
    path.write_text(
        promtool_file(CITY, [replace(isp, expected=frozenset(wrong))], RULES), encoding="utf-8"
    )
    result = promtool(path)
    assert result.returncode != 0
    assert "NetwatchDistrictOutage" in result.stdout + result.stderr
    assert "NetwatchISPOutage" in result.stdout + result.stderr


def test_committed_small_city_tests_are_the_generator_output() -> None:
    committed = (RULES / "tests" / "city.yml").read_text(encoding="utf-8")
    assert committed == committed_file(12, 3, 4), (
        "run: .venv/bin/python tests/helpers/city.py > config/prometheus/rules/tests/city.yml"
    )


def test_thresholds_are_recording_rule_constants() -> None:
    doc = yaml.safe_load((RULES / "city.yml").read_text(encoding="utf-8"))
    constants = {
        rule["record"]: rule["expr"]
        for group in doc["groups"]
        for rule in group["rules"]
        if rule.get("record", "").endswith(("_threshold", "_min_sites", "_seconds"))
    }
    assert constants["netwatch:city_isp_outage_ratio_threshold"] == "vector(0.5)"
    assert constants["netwatch:city_district_outage_ratio_threshold"] == "vector(0.5)"
    assert constants["netwatch:city_db_outage_ratio_threshold"] == "vector(0.5)"
    assert "netwatch:city_site_silent_seconds_threshold" in constants
    alerts = {r["alert"]: r for g in doc["groups"] for r in g["rules"] if "alert" in r}
    assert set(alerts) == {
        "NetwatchSiteIsolated",
        "NetwatchISPOutage",
        "NetwatchDistrictOutage",
        "NetwatchPopulationDBOutage",
        "NetwatchPopulationDBSlow",
    }
    for name, rule in alerts.items():
        assert {"scope", "severity"} <= set(rule["labels"]), name


# --- a real Alertmanager --------------------------------------------------------------------

CANARY = {"alertname": "NetwatchDeadLetters", "site": "canary-site", "severity": "warning"}


def am_alert(alert: Alert, rules: dict[str, dict[str, Any]], now: str) -> dict[str, Any]:
    return {
        "labels": {"alertname": alert.name, **alert_labels(alert, rules)},
        "annotations": {"summary": alert.name},
        "startsAt": now,
    }


def key(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in labels.items() if k not in {"severity", "scope"}))


@needs_alertmanager
@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_alertmanager_leaves_only_the_broad_alert_and_notifies_once(
    scenario: Scenario, tmp_path: Path
) -> None:
    rules = _annotations()
    firing = scenario.expected | scenario.steady
    now = datetime.now(UTC).isoformat()
    alerts = [am_alert(a, rules, now) for a in sorted(firing, key=lambda a: (a.name, a.labels))]
    async with (
        run_webhook() as hook,
        run_alertmanager(tmp_path, alertmanager_config(hook.url, scale=0.1)) as am,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
    ):
        api = Api(session)
        await api.post_alerts(am.url, [*alerts, {"labels": CANARY, "startsAt": now}])

        def notified(name: str) -> list[dict[str, Any]]:
            return [b for b in hook.firing() if b["commonLabels"].get("alertname") == name]

        # The canary is an unrelated site alert with the site route's (longest) group_wait:
        # once it is notified, any narrow alert that was not inhibited would have been too.
        await wait_until(lambda: notified("NetwatchDeadLetters"), 60, 0.1, "canary notified")

        uninhibited = {
            key(a["labels"])
            for a in await api.am_alerts(am.url, inhibited=False)
            if a["labels"]["alertname"] != "NetwatchDeadLetters"
        }
        broad = {
            key({"alertname": a.name, **dict(a.labels)}) for a in firing if a.name in scenario.broad
        }
        assert uninhibited == broad
        inhibited = await api.am_alerts(am.url, inhibited=True)
        assert len(inhibited) == len(firing) + 1  # all of them are there, just inhibited

        pages = [
            b
            for _, b in hook.received
            if b["commonLabels"].get("alertname") != "NetwatchDeadLetters"
        ]
        assert len(pages) == scenario.incidents, [b["groupLabels"] for b in pages]
        for body in pages:
            assert body["status"] == "firing"
            assert {a["labels"]["alertname"] for a in body["alerts"]} <= scenario.broad
        assert {key(a["labels"]) for b in pages for a in b["alerts"]} == broad
