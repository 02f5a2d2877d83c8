"""The operators' pack: Prometheus, Alertmanager, Mosquitto and Grafana files are valid and agree.

Runs the real checkers (promtool, amtool) when installed, checks the dashboards' structure and
that every metric they or the rules name is one netwatch exports. The Mosquitto files run on
real brokers in tests/test_mosquitto_pack.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "config" / "prometheus"
RULES = PROM / "rules"
RULE_TESTS = sorted((RULES / "tests").glob("*.yml"))
ALERTMANAGER = ROOT / "config" / "alertmanager" / "alertmanager.yml"
DASHBOARDS = ROOT / "grafana" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}

GAUGES_AND_COUNTERS = {
    # contract table
    "netwatch_probe_success",
    "netwatch_probe_phase_seconds",
    "netwatch_probe_loss_ratio",
    "netwatch_link_up",
    "netwatch_link_state",
    "netwatch_link_transitions_total",
    "netwatch_outages_total",
    "netwatch_outage_seconds_total",
    "netwatch_peak_hours",
    "netwatch_proxy_mode",
    "netwatch_proxy_requests_total",
    "netwatch_queue_depth",
    "netwatch_queue_oldest_age_seconds",
    "netwatch_queue_bytes",
    "netwatch_replay_total",
    "netwatch_dead_letters",
    "netwatch_build_info",
    "netwatch_queue_in_doubt",
    # beyond the contract table
    "netwatch_probe_cert_expiry_days",
    "netwatch_probe_errors_total",
    "netwatch_mqtt_connected",
    "netwatch_mqtt_published_total",
    "netwatch_mqtt_dropped_total",
    "netwatch_webhook_total",
    # contract, "City view"
    "netwatch_site_info",
    "netwatch_target_info",
    "netwatch_site_fault",
    "netwatch_path_hop_rtt_seconds",
    "netwatch_path_hop_loss_ratio",
    "netwatch_path_hops",
    "netwatch_path_reached",
    # Prometheus' own
    "up",
    "ALERTS",
}
HISTOGRAMS = {
    "netwatch_probe_duration_seconds",
    "netwatch_replay_lag_seconds",
    "netwatch_scheduler_lag_seconds",
}
ALERTS = {
    "NetwatchLinkDown",
    "NetwatchLinkDegradedPeak",
    "NetwatchHighLoss",
    "NetwatchSiteAbsent",
    "NetwatchStationsOffline",
    "NetwatchQueueBacklogAging",
    "NetwatchDeadLetters",
    "NetwatchInDoubt",
    "NetwatchSchedulerLag",
    "NetwatchTLSCertExpiring",
    # config/prometheus/rules/city.yml
    "NetwatchSiteIsolated",
    "NetwatchISPOutage",
    "NetwatchDistrictOutage",
    "NetwatchPopulationDBOutage",
    "NetwatchPopulationDBSlow",
}
CITY_ALERTS = {
    "NetwatchSiteIsolated",
    "NetwatchISPOutage",
    "NetwatchDistrictOutage",
    "NetwatchPopulationDBOutage",
    "NetwatchPopulationDBSlow",
}
RULE_FILES = ("recording.yml", "alerts.yml", "city.yml")
PER_TARGET_ALERTS = {
    "NetwatchLinkDown",
    "NetwatchLinkDegradedPeak",
    "NetwatchHighLoss",
    "NetwatchTLSCertExpiring",
}
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_dashboards", ROOT / "grafana" / "build_dashboards.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    return {
        p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(DASHBOARDS.glob("*.json"))
    }


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) for every query of every dashboard panel."""
    return [
        (dash["uid"], panel["title"], target["expr"])
        for dash in dashboards().values()
        for panel in dash["panels"]
        for target in panel["targets"]
    ]


def rules() -> list[dict[str, Any]]:
    return [
        rule
        for name in RULE_FILES
        for group in _load_yaml(RULES / name)["groups"]
        for rule in group["rules"]
    ]


def recording_rule_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions or keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name = match.group()
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == "." or name.lower() in _KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def known_metric(name: str) -> bool:
    if name in GAUGES_AND_COUNTERS or name in recording_rule_names():
        return True
    base, _, suffix = name.rpartition("_")
    return suffix in {"bucket", "sum", "count"} and base in HISTOGRAMS


# --- Prometheus ---------------------------------------------------------------------------


