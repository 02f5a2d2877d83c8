"""``netwatch demo`` as a new user runs it: it ends by itself, loses nothing, exits 0."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_runs_a_compressed_day_and_loses_no_request() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "netwatch",
            "demo",
            "--duration",
            "20",
            "--seconds-per-hour",
            "2",
            "--stations",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "metrics                         http://127.0.0.1:" in out

    outages = re.search(r"outages planned (\d+), seen (\d+)", out)
    assert outages, out
    planned, seen = map(int, outages.groups())
    assert planned >= 1
    assert seen >= 1
    assert re.search(r"detection delay \d+\.\d+s average", out)

    text = " ".join(out.split())
    stations = re.search(
        r"sent (\d+), forwarded (\d+), queued (\d+), replayed (\d+), dead (\d+), "
        r"rejected by the database (\d+), refused (\d+), lost (\d+)",
        text,
    )
    assert stations, out
    sent, forwarded, queued, replayed, dead, rejected, refused, lost = map(int, stations.groups())
    assert lost == 0
    assert queued > 0, "an outage at peak hours should have queued some applications"
    assert replayed + dead == queued
    assert forwarded + queued + rejected + refused == sent
