"""The systemd unit as deploy/install.sh writes it, and ``systemd-analyze verify``."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
UNIT = ROOT / "deploy" / "netwatch.service"


def unit_for(prefix: Path, sysconfdir: Path) -> str:
    """The unit with install.sh's substitutions for ``prefix`` and ``sysconfdir``."""
    text = UNIT.read_text(encoding="utf-8")
    return text.replace("/opt/netwatch", str(prefix)).replace("/etc/netwatch", str(sysconfdir))


def verify_unit(path: Path) -> None:
    """``systemd-analyze verify``; unknown or misspelt keys are only warnings there, so any
    output at all fails too."""
    done = subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, output
    assert not output, output