def test_prometheus_config_and_its_rule_files_check() -> None:
    result = _run(_tool("promtool"), "check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(RULE_FILES)} rule files found" in result.stdout


def test_agent_config_checks_in_agent_mode() -> None:
    result = _run(_tool("promtool"), "check", "config", "--agent", str(PROM / "agent.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    remote = _load_yaml(PROM / "agent.yml")["remote_write"][0]
    assert remote["queue_config"]["max_backoff"]


def test_file_sd_targets_label_every_site() -> None:
    groups = _load_yaml(PROM / "targets" / "sites.yml")
    assert groups
    for group in groups:
        assert group["targets"]
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", group["labels"]["site"])


@pytest.mark.parametrize("name", RULE_FILES)
def test_rule_files_check(name: str) -> None:
    result = _run(_tool("promtool"), "check", "rules", str(RULES / name))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", RULE_TESTS, ids=[p.name for p in RULE_TESTS])
def test_promtool_rule_unit_tests_pass(path: Path) -> None:
    result = _run(_tool("promtool"), "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_defined_with_labels_and_bilingual_annotations() -> None:
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    assert set(alerts) == ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        for key in ("summary", "summary_vi", "runbook", "runbook_vi"):
            assert rule["annotations"][key].strip(), f"{name}: {key}"
        # Vietnamese text really is Vietnamese, not a copy of the English one.
        assert rule["annotations"]["summary_vi"] != rule["annotations"]["summary"]
        assert re.search(r"[àáảãạăâđèéêìíòóôơùúưỳ]", rule["annotations"]["runbook_vi"]), name


def test_every_alert_has_a_unit_test_that_fires_and_one_that_does_not() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in _load_yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                expected = check.get("exp_alerts") or []
                (fires if expected else silent).add(check["alertname"])
                for alert in expected:
                    assert set(alert["exp_annotations"]) >= {
                        "summary",
                        "summary_vi",
                        "runbook",
                        "runbook_vi",
                    }
                    assert "severity" in alert["exp_labels"]
    assert fires == ALERTS
    assert silent == ALERTS


def test_rule_exprs_name_only_exported_metrics() -> None:
    for rule in rules():
        unknown = {m for m in metric_names(rule["expr"]) if not known_metric(m)}
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (site, le) (rate(netwatch_replay_lag_seconds_bucket{site=~"$site"}[5m])) > 1 '
        'and on (site) netwatch_peak_hours == 1 or label_replace(up, "a", "b", "", "") offset 5m'
    )
    assert metric_names(expr) == {"netwatch_replay_lag_seconds_bucket", "netwatch_peak_hours", "up"}


# --- Alertmanager -------------------------------------------------------------------------


def test_alertmanager_config_checks() -> None:
    result = _run(_tool("amtool"), "check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_groups_by_site_and_inhibits_per_target_alerts_of_absent_sites() -> None:
    config = _load_yaml(ALERTMANAGER)
    assert config["route"]["group_by"] == ["site"]
    inhibit = config["inhibit_rules"][0]
    assert inhibit["source_matchers"] == ['alertname="NetwatchSiteAbsent"']
    assert inhibit["equal"] == ["site"]
    # Per-target alerts are exactly those whose series carry a target label.
    assert inhibit["target_matchers"] == ['target=~".+"']
    (receiver,) = config["receivers"]
    assert receiver["webhook_configs"][0]["url"].startswith("http://127.0.0.1:")


def test_alertmanager_inhibits_narrow_alerts_under_city_incidents() -> None:
    """The inhibition the contract names (its behaviour: tests/test_city_rules.py)."""
    rules = {tuple(r["source_matchers"]): r for r in _load_yaml(ALERTMANAGER)["inhibit_rules"][1:]}

    def targets(source: str) -> set[str]:
        (matcher,) = rules[(f'alertname="{source}"',)]["target_matchers"]
        names = re.fullmatch(r'alertname=~?"([^"]*)"', matcher)
        assert names, matcher
        return set(names.group(1).split("|"))

    assert targets("NetwatchPopulationDBOutage") >= {
        "NetwatchISPOutage",
        "NetwatchDistrictOutage",
        "NetwatchSiteIsolated",
        "NetwatchLinkDown",
    }
    assert rules[('alertname="NetwatchISPOutage"',)]["equal"] == ["isp"]
    assert rules[('alertname="NetwatchDistrictOutage"',)]["equal"] == ["district"]
    assert rules[('alertname="NetwatchSiteIsolated"',)]["equal"] == ["site"]
    assert targets("NetwatchSiteIsolated") >= PER_TARGET_ALERTS - {"NetwatchTLSCertExpiring"}
    assert CITY_ALERTS <= ALERTS


def test_alertmanager_routes_a_site_alert_to_the_webhook() -> None:
    result = _run(
        _tool("amtool"),
        "config",
        "routes",
        "test",
        f"--config.file={ALERTMANAGER}",
        "alertname=NetwatchLinkDown",
        "site=q1",
        "severity=critical",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "netwatch-webhook"


# --- Grafana ------------------------------------------------------------------------------


def test_committed_dashboards_equal_the_generator_output() -> None:
    rendered = load_generator().render()
    committed = {p.name: p.read_text(encoding="utf-8") for p in DASHBOARDS.glob("*.json")}
    assert committed == rendered, "run: .venv/bin/python grafana/build_dashboards.py"


def test_dashboards_have_stable_unique_uids_and_variables() -> None:
    boards = dashboards()
    assert {d["uid"] for d in boards.values()} == {
        "netwatch-city",
        "netwatch-city-view",
        "netwatch-site",
        "netwatch-stations",
    }
    for name, dash in boards.items():
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", name
        assert variables["datasource"]["query"] == "prometheus", name
        for var in ("site", "target"):
            assert variables[var]["datasource"] == DS, name
            assert variables[var]["query"]["query"].startswith("label_values("), name
        assert "target" in variables["target"]["definition"]


def test_every_panel_has_a_unique_id_a_title_and_the_datasource_variable() -> None:
    for name, dash in dashboards().items():
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in dash["panels"]:
            assert panel["title"].strip(), (name, panel["id"])
            assert panel["datasource"] == DS, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"] == DS, (name, panel["title"])
                assert target["expr"].strip(), (name, panel["title"])


def test_panels_do_not_overlap() -> None:
    for name, dash in dashboards().items():
        cells: set[tuple[int, int]] = set()
        for panel in dash["panels"]:
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24, (name, panel["title"])
            mine = {
                (x, y)
                for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])
            }
            assert not cells & mine, (name, panel["title"])
            cells |= mine


def test_dashboard_exprs_name_only_exported_metrics_or_recording_rules() -> None:
    exprs = [(uid, title, expr) for uid, title, expr in dashboard_exprs()]
    for dash in dashboards().values():
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                inner = re.fullmatch(r"label_values\((.*), \w+\)", var["query"]["query"])
                assert inner, var["name"]
                exprs.append((dash["uid"], f"${var['name']}", inner.group(1)))
    for uid, title, expr in exprs:
        unknown = {m for m in metric_names(expr) if not known_metric(m)}
        assert not unknown, f"{uid} / {title}: {unknown}"


def test_core_panels_exist() -> None:
    kinds = {
        (dash["uid"], panel["type"]) for dash in dashboards().values() for panel in dash["panels"]
    }
    assert ("netwatch-city", "state-timeline") in kinds
    assert ("netwatch-site", "heatmap") in kinds
    assert ("netwatch-stations", "state-timeline") in kinds
    assert ("netwatch-city-view", "state-timeline") in kinds  # incident timeline


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    provider = _load_yaml(ROOT / "grafana" / "provisioning" / "dashboards" / "netwatch.yaml")
    path = provider["providers"][0]["options"]["path"]
    datasource = _load_yaml(ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")
    assert datasource["datasources"][0]["type"] == "prometheus"
    compose = _load_yaml(ROOT / "docker-compose.yml")
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts


# --- docker compose -----------------------------------------------------------------------


def test_compose_mounts_only_files_that_exist() -> None:
    compose = _load_yaml(ROOT / "docker-compose.yml")
    assert set(compose["services"]) == {
        "netwatch",
        "mosquitto",
        "prometheus",
        "alertmanager",
        "grafana",
    }
    build = compose["services"]["netwatch"]["build"]
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    named = set(compose.get("volumes", {}))
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in named, f"{name}: undeclared volume {source}"
        for config in service.get("configs", []):
            assert config["source"] in compose["configs"], name


def test_compose_prometheus_finds_its_rules_where_prometheus_yml_says() -> None:
    compose = _load_yaml(ROOT / "docker-compose.yml")
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    config_dir = Path(mounts["./config/prometheus/prometheus.yml"]).parent
    for rule_file in _load_yaml(PROM / "prometheus.yml")["rule_files"]:
        host = PROM / rule_file
        assert host.is_file()
        assert mounts[f"./config/prometheus/{Path(rule_file).parent}"] == str(
            config_dir / Path(rule_file).parent
        )


def test_compose_netwatch_config_is_valid(tmp_path: Path) -> None:
    compose = _load_yaml(ROOT / "docker-compose.yml")
    content = compose["configs"]["netwatch-config"]["content"].replace("$$", "$")
    config = tmp_path / "netwatch.yaml"
    config.write_text(content, encoding="utf-8")
    env = {"NETWATCH_MQTT_PASSWORD": "demo", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "netwatch", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    site = _load_yaml(config)["site"]["id"]
    scrape = _load_yaml(PROM / "prometheus.yml")["scrape_configs"][0]["static_configs"][0]
    assert scrape["labels"]["site"] == site
    assert scrape["targets"] == ["netwatch:9108"]
