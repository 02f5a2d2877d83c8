"""A daemon probing many ICMP targets stops on SIGTERM: a cancellation swallowed inside the
ICMP library (``asyncio.wait_for`` on Python 3.11) once left it running for ever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.servers import free_port

TARGETS = 1000


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP sockets need root")
def test_sigterm_stops_a_daemon_with_many_icmp_targets(tmp_path: Path) -> None:
    config = {
        "site": {"id": "stop"},
        "defaults": {"interval": "2s", "timeout": "1s"},
        "targets": [
            {
                "name": f"i{i}",
                "type": "icmp",
                "host": f"127.73.{i // 254}.{i % 254 + 1}",
                "count": 1,
            }
            for i in range(TARGETS)
        ],
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log = tmp_path / "site.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "netwatch", "--log-format", "json", "run", "-c", str(cfg)],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 60
        # Every target has had a round: the replies are flowing to every raw socket.
        while log.read_text().count('"new": "up"') < TARGETS:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "targets never came up"
            time.sleep(0.2)
        time.sleep(4.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
