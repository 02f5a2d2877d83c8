"""The site daemon as a real process: link states through a fault relay, metrics scraped
over HTTP, signals."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.daemon import eventually, free_tcp_port, run_daemon, write_config
from helpers.relay import FaultRelay


def site_config(
    relay_port: int, metrics_port: int, *, peak_now: bool, extra_targets: list[Any] | None = None
) -> dict[str, Any]:
    now = datetime.now(UTC)
    if peak_now:
        start, end = now - timedelta(hours=2), now + timedelta(hours=2)
    else:
        start, end = now + timedelta(hours=2), now + timedelta(hours=3)
    return {
        "site": {"id": "q1-ben-nghe", "name": "UBND phường Bến Nghé", "timezone": "UTC"},
        "peak_hours": [
            {
                "days": ["mon-sun"],
                "start": start.strftime("%H:%M"),
                "end": end.strftime("%H:%M"),
            }
        ],
        "defaults": {"interval": "200ms", "timeout": "300ms"},
        "targets": [
            {"name": "popdb-gw", "type": "tcp", "host": "127.0.0.1", "port": relay_port},
            *(extra_targets or []),
        ],
        "link": {"fail_after": 3, "recover_after": 2},
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
    }


async def link_state(daemon: Any, target: str = "popdb-gw") -> str | None:
    for t in (await daemon.status())["targets"]:
        if t["name"] == target:
            state: str = t["state"]
            return state
    return None


@pytest.mark.parametrize("peak_now", [True, False], ids=["peak", "off_peak"])
async def test_cut_link_goes_down_and_recovers_with_outage_counted(
    tmp_path: Path, tcp_upstream: int, peak_now: bool
) -> None:
    async with FaultRelay("127.0.0.1", tcp_upstream) as relay:
        config = site_config(relay.port, free_tcp_port(), peak_now=peak_now)
        async with run_daemon(tmp_path, config) as daemon:
            await eventually(lambda: _is(daemon, "up"), 10, "link up")
            assert await daemon.value("netwatch_link_up", target="popdb-gw") == 1
            assert await daemon.value("netwatch_peak_hours") == (1 if peak_now else 0)

            relay.mode = "refuse"
            cut_at = asyncio.get_running_loop().time()
            await eventually(lambda: _is(daemon, "down"), 10, "link down")
            # 3 failed rounds at 200 ms; allow scheduling slack but not a 4th+ interval storm.
            assert asyncio.get_running_loop().time() - cut_at < 0.2 * 3 + 1.0
            peak = "true" if peak_now else "false"
            other = "false" if peak_now else "true"
            assert await daemon.value("netwatch_outages_total", target="popdb-gw", peak=peak) == 1
            assert await daemon.value("netwatch_outages_total", target="popdb-gw", peak=other) == 0
            assert await daemon.value("netwatch_link_up", target="popdb-gw") == 0
            assert await daemon.value("netwatch_link_state", target="popdb-gw", state="down") == 1
            assert await daemon.value("netwatch_probe_success", target="popdb-gw") == 0
            errors = await daemon.value("netwatch_probe_errors_total", error="refused")
            assert errors is not None
            assert errors >= 3

            await asyncio.sleep(0.5)
            relay.mode = "pass"
            await eventually(lambda: _is(daemon, "up"), 10, "link back up")
            seconds = await daemon.value(
                "netwatch_outage_seconds_total", target="popdb-gw", peak=peak
            )
            assert seconds is not None
            assert seconds >= 0.5
            assert (
                await daemon.value("netwatch_link_transitions_total", target="popdb-gw", to="down")
                == 1
            )

            changes = [e for e in daemon.log_events() if e.get("event") == "link_state_changed"]
            assert [(e["old"], e["new"]) for e in changes] == [
                ("unknown", "up"),
                ("up", "down"),
                ("down", "up"),
            ]
            assert changes[1]["peak"] is peak_now
            assert changes[1]["reason"]


async def _is(daemon: Any, state: str) -> bool:
    return await link_state(daemon) == state


async def test_sigterm_stops_cleanly_within_5s(tmp_path: Path, tcp_upstream: int) -> None:
    config = site_config(tcp_upstream, free_tcp_port(), peak_now=False)
    async with run_daemon(tmp_path, config) as daemon:
        await eventually(lambda: _is(daemon, "up"), 10, "link up")
        daemon.signal(signal.SIGTERM)
        assert await daemon.wait_exit(5.0) == 0
        events = [e.get("event") for e in daemon.log_events()]
        assert "daemon_stopped" in events


async def test_sigint_stops_cleanly(tmp_path: Path, tcp_upstream: int) -> None:
    config = site_config(tcp_upstream, free_tcp_port(), peak_now=False)
    async with run_daemon(tmp_path, config) as daemon:
        daemon.signal(signal.SIGINT)
        assert await daemon.wait_exit(5.0) == 0


async def test_sighup_reloads_keeping_state_and_rejects_invalid_config(
    tmp_path: Path, tcp_upstream: int
) -> None:
    metrics_port = free_tcp_port()
    config = site_config(tcp_upstream, metrics_port, peak_now=False)
    async with run_daemon(tmp_path, config) as daemon:
        await eventually(lambda: _is(daemon, "up"), 10, "link up")
        before = {t["name"]: t for t in (await daemon.status())["targets"]}

        extra = {"name": "popdb-alt", "type": "tcp", "host": "127.0.0.1", "port": tcp_upstream}
        write_config(
            tmp_path / "netwatch.yaml",
            site_config(tcp_upstream, metrics_port, peak_now=False, extra_targets=[extra]),
        )
        daemon.signal(signal.SIGHUP)
        await eventually(lambda: _is_named(daemon, "popdb-alt", "up"), 10, "new target up")
        after = {t["name"]: t for t in (await daemon.status())["targets"]}
        # The unchanged target kept its state and history across the reload.
        assert after["popdb-gw"]["since"] == before["popdb-gw"]["since"]
        assert after["popdb-gw"]["rounds"] >= before["popdb-gw"]["rounds"]

        (tmp_path / "netwatch.yaml").write_text("site: {id: q1}\ntargets: [{name: x}]\n")
        daemon.signal(signal.SIGHUP)
        await eventually(
            lambda: _logged(daemon, "config_reload_failed"), 10, "reload failure logged"
        )
        names = {t["name"] for t in (await daemon.status())["targets"]}
        assert names == {"popdb-gw", "popdb-alt"}
        failed = next(e for e in daemon.log_events() if e.get("event") == "config_reload_failed")
        assert any("targets[0]" in p for p in failed["problems"])
        assert daemon.proc.poll() is None


async def _is_named(daemon: Any, name: str, state: str) -> bool:
    return await link_state(daemon, name) == state


async def _logged(daemon: Any, event: str) -> bool:
    return any(e.get("event") == event for e in daemon.log_events())


async def test_status_command_renders_table(tmp_path: Path, tcp_upstream: int) -> None:
    config = site_config(tcp_upstream, free_tcp_port(), peak_now=False)
    async with run_daemon(tmp_path, config) as daemon:
        await eventually(lambda: _is(daemon, "up"), 10, "link up")
        assert daemon.metrics_url is not None
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "netwatch",
            "status",
            "--url",
            daemon.metrics_url,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        text = out.decode()
        assert "q1-ben-nghe" in text
        assert "popdb-gw" in text
        assert "up" in text


async def test_status_command_reports_unreachable_daemon_in_one_line() -> None:
    port = free_tcp_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "netwatch",
        "status",
        "--url",
        f"http://127.0.0.1:{port}",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("netwatch: error: cannot reach the daemon")
