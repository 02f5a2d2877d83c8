"""The site's half of the city view: site labels, target roles, and the fault verdict as a
real ``netwatch run`` exports it (``/metrics``, ``/api/v1/status``, ``netwatch status``,
MQTT ``status``) while loopback services behind fault relays go away and come back.

The verdict table itself is ``test_fault.py``; multi-hop paths are ``test_path_netns.py``.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from helpers.daemon import DaemonProcess, eventually, free_tcp_port, run_daemon, write_config
from helpers.mosquitto import run_mosquitto
from helpers.mqtt_sub import watch
from helpers.relay import FaultRelay

from netwatch.config.schema import parse_config
from netwatch.errors import ConfigError

SITE = "q1-ben-nghe"
LAYERS = {"lan-gw": "gateway", "isp-edge": "isp", "core-gw": "core", "popdb-api": None}


def test_a_config_without_city_keys_stays_valid_with_neutral_defaults() -> None:
    config = parse_config(
        "site: {id: s1, name: Ward 1}\n"
        "targets:\n"
        "  - {name: api, type: tcp, host: 127.0.0.1, port: 443}\n"
        "  - {name: gw, type: icmp, host: 127.0.0.1}\n"
    )
    assert (config.site.district, config.site.isp, config.site.uplink) == ("", "", "")
    assert [t.role for t in config.targets] == ["service", "service"]


def test_city_keys_are_read() -> None:
    config = parse_config(
        'site: {id: s1, district: "Quận 1", isp: VNPT, uplink: fiber}\n'
        "targets:\n"
        "  - {name: gw, type: icmp, host: 192.0.2.1, role: gateway}\n"
        "  - {name: trace, type: path, host: popdb.example}\n"
    )
    assert (config.site.district, config.site.isp, config.site.uplink) == (
        "Quận 1",
        "VNPT",
        "fiber",
    )
    gw, trace = config.targets
    assert gw.role == "gateway"
    assert trace.type == "path"
    assert config.interval_of(trace) == 60.0  # its own slower default
    assert (trace.rounds, trace.max_hops, trace.protocol) == (3, 30, "auto")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{name: a, type: tcp, host: h, port: 1, role: router}", "targets[0].role:"),
        ("{name: a, type: path, host: h, max_hops: 99}", "targets[0].max_hops:"),
        ("{name: a, type: path, host: h, protocol: tcp}", "targets[0].protocol:"),
    ],
)
def test_bad_city_values_are_one_located_line(line: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(f"site: {{id: s}}\ntargets:\n  - {line}\n", "site.yaml")
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(f"site.yaml:3: {expected}")


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture
async def relays(tcp_upstream: int) -> AsyncIterator[dict[str, FaultRelay]]:
    """One loopback service per layer, each behind its own relay."""
    async with AsyncExitStack() as stack:
        yield {
            name: await stack.enter_async_context(FaultRelay("127.0.0.1", tcp_upstream))
            for name in LAYERS
        }


def site_config(
    relays: dict[str, FaultRelay], mqtt: dict[str, str] | None = None
) -> dict[str, Any]:
    targets = []
    for name, role in LAYERS.items():
        target: dict[str, Any] = {"name": name, "type": "tcp", "host": "127.0.0.1"}
        target["port"] = relays[name].port
        if role is not None:
            target["role"] = role
        targets.append(target)
    targets.append(
        {"name": "popdb-path", "type": "path", "host": "127.0.0.1", "interval": "1s"}
        | {"rounds": 2, "spacing": "50ms", "protocol": "udp"}
    )
    config: dict[str, Any] = {
        "site": {"id": SITE, "name": "UBND phường Bến Nghé", "timezone": "UTC"}
        | {"district": "Quận 1", "isp": "VNPT", "uplink": "fiber"},
        "defaults": {"interval": "200ms", "timeout": "300ms"},
        "link": {"fail_after": 2, "recover_after": 2},
        "metrics": {"listen": f"127.0.0.1:{free_tcp_port()}"},
        "targets": targets,
    }
    if mqtt is not None:
        config["mqtt"] = mqtt
    return config


async def fault_is(daemon: DaemonProcess, domain: str) -> bool:
    values = {
        d: await daemon.value("netwatch_site_fault", site=SITE, domain=d)
        for d in ("none", "lan", "isp", "core", "service")
    }
    return values[domain] == 1.0 and sum(v or 0.0 for v in values.values()) == 1.0


def netwatch_status(daemon: DaemonProcess) -> str:
    assert daemon.metrics_url is not None
    done = subprocess.run(
        [sys.executable, "-m", "netwatch", "status", "--url", daemon.metrics_url],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# (relays refusing connections, the fault domain the site must name), in order.
SCENARIO = [
    (set(), "none"),
    ({"popdb-api"}, "service"),
    ({"popdb-api", "core-gw"}, "core"),
    ({"popdb-api", "core-gw", "isp-edge"}, "isp"),
    ({"popdb-api", "isp-edge"}, "isp"),  # the core came back: still the ISP
    ({"popdb-api", "isp-edge", "lan-gw"}, "lan"),
    (set(), "none"),
]


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_site_fault_follows_the_innermost_failing_layer(
    tmp_path: Path, relays: dict[str, FaultRelay]
) -> None:
    prefix = f"netwatch/city-{free_tcp_port()}"  # unique per test
    topic = f"{prefix}/{SITE}/status"
    async with (
        run_mosquitto(tmp_path) as broker,
        run_daemon(tmp_path, site_config(relays, {"url": broker.url, "prefix": prefix})) as daemon,
    ):
        # Labels and roles, exported once.
        await eventually(lambda: fault_is(daemon, "none"), 20, "fault none at start")
        labels = {"site": SITE, "name": "UBND phường Bến Nghé", "district": "Quận 1"}
        labels |= {"isp": "VNPT", "uplink": "fiber"}
        key = ("netwatch_site_info", tuple(sorted(labels.items())))
        assert (await daemon.metrics()).get(key) == 1.0
        for name, role in LAYERS.items():
            value = await daemon.value(
                "netwatch_target_info", site=SITE, target=name, type="tcp", role=role or "service"
            )
            assert value == 1.0, name

        async with watch(broker, topic) as sub:
            for refused, domain in SCENARIO:
                for name, relay in relays.items():
                    relay.set_mode("refuse" if name in refused else "pass")
                await eventually(lambda d=domain: fault_is(daemon, d), 20, f"fault {domain}")
                published = await sub.wait_for(
                    lambda d=domain: (
                        (sub.latest(topic) or {}).get("fault") == d and sub.latest(topic)
                    ),
                    20,
                    f"MQTT status with fault {domain}",
                )
                assert published["online"] is True
                assert published["fault_since"] is not None
                assert (published["district"], published["isp"]) == ("Quận 1", "VNPT")
                view = (await daemon.status())["fault"]
                assert view["domain"] == domain
                if domain == "isp":
                    assert view["culprits"] == ["isp-edge"]
                    shown = await asyncio.to_thread(netwatch_status, daemon)
                    assert "fault isp since" in shown
                    assert "isp layer down: isp-edge" in shown
                    assert "district Quận 1 · isp VNPT · uplink fiber" in shown
        # The loopback trace ran meanwhile: one hop, reached, address in the status only.
        assert await daemon.value("netwatch_path_hops", site=SITE, target="popdb-path") == 1.0
        assert await daemon.value("netwatch_path_reached", site=SITE, target="popdb-path") == 1.0
        path = next(t for t in (await daemon.status())["targets"] if t["name"] == "popdb-path")
        assert path["path"]["hops"][0]["address"] == "127.0.0.1"


@pytest.mark.slow
async def test_a_reload_that_assigns_roles_moves_the_fault(
    tmp_path: Path, relays: dict[str, FaultRelay]
) -> None:
    config = site_config(relays)
    roles = {t["name"]: t.pop("role", None) for t in config["targets"]}
    relays["isp-edge"].set_mode("refuse")
    async with run_daemon(tmp_path, config) as daemon:
        # Without roles every target is a service: the ISP edge down is a service fault.
        await eventually(lambda: fault_is(daemon, "service"), 20, "fault service")
        for target in config["targets"]:
            if roles[target["name"]] is not None:
                target["role"] = roles[target["name"]]
        write_config(tmp_path / "netwatch.yaml", config)
        daemon.signal(signal.SIGHUP)
        await eventually(lambda: fault_is(daemon, "isp"), 20, "fault isp after the reload")
        role = await daemon.value("netwatch_target_info", target="isp-edge", role="isp")
        assert role == 1.0
