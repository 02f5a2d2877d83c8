"""The MQTT contract end to end: real ``netwatch run`` / ``netwatch proxy`` processes, a
private mosquitto per test, a TCP target behind a fault relay, real aiomqtt subscribers.

``tests/test_mqtt.py`` drives the bridge object directly; these tests prove the daemon wires
it up: link changes, alerts and the site mode reach the broker, the last will fires on a
crash, a broker outage is survived, and an operator command on one process switches another.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers.daemon import DaemonProcess, eventually, free_tcp_port, run_daemon
from helpers.mosquitto import Broker, run_mosquitto
from helpers.mqtt_sub import Subscriber, watch
from helpers.relay import FaultRelay
from helpers.servers import run_http_server

from netwatch import __version__

pytestmark = pytest.mark.slow

SITE = "q1-ben-nghe"
PREFIX = "netwatch/v1"
P = f"{PREFIX}/{SITE}"
TARGET = "popdb-gw"
LINK = f"{P}/link/{TARGET}"
HOLD_DOWN = 1.0
INTERVAL = 0.2
FAIL_AFTER = 2
RECOVER_AFTER = 2


@pytest.fixture
async def relay(tcp_upstream: int) -> AsyncIterator[FaultRelay]:
    async with FaultRelay("127.0.0.1", tcp_upstream) as relay:
        yield relay


def site_config(
    broker: Broker, relay: FaultRelay, *, hold_down: float = HOLD_DOWN
) -> dict[str, Any]:
    return {
        "site": {"id": SITE, "name": "UBND phường Bến Nghé", "timezone": "UTC"},
        "defaults": {"interval": f"{int(INTERVAL * 1000)}ms", "timeout": "300ms"},
        "targets": [{"name": TARGET, "type": "tcp", "host": "127.0.0.1", "port": relay.port}],
        "link": {"fail_after": FAIL_AFTER, "recover_after": RECOVER_AFTER},
        "metrics": {"listen": f"127.0.0.1:{free_tcp_port()}"},
        "mqtt": {"url": broker.url, "prefix": PREFIX},
        "notify": {"hold_down": f"{int(hold_down * 1000)}ms"},
    }


def link_state(sub: Subscriber) -> str | None:
    latest = sub.latest(LINK)
    return None if latest is None else latest["state"]


def mode_of(sub: Subscriber) -> str | None:
    latest = sub.latest(f"{P}/mode")
    return None if latest is None else latest["mode"]


def alerts(sub: Subscriber) -> list[dict[str, Any]]:
    return [m.payload for m in sub.on(f"{P}/alerts")]


async def daemon_link_state(daemon: DaemonProcess) -> str | None:
    for target in (await daemon.status())["targets"]:
        if target["name"] == TARGET:
            state: str = target["state"]
            return state
    return None


async def test_fresh_subscriber_gets_retained_status_link_and_mode(
    tmp_path: Path, relay: FaultRelay
) -> None:
    async with (
        run_mosquitto(tmp_path) as broker,
        run_daemon(tmp_path, site_config(broker, relay)) as daemon,
    ):
        await eventually(lambda: _state_is(daemon, "up"), 10, "link up in the daemon")
        # Acknowledged by the broker: status, mode, link. Everything a subscriber that comes
        # now receives was retained.
        await eventually(
            lambda: _published_at_least(daemon, 3), 10, "status, mode and link published"
        )
        expected = {f"{P}/status", LINK, f"{P}/mode"}
        marker = f"{P}/test-marker"
        async with watch(broker, f"{P}/#") as fresh:
            await fresh.wait_for(
                lambda: expected <= {m.topic for m in fresh.received} and link_state(fresh),
                10,
                "retained status, link and mode",
            )
            # Published after we subscribed: it comes after anything else the broker held.
            await fresh.publish(marker, {"marker": True})
            await fresh.wait_for(lambda: fresh.on(marker), 10, "our own marker")
        assert all(m.retain for m in fresh.received if m.topic != marker)
        assert not fresh.on(f"{P}/alerts")
        status = fresh.latest(f"{P}/status")
        assert status["online"] is True
        assert status["version"] == __version__
        assert datetime.fromisoformat(status["since"]).tzinfo is not None
        link = fresh.latest(LINK)
        assert link["state"] == "up"
        assert link["type"] == "tcp"
        assert link["peak"] is False
        assert link["latency_ms"] is not None
        datetime.fromisoformat(link["since"])
        mode = fresh.latest(f"{P}/mode")
        assert mode["mode"] == "online"
        datetime.fromisoformat(mode["since"])


async def _published_at_least(daemon: DaemonProcess, count: int) -> bool:
    published = await daemon.value("netwatch_mqtt_published_total", site=SITE)
    return published is not None and published >= count


async def _state_is(daemon: DaemonProcess, state: str) -> bool:
    return await daemon_link_state(daemon) == state


async def test_cut_link_goes_down_fires_alert_and_offline_then_resolves_after_hold_down(
    tmp_path: Path, relay: FaultRelay
) -> None:
    async with run_mosquitto(tmp_path) as broker, watch(broker, f"{P}/#") as sub:
        async with run_daemon(tmp_path, site_config(broker, relay)):
            await sub.wait_for(lambda: link_state(sub) == "up", 10, "link up")
            await sub.wait_for(lambda: mode_of(sub) == "online", 10, "mode online")

            relay.mode = "refuse"
            await sub.wait_for(lambda: link_state(sub) == "down", 10, "link down")
            await sub.wait_for(lambda: mode_of(sub) == "offline", 5, "mode offline")
            await sub.wait_for(lambda: alerts(sub), 5, "alert firing")
            down = sub.latest(LINK)
            assert down["reason"]
            assert sub.latest(f"{P}/mode")["reason"] == "guard down"
            firing = alerts(sub)[0]
            assert firing["alert"] == "LinkDown"
            assert firing["status"] == "firing"
            assert firing["target"] == TARGET
            assert firing["since"] == down["since"]
            assert firing["peak"] is False
            assert TARGET in firing["summary"]
            assert "DOWN" in firing["summary"]
            assert sub.on(f"{P}/alerts")[0].retain is False

            relay.mode = "pass"
            await sub.wait_for(lambda: link_state(sub) == "up", 10, "link back up")
            up_at = sub.on(LINK)[-1].at
            await sub.wait_for(lambda: mode_of(sub) == "online", 5, "mode back online")
            await sub.wait_for(lambda: len(alerts(sub)) == 2, HOLD_DOWN + 5, "alert resolved")
            resolved_msg = sub.on(f"{P}/alerts")[1]
            resolved = resolved_msg.payload
            assert (resolved["alert"], resolved["status"]) == ("LinkDown", "resolved")
            assert resolved["target"] == TARGET
            assert "resolved" in resolved["summary"]
            # Not before the hold-down: a link that just came back may flap again.
            assert resolved_msg.at - up_at >= HOLD_DOWN - 0.1
            resolved_since = datetime.fromisoformat(resolved["since"])
            up_since = datetime.fromisoformat(sub.latest(LINK)["since"])
            assert abs(resolved_since - up_since) < timedelta(seconds=1)
        assert [(a["alert"], a["status"]) for a in alerts(sub)] == [
            ("LinkDown", "firing"),
            ("LinkDown", "resolved"),
        ]


async def test_sigkill_makes_the_broker_publish_the_last_will(
    tmp_path: Path, relay: FaultRelay
) -> None:
    async with run_mosquitto(tmp_path) as broker, watch(broker, f"{P}/status") as sub:
        async with run_daemon(tmp_path, site_config(broker, relay)) as daemon:
            online = await sub.wait_for(
                lambda: (s := sub.latest(f"{P}/status")) and s["online"] and s, 10, "online"
            )
            daemon.signal(signal.SIGKILL)
            assert await daemon.wait_exit(5) == -signal.SIGKILL
            will = await sub.wait_for(
                lambda: (s := sub.latest(f"{P}/status")) and not s["online"] and s,
                10,
                "last will",
            )
        assert will == {
            "online": False,
            "version": __version__,
            "since": online["since"],
            "reason": "connection lost",
            # City view: the site's labels; offline it cannot tell where its fault is.
            "fault": None,
            "fault_since": None,
            "district": "",
            "isp": "",
        }
        async with watch(broker, f"{P}/status") as fresh:  # and it stays, retained
            await fresh.wait_for(lambda: fresh.received, 5, "retained status")
        assert fresh.received[0].retain
        assert fresh.received[0].payload["online"] is False


async def test_sigterm_says_offline_with_reason_shutdown(tmp_path: Path, relay: FaultRelay) -> None:
    async with run_mosquitto(tmp_path) as broker, watch(broker, f"{P}/status") as sub:
        async with run_daemon(tmp_path, site_config(broker, relay)) as daemon:
            await sub.wait_for(
                lambda: (s := sub.latest(f"{P}/status")) and s["online"], 10, "online"
            )
            daemon.signal(signal.SIGTERM)
            assert await daemon.wait_exit(5) == 0
        status = await sub.wait_for(
            lambda: (s := sub.latest(f"{P}/status")) and not s["online"] and s, 5, "offline"
        )
        assert status["reason"] == "shutdown"


async def test_broker_outage_does_not_stop_probing_and_state_is_whole_after_reconnect(
    tmp_path: Path, relay: FaultRelay, tcp_upstream: int
) -> None:
    steady = {"name": "popdb-direct", "type": "tcp", "host": "127.0.0.1", "port": tcp_upstream}
    steady_topic = f"{P}/link/popdb-direct"
    async with run_mosquitto(tmp_path) as broker:
        config = site_config(broker, relay)
        config["targets"].append(steady)
        async with run_daemon(tmp_path, config) as daemon:
            await _survive_broker_outage(broker, daemon, relay, steady_topic)


async def _survive_broker_outage(
    broker: Broker, daemon: DaemonProcess, relay: FaultRelay, steady_topic: str
) -> None:
    async with watch(broker, f"{P}/#") as before:
        await before.wait_for(
            lambda: link_state(before) == "up" and before.latest(steady_topic),
            10,
            "both links up",
        )
        first_since = (await before.wait_for(lambda: before.latest(f"{P}/status"), 5, "status"))[
            "since"
        ]

    await broker.stop()  # no persistence: every retained message is gone with it
    await eventually(
        lambda: _metric_is(daemon, "netwatch_mqtt_connected", 0), 10, "bridge disconnected"
    )
    rounds = await _rounds(daemon)
    relay.mode = "refuse"
    # Probing, link states and metrics carry on without the broker.
    await eventually(lambda: _state_is(daemon, "down"), 10, "link down, broker away")
    assert await daemon.value("netwatch_link_state", target=TARGET, state="down") == 1
    assert await daemon.value("netwatch_probe_success", target=TARGET) == 0
    assert await _rounds(daemon) >= rounds + FAIL_AFTER
    assert (await daemon.status())["mode"]["mode"] == "offline"
    assert daemon.proc.poll() is None

    await broker.start()
    await eventually(
        lambda: _metric_is(daemon, "netwatch_mqtt_connected", 1), 20, "bridge reconnected"
    )
    reconnects = await daemon.value("netwatch_mqtt_reconnects_total")
    assert reconnects is not None
    assert reconnects >= 1

    async with watch(broker, f"{P}/#") as fresh:
        await fresh.wait_for(
            lambda: (
                link_state(fresh)
                and mode_of(fresh)
                and fresh.latest(f"{P}/status")
                and fresh.latest(steady_topic)
            ),
            10,
            "retained state republished",
        )
    assert link_state(fresh) == "down"  # the change made while the broker was away
    # Unchanged during the outage, yet back on a broker that restarted blank.
    assert fresh.latest(steady_topic)["state"] == "up"
    assert mode_of(fresh) == "offline"
    status = fresh.latest(f"{P}/status")
    assert status["online"] is True
    assert status["since"] > first_since  # this connection's, not a stale copy
    assert all(m.retain for m in fresh.on(LINK))


async def _metric_is(daemon: DaemonProcess, name: str, value: float) -> bool:
    return await daemon.value(name, site=SITE) == value


async def _rounds_past(daemon: DaemonProcess, rounds: int) -> bool:
    return await _rounds(daemon) >= rounds


async def _rounds(daemon: DaemonProcess) -> int:
    for target in (await daemon.status())["targets"]:
        if target["name"] == TARGET:
            rounds: int = target["rounds"]
            return rounds
    raise AssertionError(f"{TARGET} missing from the daemon status")


@asynccontextmanager
async def popdb_api() -> AsyncIterator[str]:
    """The population database's API, healthy: ``/health`` and a readable ``/api/*``."""

    async def ok(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/health", ok)
    app.router.add_get("/api/citizens/1", ok)
    async with run_http_server(app) as url:
        yield url


@asynccontextmanager
async def run_proxy(tmp_path: Path, config: dict[str, Any]) -> AsyncIterator[str]:
    """``netwatch proxy -c`` as a process; yields its URL once its healthz answers."""
    url = f"http://{config['proxy']['listen']}"
    async with run_daemon(tmp_path, config, command="proxy", name="proxy") as proc:

        async def healthy() -> bool:
            assert proc.proc.poll() is None, proc.log_path.read_text()
            try:
                status, _ = await http_get(f"{url}/_netwatch/healthz")
            except (OSError, aiohttp.ClientError):
                return False
            return status == 200

        await eventually(healthy, 15, "proxy healthy")
        yield url
        assert proc.proc.poll() is None, "the proxy died during the test"


async def http_get(url: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(url) as resp,
    ):
        return resp.status, await resp.json(content_type=None)


async def proxy_status(url: str) -> dict[str, Any]:
    status, body = await http_get(f"{url}/_netwatch/status")
    assert status == 200
    result: dict[str, Any] = body
    return result


def proxy_mode_is(url: str, mode: str) -> Callable[[], Any]:
    async def check() -> bool:
        return (await proxy_status(url))["mode"] == mode

    return check


def proxy_guard_ok(url: str) -> Callable[[], Any]:
    async def check() -> bool:
        return (await proxy_status(url))["guard"] == {"popdb-api": "ok"}

    return check


def follower_config(site: dict[str, Any], upstream: str, tmp_path: Path) -> dict[str, Any]:
    """A stand-alone `netwatch proxy` of the same site (same broker), guarding the upstream
    with its own http probe."""
    guard = {"name": "popdb-api", "type": "http", "url": f"{upstream}/health"}
    return {
        **site,
        "targets": [guard],
        "proxy": {
            "listen": f"127.0.0.1:{free_tcp_port()}",
            "upstream": upstream,
            "guard": ["popdb-api"],
            "queue": {"path": str(tmp_path / "queue.db")},
        },
    }


async def test_operator_command_switches_a_separate_proxy_process_and_bad_ones_are_counted(
    tmp_path: Path, relay: FaultRelay
) -> None:
    async with (
        run_mosquitto(tmp_path) as broker,
        popdb_api() as upstream,
        watch(broker, f"{P}/#") as operator,
    ):
        site = site_config(broker, relay)
        proxy_config = follower_config(site, upstream, tmp_path)
        async with run_daemon(tmp_path, site) as daemon, run_proxy(tmp_path, proxy_config) as px:
            await operator.wait_for(lambda: mode_of(operator) == "online", 10, "site online")
            await operator.wait_for(
                lambda: (s := operator.latest(f"{P}/status")) and s["online"], 10, "daemon up"
            )
            await eventually(proxy_mode_is(px, "online"), 10, "proxy online")
            await eventually(proxy_guard_ok(px), 10, "the proxy's own guard probe up")
            status, _ = await http_get(f"{px}/api/citizens/1")
            assert status == 200

            await operator.publish(f"{P}/cmd/mode", {"mode": "offline"})
            await operator.wait_for(lambda: mode_of(operator) == "offline", 10, "site offline")
            assert operator.latest(f"{P}/mode")["reason"] == "operator"
            await eventually(proxy_mode_is(px, "offline"), 10, "proxy follows to offline")
            follower = await proxy_status(px)
            assert follower["remote_mode"] == "offline"
            assert follower["guard"] == {"popdb-api": "ok"}  # its own probe still says up
            status, body = await http_get(f"{px}/api/citizens/1")
            assert (status, body["error"], body["mode"]) == (503, "upstream_unavailable", "offline")

            await operator.publish(f"{P}/cmd/mode", {"mode": "auto"})
            await operator.wait_for(lambda: mode_of(operator) == "online", 10, "site online")
            await eventually(proxy_mode_is(px, "online"), 10, "proxy back online")
            assert await daemon.value("netwatch_mqtt_commands_total", outcome="applied") == 2

            mode_messages = len(operator.on(f"{P}/mode"))
            for bad in (b"not json", b'{"mode": "sideways"}', b"[]"):
                await operator.publish(f"{P}/cmd/mode", bad)
            await eventually(
                lambda: _commands(daemon, "invalid", 3), 10, "malformed commands counted"
            )
            assert daemon.proc.poll() is None
            assert (await daemon.status())["mode"]["mode"] == "online"
            assert (await proxy_status(px))["mode"] == "online"
            # A good command after the bad ones: its mode message comes after any they caused.
            await operator.publish(f"{P}/cmd/mode", {"mode": "offline"})
            await operator.wait_for(lambda: mode_of(operator) == "offline", 10, "site offline")
            assert [m.payload["mode"] for m in operator.on(f"{P}/mode")[mode_messages:]] == [
                "offline"
            ]
            assert await daemon.value("netwatch_mqtt_commands_total", outcome="applied") == 3


async def _commands(daemon: DaemonProcess, outcome: str, count: int) -> bool:
    return await daemon.value("netwatch_mqtt_commands_total", outcome=outcome) == count


async def test_flapping_link_fires_once_and_resolves_once_after_it_settles(
    tmp_path: Path, relay: FaultRelay
) -> None:
    # The alert policy: one firing per (alert, target) until the condition stays clear for
    # hold_down. Each flap's up-spell is under a second (half a toggle period plus the probe
    # rounds needed), so a 2 s hold-down must fold the whole flapping into one alert.
    hold_down = 2.0
    toggle, toggles = 0.5, 12  # ~6 s of flapping; an even count ends on "pass"
    async with run_mosquitto(tmp_path) as broker, watch(broker, f"{P}/#") as sub:
        config = site_config(broker, relay, hold_down=hold_down)
        async with run_daemon(tmp_path, config) as daemon:
            await sub.wait_for(lambda: link_state(sub) == "up", 10, "link up")
            for _ in range(toggles):
                relay.mode = "refuse" if relay.mode == "pass" else "pass"
                await asyncio.sleep(toggle)
            assert relay.mode == "pass"
            downs = await daemon.value("netwatch_link_transitions_total", target=TARGET, to="down")
            assert downs is not None
            assert downs >= 3, "the relay did not make the link flap"
            # While it flaps: exactly one firing, no resolution (each up-spell < hold_down).
            assert [a["status"] for a in alerts(sub)] == ["firing"]

            await sub.wait_for(lambda: link_state(sub) == "up", 5, "link settled up")
            await sub.wait_for(lambda: len(alerts(sub)) >= 2, hold_down + 5, "resolved")
            last_up = sub.on(LINK)[-1].at
            resolved_at = sub.on(f"{P}/alerts")[1].at
            assert resolved_at - last_up >= hold_down - 0.1
            # Quiet afterwards: nothing more is pending. The sign that it would have come:
            # the daemon's own loop ran a hold-down and more since (its probe rounds).
            rounds = await _rounds(daemon)
            await eventually(
                lambda: _rounds_past(daemon, rounds + round((hold_down + 1.5) / INTERVAL)),
                hold_down + 15,
                "a hold-down of probe rounds",
            )
        assert [(a["alert"], a["status"]) for a in alerts(sub)] == [
            ("LinkDown", "firing"),
            ("LinkDown", "resolved"),
        ]


async def test_proxy_ignores_the_retained_mode_of_a_dead_daemon_and_follows_it_once_back(
    tmp_path: Path, relay: FaultRelay
) -> None:
    async with (
        run_mosquitto(tmp_path) as broker,
        popdb_api() as upstream,
        watch(broker, f"{P}/#") as sub,
    ):
        site = site_config(broker, relay)
        proxy_config = follower_config(site, upstream, tmp_path)
        relay.mode = "refuse"
        async with run_daemon(tmp_path, site, name="first") as daemon:
            await sub.wait_for(lambda: mode_of(sub) == "offline", 10, "site offline")
            daemon.signal(signal.SIGKILL)
            await daemon.wait_exit(5)
        await sub.wait_for(
            lambda: (s := sub.latest(f"{P}/status")) and not s["online"], 10, "last will"
        )
        # The broker now holds a dead daemon's last word: status offline, mode offline.
        async with run_proxy(tmp_path, proxy_config) as px:
            await eventually(proxy_guard_ok(px), 10, "the proxy's own guard probe up")
            await asyncio.sleep(1.0)  # the follower has long had both retained messages
            status = await proxy_status(px)
            assert (status["mode"], status["remote_mode"]) == ("online", None)

            # Back, and still cut off: the proxy follows the live daemon again.
            async with run_daemon(tmp_path, site, name="second"):
                await eventually(proxy_mode_is(px, "offline"), 10, "proxy follows to offline")
                status = await proxy_status(px)
                assert (status["reason"], status["remote_mode"]) == (
                    "site daemon offline",
                    "offline",
                )
