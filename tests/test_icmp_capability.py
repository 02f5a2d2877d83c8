"""ICMP for a non-root service: what the systemd unit gives (an ambient CAP_NET_RAW) is
enough, and without it the error says what works for a Python program.

Runs ``netwatch probe icmp`` as user nobody through ``setpriv`` (util-linux), with and
without the ambient capability, against 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NOBODY = 65534

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run a probe as another user",
)


def probe_as_nobody(
    *setpriv_args: str, probe: tuple[str, ...] = ("icmp", "127.0.0.1", "--count", "2")
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            *setpriv_args,
            sys.executable,
            "-m",
            "netwatch",
            "probe",
            *probe,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )


def unprivileged_ping_allowed() -> bool:
    low, high = Path("/proc/sys/net/ipv4/ping_group_range").read_text().split()
    return int(low) <= NOBODY <= int(high)


def test_ambient_net_raw_is_enough_for_icmp_as_a_non_root_user() -> None:
    done = probe_as_nobody("--inh-caps=+net_raw", "--ambient-caps=+net_raw")
    assert done.returncode == 0, done.stdout + done.stderr
    assert '"success": true' in done.stdout


def test_without_the_capability_the_hint_names_what_works() -> None:
    if unprivileged_ping_allowed():
        pytest.skip("net.ipv4.ping_group_range lets user nobody ping without a capability")
    done = probe_as_nobody()
    assert done.returncode == 1, done.stdout + done.stderr
    assert '"error": "permission"' in done.stdout
    assert "AmbientCapabilities=CAP_NET_RAW" in done.stdout
    assert "net.ipv4.ping_group_range" in done.stdout
    assert "setcap" not in done.stdout


def test_path_probe_traces_with_icmp_given_the_ambient_capability() -> None:
    with_cap = probe_as_nobody(
        "--inh-caps=+net_raw", "--ambient-caps=+net_raw", probe=("path", "127.0.0.1")
    )
    assert with_cap.returncode == 0, with_cap.stdout + with_cap.stderr
    assert json.loads(with_cap.stdout)["details"]["protocol"] == "icmp"
    without = probe_as_nobody(probe=("path", "127.0.0.1"))
    assert json.loads(without.stdout)["details"].get("protocol") == "udp", without.stdout
