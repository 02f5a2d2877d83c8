"""``make install`` into a temporary prefix, then the installed command line from the
installed venv: version, init, check-config, a real proxy queueing a request; an upgrade
(installing again) keeps the queue and its key."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.servers import free_port
from helpers.systemd import verify_unit

from netwatch import __version__

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed"),
]


def make_install(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(ROOT),
            "install",
            f"PREFIX={tmp_path / 'opt'}",
            f"SYSCONFDIR={tmp_path / 'etc'}",
            f"UNITDIR={tmp_path / 'systemd'}",
            f"BINDIR={tmp_path / 'bin'}",
            "SYSTEMD=no",
        ],
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def installed(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(tmp_path / "opt" / "bin" / "netwatch"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,  # not the source tree: the installed package must stand alone
    )


def queue_one_request(tmp_path: Path, config: Path, proxy_port: int) -> str:
    """Run the installed `netwatch proxy` (its upstream is down) and queue one request."""
    log = (tmp_path / "proxy.log").open("wb")
    proc = subprocess.Popen(
        [str(tmp_path / "opt" / "bin" / "netwatch"), "proxy", "-c", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "proxy.log").read_text()
            request = urllib.request.Request(
                f"http://127.0.0.1:{proxy_port}/api/applications",
                data=b'{"station": "counter-1", "seq": 1}',
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    assert response.status == 202
                    ticket: str = json.load(response)["ticket"]
                    return ticket
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "proxy.log").read_text()
        log.close()


def test_make_install_then_upgrade_keeps_the_queue_and_the_key(tmp_path: Path) -> None:
    make_install(tmp_path)
    version = installed(tmp_path, "--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"netwatch, version {__version__}"
    assert os.path.realpath(tmp_path / "bin" / "netwatch") == str(tmp_path / "opt/bin/netwatch")

    unit = tmp_path / "systemd" / "netwatch.service"
    text = unit.read_text(encoding="utf-8")
    config = tmp_path / "etc" / "netwatch.yaml"
    assert f"ExecStart={tmp_path}/opt/bin/netwatch run -c {config}\n" in text
    if shutil.which("systemd-analyze"):
        verify_unit(unit)

    proxy_port, closed_port = free_port(), free_port()
    state = tmp_path / "state"
    done = installed(
        tmp_path,
        "init",
        "--site",
        "q1-ben-nghe",
        "--name",
        "UBND phường Bến Nghé",
        "--upstream",
        f"http://127.0.0.1:{closed_port}",
        "--district",
        "Quận 1",
        "--isp",
        "VNPT",
        "-c",
        str(config),
        "--queue",
        str(state / "queue.db"),
        "--listen",
        f"127.0.0.1:{proxy_port}",
        "--metrics-listen",
        f"127.0.0.1:{free_port()}",
    )
    assert done.returncode == 0, done.stderr
    checked = installed(tmp_path, "check-config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == f"{config}: ok (1 target, proxy on 127.0.0.1:{proxy_port})"

    ticket = queue_one_request(tmp_path, config, proxy_port)
    key = state / "queue.key"
    key_bytes = key.read_bytes()

    upgrade = make_install(tmp_path)
    assert "next:" not in upgrade.stdout  # the existing config is left alone
    assert key.read_bytes() == key_bytes
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    listed = installed(tmp_path, "queue", "list", "-c", str(config), "--json")
    assert listed.returncode == 0, listed.stderr
    entries = json.loads(listed.stdout)
    assert [(e["ticket"], e["state"]) for e in entries] == [(ticket, "queued")]
