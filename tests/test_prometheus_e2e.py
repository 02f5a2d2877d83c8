"""A real Prometheus, loaded with our rules, scrapes a real ``netwatch run`` whose link breaks.

Then every PromQL expression of the dashboards and the rules is run against Prometheus' HTTP
API: none may error, and the core panels (probe success, link state, outages, the latency
histogram) must return data.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
import yaml
from helpers.daemon import eventually, free_tcp_port, run_daemon
from helpers.relay import FaultRelay

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus" / "rules"
SITE = "e2e-site"
TARGET = "popdb-tcp"
# Values Grafana would put in for its variables; the range covers the whole test.
GRAFANA_VARS = {
    "$__rate_interval": "5s",
    "$__interval": "2s",
    "$__range": "1h",
    "$site": SITE,
    "$target": TARGET,
}
# Panels that must show data once the link went down and came back.
CORE_PANELS = {
    ("netwatch-city", "Link state, every site x target"),
    ("netwatch-city", "Availability over the range"),
    ("netwatch-city", "Outages begun per hour, peak vs off-peak"),
    ("netwatch-city", "Worst latency (p95 over the range)"),
    ("netwatch-site", "Link state"),
    ("netwatch-site", "Link usable"),
    ("netwatch-site", "Probe success"),
    ("netwatch-site", "Round-trip time (histogram buckets)"),
    ("netwatch-site", "Round-trip time p50 / p95"),
    ("netwatch-site", "Outages in range"),
    ("netwatch-site", "Outages in the range"),
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed"),
]


def substitute(expr: str) -> str:
    # Longest names first: $__rate_interval before $__interval.
    for name in sorted(GRAFANA_VARS, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARS[name])
    assert "$" not in expr, expr
    return expr


def dashboard_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        dash = json.loads(path.read_text(encoding="utf-8"))
        out.extend(
            (dash["uid"], panel["title"], substitute(target["expr"]))
            for panel in dash["panels"]
            for target in panel["targets"]
        )
    return out


def rule_queries() -> list[tuple[str, str, str]]:
    out = []
    for name in ("recording.yml", "alerts.yml", "city.yml"):
        for group in yaml.safe_load((RULES / name).read_text(encoding="utf-8"))["groups"]:
            out.extend(
                (name, rule.get("alert") or rule["record"], rule["expr"]) for rule in group["rules"]
            )
    return out


class Prometheus:
    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def query(self, expr: str) -> dict[str, Any]:
        async with self.session.post(f"{self.url}/api/v1/query", data={"query": expr}) as resp:
            body: dict[str, Any] = await resp.json()
            return body

    async def result(self, expr: str) -> list[dict[str, Any]]:
        body = await self.query(expr)
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def label_values(self, label: str, match: str) -> list[str]:
        async with self.session.get(
            f"{self.url}/api/v1/label/{label}/values", params={"match[]": match}
        ) as resp:
            body = await resp.json()
        assert body["status"] == "success", body
        values: list[str] = body["data"]
        return values


@asynccontextmanager
async def tcp_listener() -> AsyncIterator[int]:
    async def accept(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def start_prometheus(
    config: Path, data: Path, port: int, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


@asynccontextmanager
async def run_prometheus(tmp_path: Path, metrics_port: int) -> AsyncIterator[Prometheus]:
    port = free_tcp_port()
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "rule_files": [str(RULES / n) for n in ("recording.yml", "alerts.yml", "city.yml")],
        "scrape_configs": [
            {
                "job_name": "netwatch",
                "honor_labels": True,
                "static_configs": [
                    {"targets": [f"127.0.0.1:{metrics_port}"], "labels": {"site": SITE}}
                ],
            }
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = (tmp_path / "prometheus.log").open("wb")
    proc = start_prometheus(config_path, tmp_path / "tsdb", port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def ready() -> bool:
                assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    async with session.get(f"{url}/-/ready") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await eventually(ready, 20, "prometheus ready")
            yield Prometheus(session, url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


async def test_dashboards_and_rules_query_a_real_prometheus_scraping_netwatch(
    tmp_path: Path,
) -> None:
    metrics_port = free_tcp_port()
    async with tcp_listener() as upstream_port, FaultRelay("127.0.0.1", upstream_port) as relay:
        config = {
            "site": {"id": SITE, "name": "e2e"},
            "peak_hours": [{"days": ["mon-sun"], "start": "00:00", "end": "23:59"}],
            "defaults": {"interval": "200ms", "timeout": "150ms"},
            "targets": [{"name": TARGET, "type": "tcp", "host": "127.0.0.1", "port": relay.port}],
            "link": {"fail_after": 2, "recover_after": 2},
            "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        }
        async with (
            run_daemon(tmp_path, config),
            run_prometheus(tmp_path, metrics_port) as prom,
        ):
            selector = f'{{site="{SITE}", target="{TARGET}"}}'

            async def link_is(state: str) -> bool:
                expr = f'netwatch_link_state{{site="{SITE}", target="{TARGET}", state="{state}"}}'
                expr += " == 1"
                return bool(await prom.result(expr))

            await eventually(lambda: link_is("up"), 30, "link up in Prometheus", 0.5)
            relay.mode = "refuse"
            await eventually(lambda: link_is("down"), 30, "link down in Prometheus", 0.5)

            async def pending() -> bool:
                expr = f'ALERTS{{alertname="NetwatchLinkDown", site="{SITE}"}}'
                return bool(await prom.result(expr))

            await eventually(pending, 15, "NetwatchLinkDown pending", 0.5)
            relay.mode = "pass"
            await eventually(lambda: link_is("up"), 30, "link up again in Prometheus", 0.5)
            # A few more scrapes so that rate() and increase() see the recovery.
            samples = f"count_over_time(netwatch_link_up{selector}[1h])"

            async def scraped() -> float:
                rows = await prom.result(samples)
                return float(rows[0]["value"][1]) if rows else 0.0

            since = await scraped()
            await eventually(lambda: _at_least(scraped, since + 3), 30, "three more scrapes", 0.5)

            outages = await prom.result(f"sum(netwatch_outages_total{selector})")
            assert float(outages[0]["value"][1]) >= 1

            queries = dashboard_queries() + rule_queries()
            assert {(source, title) for source, title, _ in queries} >= CORE_PANELS
            empty, errors = [], []
            for source, title, expr in queries:
                body = await prom.query(expr)
                if body["status"] != "success":
                    errors.append(f"{source} / {title}: {body.get('error')}\n  {expr}")
                elif not body["data"]["result"]:
                    empty.append((source, title))
                for warning in body.get("warnings", []):
                    errors.append(f"{source} / {title}: warning {warning}")
            assert not errors, "\n".join(errors)
            assert not CORE_PANELS & set(empty), sorted(CORE_PANELS & set(empty))

            # Template variables, as Grafana's label_values() asks for them.
            assert SITE in await prom.label_values("site", "netwatch_link_up")
            assert TARGET in await prom.label_values(
                "target", f'netwatch_link_up{{site=~"{SITE}"}}'
            )


async def _at_least(read: Callable[[], Awaitable[float]], floor: float) -> bool:
    return await read() >= floor
