"""The command line as a user runs it: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest


def netwatch(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "netwatch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) >= 1
    return lines[-1]


def test_version_prints_the_package_version() -> None:
    proc = netwatch("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("netwatch, version ")


async def test_probe_tcp_reports_success_and_json(tcp_upstream: int) -> None:
    proc = await asyncio.to_thread(netwatch, "probe", "tcp", f"127.0.0.1:{tcp_upstream}")
    assert proc.returncode == 0, proc.stderr
    assert f"tcp 127.0.0.1:{tcp_upstream}: ok" in proc.stdout

    proc = await asyncio.to_thread(netwatch, "probe", "tcp", f"127.0.0.1:{tcp_upstream}", "--json")
    data = json.loads(proc.stdout)
    assert data["success"] is True
    assert data["type"] == "tcp"
    assert data["latency"] > 0


def test_probe_of_a_closed_port_exits_1_with_the_error_class() -> None:
    proc = netwatch("probe", "tcp", "127.0.0.1:1", "--json")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["success"] is False
    assert data["error"] == "refused"


@pytest.mark.skipif(os.geteuid() != 0, reason="ICMP raw sockets need root here")
def test_probe_icmp_to_loopback_as_root() -> None:
    proc = netwatch("probe", "icmp", "127.0.0.1", "--count", "2", "--json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["loss"] == 0.0
    assert len(data["rtts"]) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("probe", "tcp", "127.0.0.1"), "expected HOST:PORT"),
        (("probe", "http", "ftp://x"), "expected an http:// or https:// URL"),
        (("probe", "tcp", "127.0.0.1:80", "--timeout", "soon"), "--timeout"),
        (("probe", "gopher", "x"), "Invalid value for 'TYPE'"),
        (("frobnicate",), "No such command"),
    ],
)
def test_bad_usage_exits_2_with_one_line(args: tuple[str, ...], message: str) -> None:
    line = assert_one_line_error(netwatch(*args), 2)
    assert message in line


def test_run_with_a_missing_config_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    line = assert_one_line_error(netwatch("run", "-c", str(missing)), 2)
    assert line == f"{missing}: cannot read config: No such file or directory"


def test_proxy_without_a_proxy_section_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text("site: {id: q1}\ntargets: []\n")
    line = assert_one_line_error(netwatch("proxy", "-c", str(cfg)), 2)
    assert "proxy" in line


def test_keygen_writes_a_private_key_once(tmp_path: Path) -> None:
    key = tmp_path / "queue.key"
    proc = netwatch("keygen", str(key))
    assert proc.returncode == 0, proc.stderr
    assert key.stat().st_size == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    again = netwatch("keygen", str(key))
    assert again.returncode != 0
    assert "Traceback" not in again.stderr
    assert key.stat().st_size == 32


def test_status_json_of_an_unreachable_daemon_is_one_line() -> None:
    line = assert_one_line_error(netwatch("status", "--url", "http://127.0.0.1:1", "--json"), 1)
    assert line.startswith("netwatch: error: cannot reach the daemon at http://127.0.0.1:1")
