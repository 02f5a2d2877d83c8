"""MQTT bridge latency on loopback: publish_link() -> subscriber receipt.

    .venv/bin/python bench/mqtt_latency.py [--messages 1000] [--burst 500]

Starts its own mosquitto on a free loopback port (never the system broker), runs an
MqttBridge and a subscriber in this process, and prints p50/p99/max latency of spaced link
changes, then the time for a burst of simultaneous link changes (all must arrive), with the
CPU seconds of this process (bridge + subscriber) and of the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers.mosquitto import run_mosquitto

from netwatch.config.schema import Mqtt
from netwatch.events import LinkChanged
from netwatch.mqtt.bridge import MqttBridge, client_options

SITE = "bench"
PREFIX = "netwatch/v1"


def link(target: str) -> LinkChanged:
    return LinkChanged(SITE, target, "tcp", "up", "down", datetime.now(UTC), False, 1.0, 0.0, "")


def broker_cpu(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


async def main(messages: int, burst: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        async with run_mosquitto(Path(tmp)) as broker:
            settings = Mqtt(url=broker.url, prefix=PREFIX)
            bridge = MqttBridge(settings, SITE, "bench", CollectorRegistry())
            received: dict[str, float] = {}
            arrived = asyncio.Event()
            expected = 0

            async def subscribe(client: aiomqtt.Client) -> None:
                async for message in client.messages:
                    received[str(message.topic).rsplit("/", 1)[1]] = time.perf_counter()
                    if len(received) >= expected:
                        arrived.set()

            async with (
                aiomqtt.Client(**client_options(settings)) as client,
                asyncio.TaskGroup() as tasks,
            ):
                await client.subscribe(f"{PREFIX}/{SITE}/link/#", qos=1)
                runner = tasks.create_task(bridge.run())
                receiver = tasks.create_task(subscribe(client))
                while not bridge.connected:  # noqa: ASYNC110 - a flag, polled once at start
                    await asyncio.sleep(0.01)

                cpu0, broker0 = time.process_time(), broker_cpu(broker.pid)
                sent: dict[str, float] = {}
                expected = messages
                for i in range(messages):
                    target = f"lat-{i}"
                    sent[target] = time.perf_counter()
                    bridge.publish_link(link(target))
                    await asyncio.sleep(0.002)
                await asyncio.wait_for(arrived.wait(), 30)
                latencies = [(received[t] - sent[t]) * 1000 for t in sent]
                cpu1, broker1 = time.process_time(), broker_cpu(broker.pid)
                print(f"spaced link changes: {messages}")
                print(
                    f"  latency ms  p50 {percentile(latencies, 0.5):.2f}  "
                    f"p99 {percentile(latencies, 0.99):.2f}  max {max(latencies):.2f}"
                )
                print(f"  cpu s       netwatch {cpu1 - cpu0:.2f}  broker {broker1 - broker0:.2f}")

                received.clear()
                arrived.clear()
                expected = burst
                started = time.perf_counter()
                for i in range(burst):
                    bridge.publish_link(link(f"burst-{i}"))
                await asyncio.wait_for(arrived.wait(), 30)
                elapsed = time.perf_counter() - started
                cpu2, broker2 = time.process_time(), broker_cpu(broker.pid)
                print(f"simultaneous link changes: {burst}, delivered {len(received)}")
                print(f"  all delivered in {elapsed * 1000:.0f} ms")
                print(f"  cpu s       netwatch {cpu2 - cpu1:.2f}  broker {broker2 - broker1:.2f}")
                runner.cancel()
                receiver.cancel()
            return 0 if len(received) == burst else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=500)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.messages, args.burst)))
