"""The shipped Mosquitto files on real brokers, end to end: ``config/mosquitto/mosquitto.conf``,
``acl`` and ``site-bridge.conf`` as an operator installs them (only ports, paths and the
bridge's address and password changed).

- The ACL: for every account, what it may write and read arrives (the positive control)
  and what it may not is dropped. A denied publish is acknowledged and silently dropped by
  Mosquitto, so absence is asserted only once a later, allowed message published after it
  has arrived: Mosquitto routes messages one at a time, in order, so the denied one would
  have been delivered first.
- The bridge: with the WAN between the site broker and the central broker cut (a fault relay
  resetting and refusing the link), QoS 1 messages published at the site are kept and
  delivered to the central broker in order once the link returns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers.mosquitto import MOSQUITTO, MOSQUITTO_PASSWD, Broker, free_port
from helpers.mqtt_sub import Subscriber, watch
from helpers.relay import FaultRelay

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.path.exists(MOSQUITTO) and shutil.which(MOSQUITTO_PASSWD)),
        reason="mosquitto is not installed (Debian packages mosquitto, mosquitto-clients)",
    ),
]

CONFIG = Path(__file__).resolve().parent.parent / "config" / "mosquitto"
SITE = "demo-site"
OTHER = "other-site"
PASSWORD = "demo"
ACCOUNTS = ("operator", "reader", "station", SITE)
P = f"netwatch/v1/{SITE}"


def passwords(directory: Path) -> Path:
    path = directory / "passwd"
    path.write_text("")
    for account in ACCOUNTS:
        subprocess.run(
            [MOSQUITTO_PASSWD, "-b", str(path), account, PASSWORD], check=True, capture_output=True
        )
    path.chmod(0o600)
    return path


@asynccontextmanager
async def shipped_broker(tmp_path: Path, name: str, extra: str = "") -> AsyncIterator[Broker]:
    """A broker running the shipped mosquitto.conf and acl on a free loopback port."""
    workdir = tmp_path / name
    workdir.mkdir()
    port = free_port()
    broker = Broker(workdir, port, None, None, persistence=True)
    text = (CONFIG / "mosquitto.conf").read_text(encoding="utf-8")
    for old, new in (
        ("listener 1883", f"listener {port} 127.0.0.1"),
        ("/mosquitto/data/", f"{workdir}/"),
        ("/mosquitto/config/passwd", str(passwords(workdir))),
        ("/mosquitto/config/acl", str(CONFIG / "acl")),
    ):
        assert old in text, f"mosquitto.conf no longer has {old!r}"
        text = text.replace(old, new)
    # Started as root, mosquitto drops to user "mosquitto", who cannot read tmp_path.
    text += f"\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n{extra}\n"
    broker.config_path.write_text(text, encoding="utf-8")
    try:
        await broker.start()
        yield broker
    finally:
        await broker.kill()


def login(account: str) -> dict[str, str]:
    return {"username": account, "password": PASSWORD}


def marks(sub: Subscriber) -> set[tuple[str, Any]]:
    return {(m.topic, m.payload.get("m")) for m in sub.received if isinstance(m.payload, dict)}


def test_the_demo_password_file_has_every_account_of_the_acl() -> None:
    users = {line.split(":", 1)[0] for line in (CONFIG / "passwd.demo").read_text().splitlines()}
    assert users >= set(ACCOUNTS)


async def test_acl_lets_each_account_do_what_it_may_and_nothing_else(tmp_path: Path) -> None:
    async with (
        shipped_broker(tmp_path, "broker") as broker,
        watch(broker, "netwatch/v1/#", **login("operator")) as operator,
        watch(broker, "netwatch/v1/#", **login("reader")) as reader,
        watch(broker, "netwatch/v1/#", **login(SITE)) as site,
        watch(broker, "netwatch/v1/+/mode", **login("station")) as station,
    ):
        for topic in ("netwatch/v1/+/status", "netwatch/v1/+/alerts", "netwatch/v1/+/cmd/#"):
            await station.client.subscribe(topic, qos=1)
        # Each publish is acknowledged before the next: the order below is the broker's.
        steps: list[tuple[Subscriber, str, str]] = [
            (site, f"{P}/status", "site-status"),
            (site, f"{P}/link/popdb-api", "site-link"),
            (site, f"{P}/alerts", "site-alert"),
            (site, f"{P}/queue", "site-queue"),
            (site, f"netwatch/v1/{OTHER}/status", "site-forges-other"),
            (site, f"{P}/cmd/mode", "site-commands-itself"),
            (operator, f"{P}/cmd/mode", "operator-command"),
            (operator, f"netwatch/v1/{OTHER}/cmd/mode", "operator-command-other"),
            (operator, f"{P}/status", "operator-forges-status"),
            (reader, f"{P}/cmd/mode", "reader-command"),
            (reader, f"{P}/status", "reader-forges-status"),
            (station, f"{P}/mode", "station-mode"),
            (station, f"{P}/status", "station-status"),
            (site, f"{P}/mode", "end"),  # allowed, readable by all: the last message
        ]
        for client, topic, mark in steps:
            await client.publish(topic, {"m": mark})
        for sub in (operator, reader, site, station):
            await sub.wait_for(lambda s=sub: (f"{P}/mode", "end") in marks(s), 10, "the end")

    allowed_writes = {
        (f"{P}/status", "site-status"),
        (f"{P}/link/popdb-api", "site-link"),
        (f"{P}/alerts", "site-alert"),
        (f"{P}/queue", "site-queue"),
        (f"{P}/cmd/mode", "operator-command"),
        (f"netwatch/v1/{OTHER}/cmd/mode", "operator-command-other"),
        (f"{P}/mode", "end"),
    }
    # operator and reader read everything that was allowed to be written, nothing else.
    assert marks(operator) == allowed_writes
    assert marks(reader) == allowed_writes
    # A site reads its own subtree, its commands included, and no other site's.
    assert marks(site) == allowed_writes - {
        (f"netwatch/v1/{OTHER}/cmd/mode", "operator-command-other")
    }
    # A station reads mode and status only.
    assert marks(station) == {(f"{P}/status", "site-status"), (f"{P}/mode", "end")}


def bridge_config(relay: FaultRelay) -> str:
    text = (CONFIG / "site-bridge.conf").read_text(encoding="utf-8")
    for old, new in (
        ("central-mqtt.example:8883", f"127.0.0.1:{relay.port}"),
        ("remote_password CHANGE-ME", f"remote_password {PASSWORD}"),
    ):
        assert old in text, f"site-bridge.conf no longer has {old!r}"
        text = text.replace(old, new)
    text = text.replace("SITE", SITE)
    # TLS to the centre is the deployment's business; on loopback the link is plain.
    return "\n".join(line for line in text.splitlines() if not line.startswith("bridge_cafile"))


def bridge_state(sub: Subscriber) -> Any:
    return sub.latest(f"{P}/bridge")


async def test_bridge_keeps_messages_while_the_link_is_cut_and_delivers_them_in_order(
    tmp_path: Path,
) -> None:
    messages = 20
    async with (
        shipped_broker(tmp_path, "central") as central,
        FaultRelay("127.0.0.1", central.port) as relay,
        shipped_broker(tmp_path, "site", bridge_config(relay)) as site,
        watch(central, f"{P}/#", **login("operator")) as centre,
        watch(site, f"{P}/#", **login(SITE)) as local,
    ):
        await centre.wait_for(lambda: bridge_state(centre) == 1, 30, "the bridge connected")
        await local.publish(f"{P}/alerts", {"n": 0})
        await centre.wait_for(lambda: _numbers(centre) == [0], 10, "a message across")

        relay.mode = "refuse"  # the WAN goes: the link is reset, reconnects are refused
        await centre.wait_for(lambda: bridge_state(centre) == 0, 30, "the central broker's will")
        for n in range(1, messages + 1):
            await local.publish(f"{P}/alerts", {"n": n})
        # Every one is at the site broker, past its ACL, while the centre cannot have it.
        assert [m.payload["n"] for m in local.on(f"{P}/alerts")][-messages:] == list(
            range(1, messages + 1)
        )
        assert _numbers(centre) == [0]

        relay.mode = "pass"
        back = len(centre.on(f"{P}/bridge"))
        await centre.wait_for(lambda: len(centre.on(f"{P}/bridge")) > back, 60, "the bridge back")
        assert bridge_state(centre) == 1
        await centre.wait_for(
            lambda: len(_numbers(centre)) >= messages + 1, 15, "the queued messages"
        )
    numbers = _numbers(centre)
    # QoS 1 is at least once: message 0, in flight when the link was reset (its PUBACK
    # lost), may be sent again on reconnect. Those queued during the cut come once, in order.
    assert set(numbers[: numbers.index(1)]) == {0}
    assert numbers[numbers.index(1) :] == list(range(1, messages + 1))


def _numbers(sub: Subscriber) -> list[int]:
    return [m.payload["n"] for m in sub.on(f"{P}/alerts") if isinstance(m.payload, dict)]
