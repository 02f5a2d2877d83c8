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

    assert "times below are simulated, in the site's time zone (Asia/Ho_Chi_Minh)" in out
    # The progress lines show the backlog waiting now.
    assert re.search(r"\] .* stations sent=\d+ waiting=\d+\n", out), out
    # Every summary line is whole: a line too long for 80 columns would be cut in two, and
    # the second half would not start with the summary's indentation.
    summary = out[out.index("\nsummary\n") :].splitlines()[2:]
    assert summary
    assert all(line.startswith("  ") for line in summary if line), summary

    outages = re.search(r"outages planned (\d+), seen (\d+)", out)
    assert outages, out
    planned, seen = map(int, outages.groups())
    assert planned >= 1
    assert seen >= 1
    assert re.search(r"detection delay \d+\.\d+s average", out)

    text = " ".join(out.split())
    stations = re.search(
        r"station requests sent (\d+) forwarded (\d+), queued (\d+), "
        r"rejected by the database (\d+), refused (\d+) "
        r"of the queued: replayed (\d+), dead (\d+), lost (\d+)",
        text,
    )
    assert stations, out
    sent, forwarded, queued, rejected, refused, replayed, dead, lost = map(int, stations.groups())
    assert lost == 0
    assert queued > 0, "an outage at peak hours should have queued some applications"
    assert replayed + dead == queued
    assert forwarded + queued + rejected + refused == sent
