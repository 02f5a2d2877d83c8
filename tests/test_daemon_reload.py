"""SIGHUP on a real ``netwatch run``: a changed target restarts on its new spec, a removed one
disappears (status and metrics), an added one starts, and an unchanged target that is down
stays down with its history (no new outage, no new transition, same ``since``)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from helpers.daemon import DaemonProcess, eventually, free_tcp_port, run_daemon, write_config

INTERVAL = 0.2
FAIL_AFTER = 2


def config(metrics_port: int, targets: list[tuple[str, int]]) -> dict[str, Any]:
    return {
        "site": {"id": "q1-reload", "timezone": "UTC"},
        "defaults": {"interval": f"{int(INTERVAL * 1000)}ms", "timeout": "300ms"},
        "targets": [
            {"name": name, "type": "tcp", "host": "127.0.0.1", "port": port}
            for name, port in targets
        ],
        "link": {"fail_after": FAIL_AFTER, "recover_after": 2},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }


async def targets(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in (await daemon.status())["targets"]}


def transitions(daemon: DaemonProcess, target: str) -> list[tuple[str, str]]:
    return [
        (e["old"], e["new"])
        for e in daemon.log_events()
        if e.get("event") == "link_state_changed" and e.get("target") == target
    ]


@pytest.mark.slow
async def test_sighup_applies_changed_removed_and_added_targets_and_keeps_a_down_one_down(
    tmp_path: Path, tcp_upstream: int
) -> None:
    dead = free_tcp_port()  # nothing listens: connections are refused
    metrics_port = free_tcp_port()
    before = [("changed", dead), ("down", dead), ("removed", tcp_upstream)]
    async with run_daemon(tmp_path, config(metrics_port, before)) as daemon:

        async def settled() -> dict[str, dict[str, Any]] | None:
            rows = await targets(daemon)
            want = {"changed": "down", "down": "down", "removed": "up"}
            return rows if {n: r["state"] for n, r in rows.items()} == want else None

        old = await eventually(settled, 15, "changed/down down and removed up")
        assert await daemon.value("netwatch_outages_total", target="down", peak="false") == 1

        after = [("changed", tcp_upstream), ("down", dead), ("added", tcp_upstream)]
        write_config(tmp_path / "netwatch.yaml", config(metrics_port, after))
        daemon.signal(signal.SIGHUP)

        async def reloaded() -> dict[str, dict[str, Any]] | None:
            rows = await targets(daemon)
            if set(rows) != {"changed", "down", "added"}:
                return None
            up = rows["changed"]["state"] == rows["added"]["state"] == "up"
            # Enough rounds of the down target since the reload that a restarted one
            # would have gone down again (fail_after) and logged it.
            seen = rows["down"]["rounds"] >= old["down"]["rounds"] + FAIL_AFTER + 2
            return rows if up and seen else None

        new = await eventually(reloaded, 15, "the reload applied")
        reload_log = next(e for e in daemon.log_events() if e.get("event") == "config_reloaded")
        assert reload_log["changed"] == ["changed"]
        assert reload_log["added"] == ["added"]
        assert reload_log["removed"] == ["removed"]
        assert reload_log["kept"] == ["down"]

        assert new["down"]["state"] == "down"
        assert new["down"]["since"] == old["down"]["since"]
        assert transitions(daemon, "down") == [("unknown", "down")]
        assert await daemon.value("netwatch_outages_total", target="down", peak="false") == 1
        assert await daemon.value("netwatch_link_up", target="down") == 0

        assert new["changed"]["probe"].endswith(f":{tcp_upstream}")
        assert transitions(daemon, "changed")[-1] == ("unknown", "up")
        assert await daemon.value("netwatch_link_up", target="changed") == 1
        assert await daemon.value("netwatch_link_up", target="added") == 1
        assert await daemon.value("netwatch_link_up", target="removed") is None
