"""The MQTT bridge against a real mosquitto (own instance per test, never the system one)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import trustme
from helpers.mosquitto import Broker, BrokerTls, run_mosquitto
from prometheus_client import CollectorRegistry

from netwatch.alerting.alerts import AlertEvent
from netwatch.config.schema import Mqtt
from netwatch.events import LinkChanged, ModeChanged, QueueStats
from netwatch.mqtt.bridge import MqttBridge, client_options
from netwatch.mqtt.follower import MqttModeFollower

PREFIX = "nw/v1"
SITE = "q1-ben-nghe"
P = f"{PREFIX}/{SITE}"
T0 = datetime(2026, 11, 23, 1, 0, tzinfo=UTC)


def link(target: str, state: str = "down") -> LinkChanged:
    return LinkChanged(SITE, target, "http", "up", state, T0, True, 812.5, 0.25, "timeout")


def alert(n: int) -> AlertEvent:
    return AlertEvent("LinkDown", "firing", f"t{n}", T0, False, f"alert {n}", f"cảnh báo {n}", SITE)


def settings(broker: Broker, **extra: Any) -> Mqtt:
    return Mqtt(url=broker.url, prefix=PREFIX, **extra)


def make_bridge(
    broker: Broker, *, on_command: Callable[[str], None] | None = None, **extra: Any
) -> tuple[MqttBridge, CollectorRegistry]:
    registry = CollectorRegistry()
    bridge = MqttBridge(
        settings(broker, **extra),
        SITE,
        "1.2.3",
        registry,
        on_command,
        backoff_initial=0.05,
        backoff_cap=0.3,
    )
    return bridge, registry


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, {"site": SITE, **labels}) or 0.0


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def running(runner: MqttBridge | MqttModeFollower) -> AsyncIterator[asyncio.Task[None]]:
    async with asyncio.TaskGroup() as tasks:
        task = tasks.create_task(runner.run())
        try:
            yield task
        finally:
            task.cancel()


@asynccontextmanager
async def subscriber(
    broker: Broker, topic: str = f"{P}/#", **options: Any
) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        **client_options(settings(broker, **options.pop("mqtt", {}))), **options
    ) as client:
        await client.subscribe(topic, qos=1)
        yield client


async def receive(
    client: aiomqtt.Client,
    until: Callable[[dict[str, aiomqtt.Message]], bool],
    timeout: float = 10.0,
) -> dict[str, aiomqtt.Message]:
    """Latest message per topic, collected until ``until`` holds."""
    seen: dict[str, aiomqtt.Message] = {}
    async with asyncio.timeout(timeout):
        async for message in client.messages:
            seen[str(message.topic)] = message
            if until(seen):
                return seen
    raise AssertionError("unreachable")


def body(message: aiomqtt.Message) -> Any:
    assert isinstance(message.payload, bytes)
    return json.loads(message.payload)


async def test_retained_state_reaches_a_fresh_subscriber_but_alerts_do_not(tmp_path: Path) -> None:
    async with run_mosquitto(tmp_path) as broker:
        bridge, registry = make_bridge(broker)
        async with running(bridge), subscriber(broker, f"{P}/alerts") as live:
            bridge.publish_link(link("popdb-api"))
            bridge.publish_mode(ModeChanged(SITE, "offline", "popdb-api down", T0))
            # From another thread too: the update is handed over to the bridge's loop.
            stats = QueueStats(SITE, depth=7, oldest_age_s=12.345, dead=1)
            await asyncio.to_thread(bridge.publish_queue, stats)
            bridge.publish_alert(alert(1))
            got = await receive(live, lambda seen: f"{P}/alerts" in seen)
            assert body(got[f"{P}/alerts"])["target"] == "t1"
            assert got[f"{P}/alerts"].retain is False
            assert got[f"{P}/alerts"].qos == 1
            await eventually(lambda: metric(registry, "netwatch_mqtt_published_total") >= 5)

            expected = {f"{P}/status", f"{P}/link/popdb-api", f"{P}/mode", f"{P}/queue"}
            async with subscriber(broker) as fresh:
                got = await receive(fresh, lambda seen: expected <= seen.keys())
                assert f"{P}/alerts" not in got
            assert all(got[t].retain for t in expected)
            status = body(got[f"{P}/status"])
            assert status["online"] is True
            assert status["version"] == "1.2.3"
            datetime.fromisoformat(status["since"])
            assert body(got[f"{P}/link/popdb-api"]) == {
                "state": "down",
                "since": "2026-11-23T01:00:00+00:00",
                "latency_ms": 812.5,
                "loss": 0.25,
                "peak": True,
                "type": "http",
                "reason": "timeout",
            }
            assert body(got[f"{P}/mode"]) == {
                "mode": "offline",
                "reason": "popdb-api down",
                "since": "2026-11-23T01:00:00+00:00",
            }
            assert body(got[f"{P}/queue"]) == {"depth": 7, "oldest_age_s": 12.3, "dead": 1}
            assert metric(registry, "netwatch_mqtt_connected") == 1


async def test_clean_stop_publishes_retained_offline_status(tmp_path: Path) -> None:
    async with run_mosquitto(tmp_path) as broker:
        bridge, registry = make_bridge(broker)
        async with running(bridge):
            await eventually(lambda: bridge.connected)
        assert metric(registry, "netwatch_mqtt_connected") == 0
        async with subscriber(broker, f"{P}/status") as fresh:
            got = await receive(fresh, bool)
        status = body(got[f"{P}/status"])
        assert (status["online"], status["reason"]) == (False, "shutdown")


async def test_last_will_marks_the_site_offline_when_the_bridge_is_sigkilled(
    tmp_path: Path,
) -> None:
    script = Path(__file__).parent / "helpers" / "mqtt_bridge_proc.py"
    async with run_mosquitto(tmp_path) as broker, subscriber(broker, f"{P}/status") as watcher:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(script), broker.url, PREFIX, SITE
        )
        try:
            got = await receive(watcher, lambda seen: body(seen[f"{P}/status"])["online"] is True)
            online = body(got[f"{P}/status"])
            proc.send_signal(signal.SIGKILL)
            got = await receive(watcher, lambda seen: body(seen[f"{P}/status"])["online"] is False)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        will = body(got[f"{P}/status"])
        assert will == {
            "online": False,
            "version": "test",
            "since": online["since"],
            "reason": "connection lost",
            # City view: offline, the site cannot tell where its fault is.
            "fault": None,
            "fault_since": None,
            "district": "",
            "isp": "",
        }
        async with subscriber(broker, f"{P}/status") as fresh:  # and it is retained
            got = await receive(fresh, bool)
        assert body(got[f"{P}/status"])["online"] is False


async def test_broker_restart_without_persistence_gets_all_retained_state_back(
    tmp_path: Path,
) -> None:
    async with run_mosquitto(tmp_path) as broker:
        bridge, registry = make_bridge(broker)
        async with running(bridge):
            bridge.publish_link(link("popdb-api"))
            bridge.publish_mode(ModeChanged(SITE, "offline", "popdb-api down", T0))
            await eventually(lambda: metric(registry, "netwatch_mqtt_published_total") >= 3)

            await broker.stop()
            await eventually(lambda: not bridge.connected)
            bridge.publish_link(link("popdb-api", "up"))  # changed while the broker was away
            bridge.publish_queue(QueueStats(SITE, depth=0, oldest_age_s=0.0, dead=0))
            await broker.start()  # a blank broker: everything retained is gone

            await eventually(lambda: bridge.connected)
            expected = {f"{P}/status", f"{P}/link/popdb-api", f"{P}/mode", f"{P}/queue"}
            async with subscriber(broker) as fresh:
                got = await receive(fresh, lambda seen: expected <= seen.keys())
            assert body(got[f"{P}/link/popdb-api"])["state"] == "up"
            assert body(got[f"{P}/mode"])["mode"] == "offline"
            assert body(got[f"{P}/status"])["online"] is True
            assert metric(registry, "netwatch_mqtt_reconnects_total") >= 1
            assert metric(registry, "netwatch_mqtt_connected") == 1


async def test_alerts_raised_while_the_broker_is_down_are_bounded_then_delivered(
    tmp_path: Path,
) -> None:
    async with run_mosquitto(tmp_path, persistence=True) as broker:
        bridge, registry = make_bridge(broker, alert_buffer=3)
        # A persistent subscriber: the broker queues QoS 1 alerts for it while it is away.
        watcher_options: dict[str, Any] = {"identifier": "watcher", "clean_session": False}
        async with subscriber(broker, f"{P}/alerts", **watcher_options):
            pass
        async with running(bridge):
            await eventually(lambda: bridge.connected)
            await broker.stop()
            await eventually(lambda: not bridge.connected)
            for n in range(5):
                bridge.publish_alert(alert(n))
            assert metric(registry, "netwatch_mqtt_dropped_total", kind="alert") == 2
            await broker.start()
            async with subscriber(broker, f"{P}/alerts", **watcher_options) as watcher:
                targets: list[str] = []
                async with asyncio.timeout(10):
                    async for message in watcher.messages:
                        targets.append(body(message)["target"])
                        if len(targets) == 3:
                            break
            assert targets == ["t2", "t3", "t4"]  # oldest dropped first, order kept
            assert metric(registry, "netwatch_mqtt_reconnects_total") >= 1


async def test_mode_commands_are_applied_and_malformed_ones_counted(tmp_path: Path) -> None:
    applied: list[str] = []
    async with run_mosquitto(tmp_path) as broker:
        bridge, registry = make_bridge(broker, on_command=applied.append)
        async with running(bridge), subscriber(broker, f"{P}/none") as operator:
            await eventually(lambda: bridge.connected)
            bad = [b"not json", b"\xff\xfe", b"[]", b'{"mode": "sideways"}', b'{"x": 1}', b""]
            for payload in [b'{"mode": "offline"}', *bad, b'{"mode": "auto", "by": "ops"}']:
                await operator.publish(f"{P}/cmd/mode", payload, qos=1)
            # Retained by mistake: applied now (live), but must not be replayed later.
            await operator.publish(f"{P}/cmd/mode", b'{"mode": "online"}', qos=1, retain=True)
            await eventually(lambda: len(applied) == 3)
            assert applied == ["offline", "auto", "online"]
            assert metric(registry, "netwatch_mqtt_commands_total", outcome="invalid") == 6
            assert metric(registry, "netwatch_mqtt_commands_total", outcome="applied") == 3
            assert bridge.connected

        bridge, registry = make_bridge(broker, on_command=applied.append)
        async with running(bridge):
            await eventually(
                lambda: metric(registry, "netwatch_mqtt_commands_total", outcome="invalid") == 1
            )
        assert applied == ["offline", "auto", "online"]


async def test_a_command_sent_while_the_bridge_is_away_is_applied_on_reconnect(
    tmp_path: Path,
) -> None:
    applied: list[str] = []
    async with run_mosquitto(tmp_path) as broker:
        bridge, _ = make_bridge(broker, on_command=applied.append)
        async with running(bridge):
            await eventually(lambda: bridge.connected)
        async with subscriber(broker, f"{P}/none") as operator:
            await operator.publish(f"{P}/cmd/mode", b'{"mode": "offline"}', qos=1)
        bridge, _ = make_bridge(broker, on_command=applied.append)  # same client id
        async with running(bridge):
            await eventually(lambda: applied == ["offline"])


async def test_publish_methods_never_block_or_raise_without_a_broker(tmp_path: Path) -> None:
    async with run_mosquitto(tmp_path) as broker:
        await broker.stop()
        bridge, registry = make_bridge(broker, alert_buffer=10)
        async with running(bridge) as task:
            started = time.perf_counter()
            for n in range(5_000):
                bridge.publish_link(link(f"t{n % 50}", "down" if n % 2 else "up"))
                bridge.publish_alert(alert(n))
            # Plain calls: nothing awaits the broker (a connect timeout would show here).
            assert time.perf_counter() - started < 5.0
            await eventually(lambda: metric(registry, "netwatch_mqtt_reconnects_total") >= 3)
            assert not task.done()
            assert metric(registry, "netwatch_mqtt_dropped_total", kind="alert") == 5_000 - 10


def tls_files(tmp_path: Path) -> tuple[BrokerTls, dict[str, str]]:
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("netwatch-q1")
    paths = {name: str(tmp_path / name) for name in ("ca.pem", "server.pem", "server.key")}
    paths |= {"client.pem": str(tmp_path / "client.pem"), "client.key": str(tmp_path / "c.key")}
    ca.cert_pem.write_to_path(paths["ca.pem"])
    for blob in server.cert_chain_pems:
        blob.write_to_path(paths["server.pem"], append=True)
    server.private_key_pem.write_to_path(paths["server.key"])
    client.cert_chain_pems[0].write_to_path(paths["client.pem"])
    client.private_key_pem.write_to_path(paths["client.key"])
    tls = BrokerTls(Path(paths["server.pem"]), Path(paths["server.key"]), Path(paths["ca.pem"]))
    return tls, paths


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="needs mosquitto_passwd")
async def test_mqtts_with_client_certificate_and_password(tmp_path: Path) -> None:
    tls, paths = tls_files(tmp_path)
    secure: dict[str, Any] = {
        "ca_file": paths["ca.pem"],
        "cert_file": paths["client.pem"],
        "key_file": paths["client.key"],
        "username": "netwatch",
    }
    async with run_mosquitto(tmp_path, tls=tls, passwords={"netwatch": "s3cret"}) as broker:
        assert broker.url.startswith("mqtts://")
        wrong, wrong_registry = make_bridge(broker, **secure, password="nope")
        async with running(wrong) as task:
            await eventually(lambda: metric(wrong_registry, "netwatch_mqtt_reconnects_total") >= 2)
            assert not wrong.connected
            assert not task.done()

        bridge, _ = make_bridge(broker, **secure, password="s3cret")
        async with running(bridge):
            bridge.publish_link(link("popdb-api"))
            mqtt = {**secure, "password": "s3cret"}
            async with subscriber(broker, mqtt=mqtt) as fresh:
                got = await receive(fresh, lambda seen: f"{P}/link/popdb-api" in seen)
            assert body(got[f"{P}/link/popdb-api"])["state"] == "down"


async def test_follower_tracks_the_mode_and_whether_it_can_be_trusted(tmp_path: Path) -> None:
    modes: list[tuple[str, str]] = []
    following: list[bool] = []
    async with run_mosquitto(tmp_path) as broker:
        bridge, _ = make_bridge(broker)
        registry = CollectorRegistry()
        follower = MqttModeFollower(
            settings(broker),
            SITE,
            lambda mode, reason: modes.append((mode, reason)),
            on_following=following.append,
            registry=registry,
            backoff_initial=0.05,
            backoff_cap=0.3,
        )
        async with running(follower):
            async with running(bridge):
                bridge.publish_mode(ModeChanged(SITE, "offline", "popdb-api down", T0))
                await eventually(lambda: modes == [("offline", "popdb-api down")])
                await eventually(lambda: follower.following)
                assert metric(registry, "netwatch_mqtt_follower_connected") == 1

                await broker.stop()
                await eventually(lambda: not follower.following)
                await broker.start()
                # Back: the bridge republishes, the follower resubscribes and hears it again.
                await eventually(lambda: follower.following and len(modes) >= 2)
                assert modes[-1] == ("offline", "popdb-api down")
            # The daemon stopped: the retained mode may now be stale.
            await eventually(lambda: not follower.following)
        assert following[:3] == [True, False, True]
        assert following[-1] is False
