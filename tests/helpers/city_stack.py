"""Real central-side processes on loopback: Prometheus (server or agent), VictoriaMetrics,
Alertmanager, and a webhook receiver that records Alertmanager's notifications.

Each is an async context manager that starts the process, waits until it is ready and stops
it (SIGTERM, then SIGKILL) on exit. Used by tests/test_city_*.py and bench/city.py.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from .servers import free_port, run_http_server

ROOT = Path(__file__).resolve().parents[2]
ALERTMANAGER_BIN = "prometheus-alertmanager"


def which(name: str) -> str | None:
    return shutil.which(name)


@dataclass
class Proc:
    """A started process, its base URL and log file."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]


async def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args!r} exited: {_tail(log)}")
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{proc.args!r} not ready at {url} after {timeout}s")


def _tail(log: Path) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-3000:]


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def _write_yaml(workdir: Path, name: str, config: dict[str, Any]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / name
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@asynccontextmanager
async def run_process(
    args: list[str], log: Path, ready_url: str, base_url: str, timeout: float = 30
) -> AsyncIterator[Proc]:
    proc = _spawn(args, log)
    try:
        await _wait_ready(proc, ready_url, log, timeout)
        yield Proc(proc, base_url, log)
    finally:
        _stop(proc)


@asynccontextmanager
async def run_prometheus(
    workdir: Path,
    config: dict[str, Any],
    *,
    agent: bool = False,
    args: tuple[str, ...] = (),
    port: int | None = None,
    name: str = "prometheus",
) -> AsyncIterator[Proc]:
    """A Prometheus server (or, with ``agent``, one in agent mode) with ``config``."""
    port = port or free_port()
    path = _write_yaml(workdir, f"{name}.yml", config)
    storage = workdir / f"{name}-data"
    argv = [
        "prometheus",
        f"--config.file={path}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    if agent:
        argv += ["--enable-feature=agent", f"--storage.agent.path={storage}"]
    else:
        argv += [f"--storage.tsdb.path={storage}"]
    url = f"http://127.0.0.1:{port}"
    async with run_process([*argv, *args], workdir / f"{name}.log", f"{url}/-/ready", url) as proc:
        yield proc


@asynccontextmanager
async def run_victoria_metrics(workdir: Path, port: int | None = None) -> AsyncIterator[Proc]:
    """Single-node VictoriaMetrics: remote-write at /api/v1/write, PromQL at /api/v1/query."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        "victoria-metrics",
        f"-storageDataPath={workdir / 'vm-data'}",
        f"-httpListenAddr=127.0.0.1:{port}",
        "-retentionPeriod=1",
        # Answer queries about the last seconds too (default: hide the last 30 s).
        "-search.latencyOffset=0s",
        "-loggerLevel=WARN",
    ]
    async with run_process(argv, workdir / "vm.log", f"{url}/health", url) as proc:
        yield proc


@asynccontextmanager
async def run_alertmanager(workdir: Path, config: dict[str, Any]) -> AsyncIterator[Proc]:
    port = free_port()
    path = _write_yaml(workdir, "alertmanager.yml", config)
    url = f"http://127.0.0.1:{port}"
    argv = [
        ALERTMANAGER_BIN,
        f"--config.file={path}",
        f"--storage.path={workdir / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]
    async with run_process(argv, workdir / "alertmanager.log", f"{url}/-/ready", url) as proc:
        yield proc


def alertmanager_config(webhook_url: str, scale: float = 1.0) -> dict[str, Any]:
    """The shipped config/alertmanager/alertmanager.yml, pointed at ``webhook_url``, with its
    group_wait/group_interval multiplied by ``scale`` (tests run in seconds, not minutes).
    Routes, grouping and inhibit rules are left as shipped."""
    config: dict[str, Any] = yaml.safe_load(
        (ROOT / "config" / "alertmanager" / "alertmanager.yml").read_text(encoding="utf-8")
    )
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url

    def scaled(route: dict[str, Any]) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = f"{max(1, round(_seconds(route[key]) * scale * 1000))}ms"
        for child in route.get("routes", []):
            scaled(child)

    scaled(config["route"])
    return config


def _seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    raise ValueError(text)


@dataclass
class Webhook:
    """Alertmanager notifications received, in order, with their arrival times."""

    url: str = ""
    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)

    def firing(self) -> list[dict[str, Any]]:
        return [body for _, body in self.received if body.get("status") == "firing"]


@asynccontextmanager
async def run_webhook() -> AsyncIterator[Webhook]:
    hook = Webhook()

    async def receive(request: web.Request) -> web.Response:
        hook.received.append((time.time(), await request.json()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/alertmanager", receive)
    async with run_http_server(app) as base:
        hook.url = f"{base}/alertmanager"
        yield hook


class Api:
    """The bits of the Prometheus / VictoriaMetrics / Alertmanager HTTP APIs the tests use."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def query(self, base: str, expr: str) -> list[dict[str, Any]]:
        async with self.session.post(f"{base}/api/v1/query", data={"query": expr}) as resp:
            body: dict[str, Any] = await resp.json(content_type=None)
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def firing(self, base: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        """ALERTS that are firing on a Prometheus, as (alertname, other labels)."""
        out = set()
        for series in await self.query(base, 'ALERTS{alertstate="firing"}'):
            labels = dict(series["metric"])
            name = labels.pop("alertname")
            # alertgroup: vmalert adds the rule group's name.
            for drop in ("__name__", "alertstate", "severity", "scope", "alertgroup"):
                labels.pop(drop, None)
            out.add((name, tuple(sorted(labels.items()))))
        return out

    async def post_alerts(self, base: str, alerts: list[dict[str, Any]]) -> None:
        async with self.session.post(f"{base}/api/v2/alerts", json=alerts) as resp:
            assert resp.status == 200, await resp.text()

    async def am_alerts(self, base: str, *, inhibited: bool) -> list[dict[str, Any]]:
        params = {
            "active": "true",
            "silenced": "false",
            "inhibited": "true" if inhibited else "false",
            "unprocessed": "false",
        }
        async with self.session.get(f"{base}/api/v2/alerts", params=params) as resp:
            assert resp.status == 200, await resp.text()
            body: list[dict[str, Any]] = await resp.json()
            return body


# --- the central path at city scale ---------------------------------------------------------

RULES = ROOT / "config" / "prometheus" / "rules"


def tuned_city_rules(workdir: Path, fors: dict[str, str] | None = None, **constants: float) -> Path:
    """config/prometheus/rules/city.yml with some threshold constants changed, the way a NOC
    tunes them: ``silent_seconds=5`` sets netwatch:city_site_silent_seconds_threshold;
    ``fors={"NetwatchPopulationDBSlow": "10s"}`` changes an alert's ``for``."""
    doc: dict[str, Any] = yaml.safe_load((RULES / "city.yml").read_text(encoding="utf-8"))
    seen = set()
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in (fors or {}):
                rule["for"] = (fors or {})[rule["alert"]]
            record = rule.get("record", "")
            for key, value in constants.items():
                if record in (f"netwatch:city_site_{key}_threshold", f"netwatch:city_{key}"):
                    rule["expr"] = f"vector({value:g})"
                    seen.add(record)
    assert len(seen) == len(constants), (constants, seen)
    return _write_yaml(workdir, "city.yml", doc)


def _ms(seconds: float) -> str:
    """A duration Prometheus accepts (it wants whole units)."""
    return f"{round(seconds * 1000)}ms"


def agent_config(
    targets: list[tuple[str, str, str | None]],
    write_url: str | list[str],
    scrape: float,
    batch: float | None = None,
) -> dict[str, Any]:
    """Prometheus in agent mode, as in config/prometheus/agent.yml, scraping simulated sites."""
    return {
        "global": {
            "scrape_interval": _ms(scrape),
            "scrape_timeout": _ms(scrape * 0.8),
        },
        "scrape_configs": [
            {
                "job_name": "netwatch",
                "honor_labels": True,
                "static_configs": [
                    {
                        "targets": [host],
                        "labels": {"__metrics_path__": path, **({"site": site} if site else {})},
                    }
                    for host, path, site in targets
                ],
            }
        ],
        "remote_write": [
            {
                "url": url,
                "name": f"central-{n}",
                "remote_timeout": "5s",
                "queue_config": {
                    "capacity": 20000,
                    "max_shards": 8,
                    "max_samples_per_send": 5000,
                    "batch_send_deadline": _ms(batch or scrape),
                    "min_backoff": "100ms",
                    "max_backoff": "1s",
                    "retry_on_http_429": True,
                },
            }
            for n, url in enumerate([write_url] if isinstance(write_url, str) else write_url)
        ],
    }


AGENT_ARGS = ("--storage.agent.retention.max-time=24h",)


@asynccontextmanager
async def run_agent(
    workdir: Path,
    targets: list[tuple[str, str, str | None]],
    write_url: str | list[str],
    scrape: float,
    batch: float | None = None,
) -> AsyncIterator[Proc]:
    """Prometheus in agent mode, its WAL kept a day, scraping ``targets``."""
    async with run_prometheus(
        workdir,
        agent_config(targets, write_url, scrape, batch),
        agent=True,
        args=AGENT_ARGS,
        name="agent",
    ) as agent:
        yield agent


def central_config(rule_files: list[Path], evaluation: float, am_url: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "global": {"evaluation_interval": _ms(evaluation)},
        "rule_files": [str(p) for p in rule_files],
    }
    if am_url:
        host = am_url.removeprefix("http://")
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [host]}]}]}
    return config


CENTRAL_ARGS = ("--web.enable-remote-write-receiver",)


@asynccontextmanager
async def run_vmalert(
    workdir: Path, rule_files: list[Path], store_url: str, am_url: str, evaluation: float
) -> AsyncIterator[Proc]:
    """vmalert evaluating Prometheus rule files against VictoriaMetrics; recording rules and
    ALERTS are written back to the store."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        "vmalert",
        *(f"-rule={p}" for p in rule_files),
        f"-datasource.url={store_url}",
        f"-remoteWrite.url={store_url}",
        f"-remoteRead.url={store_url}",
        "-remoteWrite.flushInterval=200ms",
        f"-notifier.url={am_url}",
        f"-evaluationInterval={_ms(evaluation)}",
        f"-httpListenAddr=127.0.0.1:{port}",
        "-loggerLevel=WARN",
    ]
    async with run_process(argv, workdir / "vmalert.log", f"{url}/health", url) as proc:
        yield proc
