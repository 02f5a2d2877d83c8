"""Run an MqttBridge in its own process, so a test can SIGKILL it and watch the last will.

    python tests/helpers/mqtt_bridge_proc.py URL PREFIX SITE

Publishes one link state once running; runs until killed.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from netwatch.config.schema import Mqtt
from netwatch.events import LinkChanged
from netwatch.mqtt.bridge import MqttBridge


async def main(url: str, prefix: str, site: str) -> None:
    bridge = MqttBridge(Mqtt(url=url, prefix=prefix), site, "test", CollectorRegistry())
    bridge.publish_link(
        LinkChanged(
            site, "popdb-api", "http", "unknown", "up", datetime.now(UTC), False, 12.0, 0.0, ""
        )
    )
    await bridge.run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
