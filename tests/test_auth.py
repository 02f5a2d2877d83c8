"""Optional bearer tokens: ``metrics.token`` on the daemon's ``/metrics`` and
``/api/v1/status``, ``proxy.admin_token`` on the proxy's ``/_netwatch/status`` and
``/_netwatch/metrics``; ``netwatch status --token``; a real Prometheus scraping with
``authorization.credentials_file``."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
import yaml
from helpers.cli import netwatch
from helpers.daemon import eventually, free_tcp_port, run_daemon
from prometheus_client import CollectorRegistry

from netwatch.config.schema import Proxy
from netwatch.events import EventHub
from netwatch.proxy.station import StationProxy

TOKEN = "t0ken-for-tests-7f3a"
SITE = "auth-site"


async def get(
    url: str, token: str | None = None, query: str | None = None
) -> tuple[int, dict[str, str], str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    params = {"query": query} if query else None
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.get(url, headers=headers, params=params) as response,
    ):
        return response.status, dict(response.headers), await response.text()


async def assert_protected(url: str) -> str:
    """``url`` refuses no token and a wrong one (401 + challenge), serves the right one."""
    for token in (None, TOKEN + "x", TOKEN[:-1]):
        status, headers, _ = await get(url, token)
        assert status == 401, (url, token)
        assert headers["WWW-Authenticate"].startswith("Bearer "), headers
    status, _, body = await get(url, TOKEN)
    assert status == 200, (url, body)
    return body


def daemon_config(tcp_upstream: int, metrics_port: int) -> dict[str, Any]:
    return {
        "site": {"id": SITE},
        "defaults": {"interval": "200ms", "timeout": "150ms"},
        "targets": [{"name": "gw", "type": "tcp", "host": "127.0.0.1", "port": tcp_upstream}],
        "metrics": {"listen": f"127.0.0.1:{metrics_port}", "token": "${NETWATCH_METRICS_TOKEN}"},
    }


async def test_daemon_metrics_and_status_need_the_token(
    tmp_path: Path, tcp_upstream: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETWATCH_METRICS_TOKEN", TOKEN)
    monkeypatch.delenv("NETWATCH_TOKEN", raising=False)
    port = free_tcp_port()
    async with run_daemon(tmp_path, daemon_config(tcp_upstream, port)):
        base = f"http://127.0.0.1:{port}"
        assert "netwatch_build_info" in await assert_protected(f"{base}/metrics")
        assert SITE in await assert_protected(f"{base}/api/v1/status")
        status, _, _ = await get(f"{base}/healthz")
        assert status == 200  # health checks carry no token and learn nothing

        refused = await asyncio.to_thread(netwatch, "status", "--url", base)
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines() == [
            f"netwatch: error: {base}/api/v1/status answered 401 Unauthorized: "
            "it needs a token: --token or NETWATCH_TOKEN"
        ]
        by_flag = await asyncio.to_thread(netwatch, "status", "--url", base, "--token", TOKEN)
        assert by_flag.returncode == 0, by_flag.stderr
        assert SITE in by_flag.stdout
        by_env = await asyncio.to_thread(
            netwatch, "status", "--url", base, "--json", env={"NETWATCH_TOKEN": TOKEN}
        )
        assert by_env.returncode == 0, by_env.stderr
        assert SITE in by_env.stdout


@asynccontextmanager
async def station(tmp_path: Path, **overrides: Any) -> AsyncIterator[StationProxy]:
    settings = Proxy.model_validate(
        {
            "listen": f"127.0.0.1:{free_tcp_port()}",
            "upstream": f"http://127.0.0.1:{free_tcp_port()}",
            "queue": {"path": str(tmp_path / "queue.db")},
            **overrides,
        }
    )
    proxy = StationProxy(settings, SITE, CollectorRegistry(), EventHub(), lambda: False, None)
    async with proxy:
        yield proxy


async def test_proxy_status_and_metrics_need_the_admin_token(tmp_path: Path) -> None:
    async with station(tmp_path, admin_token=TOKEN) as proxy:
        status = await assert_protected(f"{proxy.url}/_netwatch/status")
        assert '"guard"' in status
        assert "netwatch_proxy_mode" in await assert_protected(f"{proxy.url}/_netwatch/metrics")
        # Stations and the counter staff need no token: tickets, health, the page and the
        # public view, which leaves out guards, overrides and the upstream.
        code, _, public = await get(f"{proxy.url}/_netwatch/public")
        assert code == 200
        assert '"mode"' in public
        assert '"guard"' not in public
        assert '"override"' not in public
        assert (await get(f"{proxy.url}/_netwatch/tickets/{'0' * 32}"))[0] == 404
        assert (await get(f"{proxy.url}/_netwatch/healthz"))[0] == 200
        code, _, page = await get(f"{proxy.url}/_netwatch/")
        assert code == 200
        assert '"/_netwatch/public"' in page


async def test_without_a_token_everything_stays_open(tmp_path: Path) -> None:
    async with station(tmp_path) as proxy:
        for path in ("/_netwatch/status", "/_netwatch/metrics", "/_netwatch/"):
            assert (await get(f"{proxy.url}{path}"))[0] == 200, path
        _, _, page = await get(f"{proxy.url}/_netwatch/")
        assert '"/_netwatch/status"' in page
        # Typed without the slash (and never forwarded upstream): the page.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{proxy.url}/_netwatch?lang=en", allow_redirects=False) as response,
        ):
            assert response.status == 302
            assert response.headers["Location"] == "/_netwatch/?lang=en"


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


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
async def test_prometheus_scrapes_with_the_token_from_a_credentials_file(
    tmp_path: Path, tcp_upstream: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETWATCH_METRICS_TOKEN", TOKEN)
    metrics_port, prom_port = free_tcp_port(), free_tcp_port()
    credentials = tmp_path / "netwatch.token"
    credentials.write_text(TOKEN + "\n", encoding="utf-8")
    credentials.chmod(0o600)
    target = {"targets": [f"127.0.0.1:{metrics_port}"]}
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms"},
        "scrape_configs": [
            {
                "job_name": "netwatch",
                "honor_labels": True,
                "authorization": {"credentials_file": str(credentials)},
                "static_configs": [target],
            },
            {"job_name": "netwatch-no-token", "static_configs": [target]},
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    with (tmp_path / "prometheus.log").open("wb") as log:
        prom = start_prometheus(config_path, tmp_path / "tsdb", prom_port, log)
        try:
            api = f"http://127.0.0.1:{prom_port}/api/v1/query"
            async with run_daemon(tmp_path, daemon_config(tcp_upstream, metrics_port)):

                async def up(job: str) -> str | None:
                    assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
                    try:
                        code, _, body = await get(api, query=f'up{{job="{job}"}}')
                    except aiohttp.ClientError:
                        return None
                    if code != 200:
                        return None
                    result = yaml.safe_load(body)["data"]["result"]
                    return str(result[0]["value"][1]) if result else None

                await eventually(lambda: up("netwatch-no-token"), 30, "scrape without token")
                assert await up("netwatch-no-token") == "0"  # refused: 401

                async def scraped() -> bool:
                    return await up("netwatch") == "1"

                await eventually(scraped, 30, "scrape with the token")

                async def site_series() -> bool:
                    query = f'netwatch_build_info{{site="{SITE}"}}'
                    _, _, body = await get(api, query=query)
                    return bool(yaml.safe_load(body)["data"]["result"])

                await eventually(site_series, 30, "netwatch series in Prometheus")
        finally:
            prom.terminate()
            try:
                prom.wait(10)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait(10)
