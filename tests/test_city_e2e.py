"""The central path at city scale, with real engines on loopback.

- 300 simulated sites (one loopback server, tests/helpers/city_sim.py) are scraped by a real
  Prometheus in agent mode, which remote-writes to a real central Prometheus (remote-write
  receiver) that evaluates config/prometheus/rules/city.yml; faults injected in the simulated
  sites make the right city alert fire there, and nothing broader or narrower in scope.
- The agent keeps samples through an outage of the central store (the WAN between them is a
  fault relay that refuses connections for a while): no gap in the central store's data for
  the outage window, on Prometheus and on VictoriaMetrics.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers.city import make_city
from helpers.city_sim import CitySim
from helpers.city_stack import (
    CENTRAL_ARGS,
    RULES,
    Api,
    Proc,
    alertmanager_config,
    central_config,
    run_agent,
    run_alertmanager,
    run_prometheus,
    run_victoria_metrics,
    run_vmalert,
    run_webhook,
    tuned_city_rules,
)
from helpers.relay import FaultRelay
from helpers.servers import wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(360),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed"),
]
needs_vm = pytest.mark.skipif(
    shutil.which("victoria-metrics") is None, reason="victoria-metrics is not installed"
)

ROOT = Path(__file__).resolve().parent.parent
SCRAPE = 2.0
EVALUATION = 1.0
SILENT = 3 * SCRAPE  # the NOC's tuned silence threshold for this short scrape interval
CITY_SCOPES = {"NetwatchPopulationDBOutage", "NetwatchISPOutage", "NetwatchDistrictOutage"}


@asynccontextmanager
async def rules_store(kind: str, tmp_path: Path) -> AsyncIterator[Proc]:
    """The central store with the city rules evaluated on it: a Prometheus with the
    remote-write receiver, or VictoriaMetrics with vmalert (and an Alertmanager for it)."""
    rules = [tuned_city_rules(tmp_path / "rules", silent_seconds=SILENT), RULES / "alerts.yml"]
    if kind == "prometheus":
        async with run_prometheus(
            tmp_path / "central",
            central_config(rules, EVALUATION, None),
            args=CENTRAL_ARGS,
            name="central",
        ) as central:
            yield central
        return
    async with (
        run_webhook() as hook,
        run_alertmanager(tmp_path / "am", alertmanager_config(hook.url, 0.1)) as am,
        run_victoria_metrics(tmp_path / "vm") as vm,
        run_vmalert(tmp_path / "vmalert", rules, vm.url, am.url, EVALUATION),
    ):
        yield vm


@asynccontextmanager
async def city_central(
    tmp_path: Path, sim: CitySim, kind: str = "prometheus"
) -> AsyncIterator[tuple[Proc, Proc, Api]]:
    async with (
        rules_store(kind, tmp_path) as central,
        run_agent(tmp_path / "agent", sim.targets, f"{central.url}/api/v1/write", SCRAPE) as agent,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
    ):
        yield central, agent, Api(session)


@pytest.mark.parametrize("kind", ["prometheus", pytest.param("victoria-metrics", marks=needs_vm)])
async def test_city_alerts_fire_centrally_from_agents_remote_write(
    kind: str, tmp_path: Path
) -> None:
    city = make_city(300, 20, 4)
    patience = 60 if kind == "prometheus" else 120
    async with (
        CitySim(city, per_shard=10) as sim,
        city_central(tmp_path, sim, kind) as (central, agent, api),
    ):

        async def known() -> bool:
            found = await api.query(
                central.url, "count(site:netwatch_site_info:last_seen_timestamp)"
            )
            return bool(found) and found[0]["value"][1] == str(len(city))

        await wait_until(known, 90, 0.5, "all 300 sites known centrally")

        async def broad() -> set[tuple[str, tuple[tuple[str, str], ...]]]:
            return {a for a in await api.firing(central.url) if a[0] in CITY_SCOPES}

        async def sites() -> set[str]:
            return {
                dict(labels)["site"]
                for name, labels in await api.firing(central.url)
                if name == "NetwatchSiteIsolated"
            }

        # A positive sign the rules run and see a healthy city: the DB ratio is recorded as 0.
        ratio = await wait_until(
            lambda: api.query(central.url, "netwatch:city_db_down:ratio"), patience, 0.5
        )
        assert ratio[0]["value"][1] == "0"
        assert await broad() == set()
        assert await sites() == set()

        isp_seconds = 0.0
        if kind == "prometheus":
            # One ISP's sites go silent: an ISP outage, not a district or the database. (On
            # VictoriaMetrics the same rules take a minute more per fault, see below: one
            # fault there, the database, keeps this test inside the CI budget.)
            isp = "FPT"
            cut = {s.id for s in city if s.isp == isp}
            started = sim.set_faults(dict.fromkeys(cut, "silent"))
            expected = {("NetwatchISPOutage", (("isp", isp),))}
            await wait_until(lambda: _equal(broad, expected), patience, 0.5, "ISP outage")
            isp_seconds = time.time() - started
            await wait_until(lambda: _equal(sites, cut), patience, 0.5, "its sites isolated")
            assert await broad() == expected

            # Back to normal, then the population database goes down for everyone.
            sim.set_faults({})
            await wait_until(lambda: _equal(broad, set()), patience, 0.5, "ISP outage resolved")
            await wait_until(lambda: _equal(sites, set()), patience, 0.5, "sites back")
        started = sim.set_faults(dict.fromkeys((s.id for s in city), "service_down"))
        expected = {("NetwatchPopulationDBOutage", ())}
        await wait_until(lambda: _equal(broad, expected), patience, 0.5, "database down")
        db_seconds = time.time() - started
        assert await broad() == expected
        # Fault to alert: the verdict needs the silence threshold for silent sites, and a
        # scrape plus a remote-write batch plus a rule evaluation for reporting ones. vmalert
        # reads each recording rule back from the store (a remote-write round trip per level
        # of the rule chain), so its verdict takes tens of seconds more: docs/operations.md.
        if kind == "prometheus":
            assert isp_seconds < SILENT + 4 * SCRAPE + 2 * EVALUATION + 10
            assert db_seconds < 4 * SCRAPE + 2 * EVALUATION + 10

        # The city dashboard, against the store the rules write to: every query runs, and
        # during the outage every panel but the brownout one has something to show.
        shown, errors = set(), []
        for title, expr in city_view_queries():
            async with api.session.post(
                f"{central.url}/api/v1/query", data={"query": expr}
            ) as resp:
                body = await resp.json()
            if body["status"] != "success" or body.get("warnings"):
                errors.append(f"{title}: {body}\n  {expr}")
            elif body["data"]["result"]:
                shown.add(title)
        panels = {title for title, _ in city_view_queries()}
        empty = panels - shown
        assert not errors, "\n".join(errors)
        # Nothing is slow here; and without the ISP phase (VictoriaMetrics) no site was cut
        # off in the dashboard's range. Every query still ran without error above.
        may_be_empty = {"Sites seeing the database slow"}
        if kind != "prometheus":
            may_be_empty.add("Cut-off share by district")
        assert empty <= may_be_empty, empty
        assert len(panels) >= 12
        # The store refused nothing the agent sent (a refused batch is dropped whole).
        failed = await agent_counter(api, agent.url, "prometheus_remote_storage_samples_failed")
        assert failed == 0


def city_view_queries() -> list[tuple[str, str]]:
    dash = json.loads(
        (ROOT / "grafana" / "dashboards" / "city-view.json").read_text(encoding="utf-8")
    )
    grafana = {"$__rate_interval": "10s", "$__interval": "2s", "$__range": "10m", "$site": ".*"}
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"]
            for name in sorted(grafana, key=len, reverse=True):
                expr = expr.replace(name, grafana[name])
            assert "$" not in expr, expr
            out.append((panel["title"], expr))
    return out


async def _equal(probe: Any, expected: Any) -> bool:
    return bool(await probe() == expected)


# --- the agent keeps samples through an outage -------------------------------------------

OUTAGE = 15.0
GAP_SCRAPE = 1.0
SERIES = 'netwatch_site_info{site="s0001"}'


async def raw_prometheus(api: Api, url: str, start: float, end: float) -> list[float]:
    window = int(end - start) + 1
    async with api.session.get(
        f"{url}/api/v1/query", params={"query": f"{SERIES}[{window}s]", "time": f"{end:.3f}"}
    ) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    (series,) = body["data"]["result"]
    return [float(t) for t, _ in series["values"]]


async def raw_victoria(api: Api, url: str, start: float, end: float) -> list[float]:
    params = {"match[]": SERIES, "start": f"{start:.3f}", "end": f"{end:.3f}"}
    async with api.session.get(f"{url}/api/v1/export", params=params) as resp:
        text = await resp.text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text[:500]
    return [t / 1000 for t in lines[0]["timestamps"]]


async def agent_counter(api: Api, url: str, name: str) -> float:
    """A counter from the agent's own /metrics (an agent answers no PromQL)."""
    async with api.session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == name
        for sample in family.samples
        if sample.name.endswith("_total")
    )


