"""The city view, site side, at its edges: config values an operator gets wrong, hosts a
trace cannot use, reloads that change roles or labels, and what the metrics say about a
trace that could not even start. Loopback only (and ``bad..name``, which the resolver
refuses without asking anyone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from helpers.daemon import eventually, free_tcp_port, run_daemon, write_config
from helpers.mosquitto import run_mosquitto
from helpers.mqtt_sub import watch
from prometheus_client import CollectorRegistry
from rich.console import Console
from test_cli import netwatch

from netwatch.clock import SystemClock
from netwatch.config.schema import Config, Link, parse_config
from netwatch.errors import ConfigError
from netwatch.monitor.city import CityCollector, SiteFault
from netwatch.monitor.metrics import MonitorMetrics
from netwatch.monitor.runner import Monitor
from netwatch.monitor.schedule import PeakSchedule
from netwatch.oneshot import render_status
from probes.http import close_shared_sessions
from probes.path import PathProbe

# A name the resolver rejects locally (an empty label): no query leaves the machine.
UNRESOLVABLE = "bad..name"


def problems_of(targets: str, extra: str = "") -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"site: {{id: s}}\n{extra}targets:\n{targets}", "site.yaml")
    return caught.value.problems


# --- config -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["icmp", "path", "tcp", "tls"])
@pytest.mark.parametrize("host", ['""', '" "'])
def test_an_empty_host_is_a_config_error_not_a_crash_at_start(kind: str, host: str) -> None:
    port = ", port: 443" if kind == "tcp" else ""
    problems = problems_of(f"  - {{name: a, type: {kind}, host: {host}{port}}}\n")
    assert problems == ["site.yaml:3: targets[0].host: a host is needed (a name or an IP address)"]


@pytest.mark.parametrize("kind", ["icmp", "path"])
def test_a_host_with_a_port_is_refused_where_there_is_no_port(kind: str) -> None:
    problems = problems_of(f'  - {{name: a, type: {kind}, host: "127.0.0.1:80"}}\n')
    assert len(problems) == 1
    assert problems[0].startswith("site.yaml:3: targets[0].host: '127.0.0.1:80' is not a host")


@pytest.mark.parametrize(("written", "kept"), [('"::1"', "::1"), ('"[::1]"', "::1")])
def test_ipv6_literals_are_hosts_brackets_or_not(written: str, kept: str) -> None:
    config = parse_config(
        f"site: {{id: s}}\ntargets:\n  - {{name: a, type: path, host: {written}}}\n"
    )
    assert config.targets[0].host == kept  # type: ignore[union-attr]


def test_a_port_on_an_icmp_trace_is_refused() -> None:
    problems = problems_of("  - {name: a, type: path, host: h, protocol: icmp, port: 40000}\n")
    assert len(problems) == 1
    assert problems[0].startswith("site.yaml:3: targets[0].port: port is used by protocol udp only")


def test_a_port_on_an_auto_or_udp_trace_is_kept() -> None:
    config = parse_config(
        "site: {id: s}\ntargets:\n"
        "  - {name: a, type: path, host: h, protocol: udp, port: 40000}\n"
        "  - {name: b, type: path, host: h, port: 40000}\n"
    )
    assert [t.port for t in config.targets] == [40000, 40000]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("target", "extra", "line"),
    [
        # 2s timeout + 2 x 500ms spacing + 30 hops x 10ms = 3.3s > 1s
        ("{name: a, type: path, host: h,\n     interval: 1s}", "", 4),
        # the timeout alone is longer than the default 60s interval
        ("{name: a, type: path, host: h, timeout: 70s}", "", 3),
        # the site default timeout counts too
        ("{name: a, type: path, host: h, interval: 5s}", "defaults: {timeout: 5s}\n", 4),
    ],
)
def test_a_trace_interval_shorter_than_a_trace_is_refused(
    target: str, extra: str, line: int
) -> None:
    problems = problems_of(f"  - {target}\n", extra)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"site.yaml:{line}: targets[0]")
    assert "shorter than one trace may take" in problems[0]


def test_a_trace_that_fits_its_interval_is_accepted() -> None:
    config = parse_config(
        "site: {id: s}\ntargets:\n"
        "  - {name: a, type: path, host: h, interval: 4s}\n"  # 3.3s worst case
        "  - {name: b, type: path, host: h, interval: 1s, timeout: 300ms,\n"
        "     spacing: 100ms, max_hops: 8}\n"
    )
    assert len(config.targets) == 2


def test_config_model_validate_applies_the_same_trace_check() -> None:
    with pytest.raises(ValueError, match="shorter than one trace may take"):
        Config.model_validate(
            {
                "site": {"id": "s"},
                "targets": [{"name": "a", "type": "path", "host": "h", "interval": "1s"}],
            }
        )


# --- the probe --------------------------------------------------------------------------------


async def test_a_bracketed_ipv6_literal_is_traced_like_the_bare_one() -> None:
    result = await PathProbe("[::1]", protocol="udp", rounds=1).run(2.0)
    assert result.success, result
    assert result.details["address"] == "::1"


async def test_host_and_port_is_a_name_that_does_not_resolve_not_an_ipv6_address() -> None:
    result = await PathProbe("127.0.0.1:80", protocol="udp", rounds=1).run(2.0)
    assert not result.success
    assert result.error == "dns"
    assert "hops" not in result.details  # nothing was traced: no made-up silent hop 1


# --- the monitor: reloads and failed traces ---------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_of(targets: list[dict[str, Any]], **site: str) -> Config:
    return Config.model_validate(
        {
            "site": {"id": "lab", "timezone": "UTC", **site},
            "link": {"fail_after": 1, "recover_after": 1},
            "targets": targets,
        }
    )


@contextlib.asynccontextmanager
async def monitoring(config: Config) -> AsyncIterator[tuple[Monitor, SiteFault, CollectorRegistry]]:
    registry = CollectorRegistry()
    clock = SystemClock()
    monitor = Monitor(
        config,
        clock=clock,
        schedule=PeakSchedule.from_config(config),
        metrics=MonitorMetrics(registry, config.site.id, "test"),
    )
    site_fault = SiteFault(lambda: monitor.targets, clock.now)
    monitor.add_listener(site_fault.refresh)
    registry.register(CityCollector(lambda: monitor.config, lambda: monitor.targets, site_fault))
    try:
        async with asyncio.TaskGroup() as tg:
            monitor.start(tg)
            yield monitor, site_fault, registry
            for rt in monitor.targets.values():
                assert rt.task is not None
                rt.task.cancel()
    finally:
        await close_shared_sessions()  # the http probes' pooled sessions


async def wait_for(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    async def ready() -> bool:
        return check()

    await eventually(ready, timeout, what, interval=0.05)


async def test_a_reload_that_only_changes_a_role_keeps_the_link_state_and_moves_the_fault() -> None:
    edge = {"name": "edge", "type": "tcp", "host": "127.0.0.1", "port": closed_port()}
    edge["interval"] = "200ms"
    async with monitoring(config_of([edge])) as (monitor, site_fault, registry):
        await wait_for(lambda: monitor.states()["edge"] == "down", "edge down")
        assert site_fault.status.verdict.fault.value == "service"
        before = monitor.targets["edge"]
        since, rounds = before.status.since, before.rounds

        diff = monitor.reload(config_of([edge | {"role": "isp"}]))
        site_fault.refresh()  # what the daemon does after a reload

        # No probe ran in between (no await): the state is the one the target had.
        after = monitor.targets["edge"]
        assert (after.status.state.value, after.status.since) == ("down", since)
        assert after.spec.role == "isp"
        assert after.rounds == rounds
        assert diff["changed"] == []
        assert diff["kept"] == ["edge"]
        assert site_fault.status.verdict.fault.value == "isp"
        role = registry.get_sample_value(
            "netwatch_target_info", {"site": "lab", "target": "edge", "type": "tcp", "role": "isp"}
        )
        assert role == 1.0
        # ...and the same probe loop carries on.
        await wait_for(lambda: after.rounds > rounds, "another round")
        assert before.task is after.task
        assert after.task is not None
        assert not after.task.done()


async def test_a_trace_that_cannot_start_still_exports_not_reached() -> None:
    trace = {"name": "trace", "type": "path", "host": UNRESOLVABLE, "protocol": "udp"}
    trace |= {"interval": "2s", "timeout": "300ms", "rounds": 1, "max_hops": 4}
    async with monitoring(config_of([trace])) as (monitor, _, registry):
        await wait_for(lambda: monitor.targets["trace"].last is not None, "the first trace")
        last = monitor.targets["trace"].last
        assert last is not None
        assert last.error == "dns"
        key = {"site": "lab", "target": "trace"}
        assert registry.get_sample_value("netwatch_path_reached", key) == 0.0
        assert registry.get_sample_value("netwatch_path_hops", key) == 0.0
        assert registry.get_sample_value("netwatch_path_last_hop", key) == 0.0


# --- the daemon: MQTT status after a reload ---------------------------------------------------


async def test_a_reload_that_changes_the_site_labels_republishes_the_mqtt_status(
    tmp_path: Path,
) -> None:
    prefix = f"netwatch/edges-{free_tcp_port()}"
    config: dict[str, Any] = {
        "site": {"id": "s1", "timezone": "UTC", "district": "Quận 1", "isp": "VNPT"},
        "defaults": {"interval": "500ms", "timeout": "300ms"},
        "metrics": {"listen": f"127.0.0.1:{free_tcp_port()}"},
        "targets": [{"name": "api", "type": "tcp", "host": "127.0.0.1", "port": closed_port()}],
    }
    topic = f"{prefix}/s1/status"
    async with run_mosquitto(tmp_path) as broker:
        config["mqtt"] = {"url": broker.url, "prefix": prefix}
        async with run_daemon(tmp_path, config) as daemon, watch(broker, topic) as sub:
            first = await sub.wait_for(
                lambda: (sub.latest(topic) or {}).get("online") and sub.latest(topic), 20, "online"
            )
            assert (first["district"], first["isp"]) == ("Quận 1", "VNPT")
            config["site"] |= {"district": "Quận 3", "isp": "Viettel"}
            write_config(tmp_path / "netwatch.yaml", config)
            daemon.signal(signal.SIGHUP)
            moved = await sub.wait_for(
                lambda: (sub.latest(topic) or {}).get("district") == "Quận 3" and sub.latest(topic),
                20,
                "the status with the new district",
            )
            assert (moved["online"], moved["isp"]) == (True, "Viettel")
            key = ("netwatch_site_info", (("district", "Quận 3"), ("isp", "Viettel")))
            labels = (("name", ""), ("site", "s1"), ("uplink", ""))
            key = (key[0], tuple(sorted(key[1] + labels)))
            assert (await daemon.metrics()).get(key) == 1.0


# --- netwatch status --------------------------------------------------------------------------


def rendered(data: dict[str, Any]) -> str:
    console = Console(width=80, record=True, color_system=None)
    render_status(data, console)
    return console.export_text()


def test_status_on_an_80_column_terminal_shows_when_each_state_began() -> None:
    tz = ZoneInfo("Asia/Ho_Chi_Minh")
    now = datetime.now(tz)
    today = now.replace(microsecond=0) - timedelta(minutes=1)
    if today.date() != now.date():  # a minute after midnight: keep it on today's date
        today = now.replace(microsecond=0)
    earlier = today - timedelta(days=3)
    data = {
        "site": {"id": "s1", "timezone": "Asia/Ho_Chi_Minh"},
        "version": "0.1.0",
        "targets": [
            {"name": "a-long-target-name", "type": "http", "role": "service", "state": "up"}
            | {"since": today.astimezone(UTC).isoformat()},
            {"name": "gw", "type": "icmp", "role": "gateway", "state": "down"}
            | {"since": earlier.astimezone(UTC).isoformat()},
        ],
    }
    text = rendered(data)
    assert today.strftime("%H:%M:%S") in text  # in the site's time, not UTC
    assert earlier.strftime("%m-%d %H:%M") in text
    assert "…" not in text


def test_status_says_one_hop_not_one_hops() -> None:
    path = {"reached": True, "last_hop": 1, "loss_from": None}
    path["hops"] = [{"hop": 1, "address": "127.0.0.1", "loss": 0.0, "rtt_ms": 0.1}]
    data = {"site": {"id": "s1"}, "version": "0.1.0"}
    data["targets"] = [{"name": "p", "type": "path", "state": "up", "path": path}]
    assert "path p: reached in 1 hop  127.0.0.1" in rendered(data)


def test_status_with_a_url_that_is_not_http_is_a_usage_error() -> None:
    done = netwatch("status", "--url", "127.0.0.1:9108")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "netwatch: error: --url '127.0.0.1:9108': expected the daemon's http://HOST:PORT"
    )


def test_an_unquoted_ipv6_host_in_a_flow_mapping_gets_a_hint() -> None:
    problems = problems_of("  - {name: a, type: path, host: ::1}\n")
    assert problems == [
        "site.yaml:3: invalid YAML: expected the node content, but found ':' "
        '(quote values that start with a colon, such as host: "::1")'
    ]


def test_check_config_counts_one_target_in_the_singular(tmp_path: Path) -> None:
    config = tmp_path / "one.yaml"
    config.write_text("site: {id: s}\ntargets:\n  - {name: p, type: path, host: '::1'}\n")
    done = netwatch("check-config", str(config))
    assert (done.returncode, done.stdout.strip()) == (0, f"{config}: ok (1 target)")


async def test_a_target_removed_by_a_reload_leaves_no_retained_link_state(tmp_path: Path) -> None:
    prefix = f"netwatch/edges-{free_tcp_port()}"
    down = {"type": "tcp", "host": "127.0.0.1", "port": closed_port()}
    config: dict[str, Any] = {
        "site": {"id": "s1", "timezone": "UTC"},
        "defaults": {"interval": "300ms", "timeout": "300ms"},
        "link": {"fail_after": 1},
        "metrics": {"listen": f"127.0.0.1:{free_tcp_port()}"},
        "targets": [{"name": "gone", **down}, {"name": "kept", **down}],
    }
    links, alerts = f"{prefix}/s1/link", f"{prefix}/s1/alerts"
    async with run_mosquitto(tmp_path) as broker:
        config["mqtt"] = {"url": broker.url, "prefix": prefix}
        async with run_daemon(tmp_path, config) as daemon, watch(broker, f"{prefix}/#") as sub:
            for name in ("gone", "kept"):
                await sub.wait_for(
                    lambda n=name: (sub.latest(f"{links}/{n}") or {}).get("state") == "down",
                    20,
                    f"{name} down",
                )
            config["targets"] = config["targets"][1:]
            write_config(tmp_path / "netwatch.yaml", config)
            daemon.signal(signal.SIGHUP)
            # An empty retained message is how MQTT deletes a retained state.
            await sub.wait_for(lambda: sub.latest(f"{links}/gone") == b"", 20, "gone cleared")
            # Its LinkDown page is closed too: nothing else would ever resolve it.
            resolved = await sub.wait_for(
                lambda: [
                    m.payload
                    for m in sub.on(alerts)
                    if (m.payload["target"], m.payload["status"]) == ("gone", "resolved")
                ],
                20,
                "LinkDown on gone resolved",
            )
            assert [a["alert"] for a in resolved] == ["LinkDown"]
            assert not any(
                (m.payload["target"], m.payload["status"]) == ("kept", "resolved")
                for m in sub.on(alerts)
            )
        async with watch(broker, f"{links}/#") as fresh:
            await fresh.wait_for(lambda: fresh.latest(f"{links}/kept"), 20, "kept, retained")
            await asyncio.sleep(0.5)  # retained messages arrive together right after subscribing
            assert fresh.on(f"{links}/gone") == []


async def test_the_first_scrape_already_has_exactly_one_fault_domain_at_one(
    tmp_path: Path,
) -> None:
    # Failing targets need fail_after (3) rounds 60s apart to leave unknown: none has yet.
    slow = {"type": "tcp", "host": "127.0.0.1", "port": closed_port(), "interval": "60s"}
    config: dict[str, Any] = {
        "site": {"id": "s1", "timezone": "UTC"},
        "metrics": {"listen": f"127.0.0.1:{free_tcp_port()}"},
        "targets": [{"name": "gw", "role": "gateway", **slow}, {"name": "api", **slow}],
    }
    async with run_daemon(tmp_path, config) as daemon:
        metrics = await daemon.metrics()
        states = {
            dict(k[1])["target"]: v
            for k, v in metrics.items()
            if k[0] == "netwatch_link_state" and dict(k[1])["state"] == "unknown"
        }
        assert states == {"gw": 1.0, "api": 1.0}  # the scrape came before any verdict
        fault = {
            dict(k[1])["domain"]: v for k, v in metrics.items() if k[0] == "netwatch_site_fault"
        }
        assert fault == {"none": 1.0, "lan": 0.0, "isp": 0.0, "core": 0.0, "service": 0.0}


def test_status_of_a_site_without_a_proxy_shows_its_mode() -> None:
    data: dict[str, Any] = {"site": {"id": "s1"}, "version": "0.1.0"}
    data["mode"] = {"mode": "offline", "reason": "guard down"}
    data["targets"] = [{"name": "api", "type": "tcp", "state": "down"}]
    assert "mode offline (guard down)" in rendered(data)


def _ping_sockets_allowed() -> bool:
    low, high = Path("/proc/sys/net/ipv4/ping_group_range").read_text().split()
    return int(low) <= os.getgid() <= int(high)


@pytest.mark.skipif(_ping_sockets_allowed(), reason="unprivileged ICMP is allowed here")
async def test_a_probe_the_host_may_not_send_does_not_name_a_fault_domain() -> None:
    # privileged: no needs ping sockets, which net.ipv4.ping_group_range refuses here.
    gw = {"name": "gw", "type": "icmp", "host": "127.0.0.1", "count": 1, "privileged": "no"}
    api = {"name": "api", "type": "tcp", "host": "127.0.0.1", "port": closed_port()}
    targets = [gw | {"role": "gateway", "interval": "200ms"}, api | {"interval": "200ms"}]
    async with monitoring(config_of(targets)) as (monitor, site_fault, _):
        await wait_for(lambda: set(monitor.states().values()) == {"down"}, "both down")
        assert monitor.targets["gw"].last is not None
        assert monitor.targets["gw"].last.error == "permission"
        # The gateway probe cannot run: the verdict rests on what can be seen, the service.
        assert site_fault.status.verdict.fault.value == "service"


async def test_the_series_of_a_path_target_removed_by_a_reload_disappear() -> None:
    trace = {"name": "trace", "type": "path", "host": "127.0.0.1", "protocol": "udp"}
    trace |= {"interval": "1s", "timeout": "300ms", "rounds": 1, "max_hops": 4}
    api = {"name": "api", "type": "tcp", "host": "127.0.0.1", "port": closed_port()}
    key = {"site": "lab", "target": "trace"}
    async with monitoring(config_of([trace, api])) as (monitor, _, registry):
        await wait_for(
            lambda: registry.get_sample_value("netwatch_path_reached", key) == 1.0, "a trace"
        )
        assert registry.get_sample_value("netwatch_path_hop_rtt_seconds", key | {"hop": "1"})
        info = key | {"type": "path", "role": "service"}
        assert registry.get_sample_value("netwatch_target_info", info) == 1.0
        monitor.reload(config_of([api]))
        for name in ("netwatch_path_reached", "netwatch_path_hops"):
            assert registry.get_sample_value(name, key) is None, name
        assert registry.get_sample_value("netwatch_target_info", info) is None
        assert registry.get_sample_value("netwatch_path_hop_loss_ratio", key | {"hop": "1"}) is None


SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None, reason="needs root and setpriv")
def test_auto_traces_with_icmp_when_a_service_user_holds_cap_net_raw() -> None:
    # How deploy/netwatch.service runs it: a plain user with CAP_NET_RAW as ambient capability.
    assert SETPRIV is not None
    as_service = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups"]
    as_service += ["--inh-caps=+net_raw", "--ambient-caps=+net_raw"]
    argv = [*as_service, sys.executable, "-m", "netwatch", "probe", "path", "127.0.0.1", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["details"]["protocol"] == "icmp"


async def test_an_ipv4_mapped_ipv6_address_is_traced_as_ipv4() -> None:
    result = await PathProbe("::ffff:127.0.0.1", protocol="udp", rounds=1).run(2.0)
    assert result.success, result
    assert result.details["address"] == "127.0.0.1"


@pytest.fixture
async def slow_http_port() -> AsyncIterator[int]:
    """An HTTP server on loopback that answers 200 after 100 ms."""

    async def handle(_: web.Request) -> web.Response:
        await asyncio.sleep(0.1)
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


async def test_a_degraded_gateway_is_no_fault_but_the_degraded_domain(slow_http_port: int) -> None:
    gw = {"name": "gw", "type": "http", "url": f"http://127.0.0.1:{slow_http_port}/"}
    api = {"name": "api", "type": "tcp", "host": "127.0.0.1", "port": slow_http_port}
    targets = [gw | {"role": "gateway", "interval": "300ms"}, api | {"interval": "300ms"}]
    config = config_of(targets).model_copy(
        update={"link": Link(fail_after=1, recover_after=1, degraded_latency=0.05)}
    )
    async with monitoring(config) as (monitor, site_fault, registry):
        await wait_for(
            lambda: monitor.states() == {"gw": "degraded", "api": "up"}, "gw degraded, api up"
        )
        verdict = site_fault.status.verdict
        assert (verdict.fault.value, verdict.degraded.value) == ("none", "lan")
        for metric, domain in (("netwatch_site_fault", "none"), ("netwatch_site_degraded", "lan")):
            values = {
                d: registry.get_sample_value(metric, {"site": "lab", "domain": d})
                for d in ("none", "lan", "isp", "core", "service")
            }
            assert values == {d: float(d == domain) for d in values}, metric
        view = site_fault.view()
        data = {"site": {"id": "lab"}, "version": "0.1.0", "fault": view, "targets": []}
        assert "fault none since" in rendered(data)
        assert "degraded: lan" in rendered(data)