@asynccontextmanager
async def store(kind: str, tmp_path: Path) -> AsyncIterator[Proc]:
    if kind == "prometheus":
        async with run_prometheus(
            tmp_path / "central",
            central_config([], GAP_SCRAPE, None),
            args=CENTRAL_ARGS,
            name="central",
        ) as proc:
            yield proc
    else:
        async with run_victoria_metrics(tmp_path / "vm") as proc:
            yield proc


@pytest.mark.parametrize("kind", ["prometheus", pytest.param("victoria-metrics", marks=needs_vm)])
async def test_agent_remote_write_keeps_samples_through_an_outage(
    kind: str, tmp_path: Path
) -> None:
    city = make_city(5, 2, 2)
    raw = raw_prometheus if kind == "prometheus" else raw_victoria
    async with (
        CitySim(city) as sim,
        store(kind, tmp_path) as central,
        FaultRelay("127.0.0.1", int(central.url.rsplit(":", 1)[1])) as wan,
        run_agent(tmp_path / "agent", sim.targets, f"{wan.url}/api/v1/write", GAP_SCRAPE) as agent,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
    ):
        api = Api(session)

        async def newest() -> float:
            now = time.time()
            try:
                stamps = await raw(api, central.url, now - 30, now)
            except (AssertionError, ValueError):
                return 0.0
            return stamps[-1] if stamps else 0.0

        async def fresh() -> bool:
            return await newest() > time.time() - 5 * GAP_SCRAPE

        await wait_until(fresh, 60, 0.5, "samples reach the central store")
        outage_start = time.time()
        wan.mode = "refuse"

        async def failing() -> bool:
            retried = await agent_counter(
                api, agent.url, "prometheus_remote_storage_samples_retried"
            )
            return retried > 0 and await newest() < time.time() - 3 * GAP_SCRAPE

        # Positive sign of the outage: the agent holds samples back, the centre gets none.
        await wait_until(failing, 30, 0.5, "the central store cut off")
        # The outage itself lasts OUTAGE seconds: the scenario, not a wait for a result.
        await asyncio.sleep(max(0.0, outage_start + OUTAGE - time.time()))
        outage_end = time.time()
        wan.mode = "pass"

        async def caught_up() -> bool:
            return await newest() > outage_end + 3 * GAP_SCRAPE

        await wait_until(caught_up, 90, 0.5, "the agent catches up after the outage")
        stamps = await raw(api, central.url, outage_start - 5, outage_end + 3)
        inside = [t for t in stamps if outage_start <= t <= outage_end]
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert max(gaps) <= 2.5 * GAP_SCRAPE, gaps
        assert len(inside) >= (outage_end - outage_start) / GAP_SCRAPE * 0.8, len(inside)
