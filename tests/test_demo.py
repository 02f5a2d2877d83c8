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


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_demo_with_a_naive_database_applies_nothing_twice() -> None:
    """``--upstream naive``: the database ignores Idempotency-Key and now and then applies a
    write and drops the connection; the proxy looks those writes up instead of re-sending."""
    proc = subprocess.run(
        [sys.executable, "-m", "netwatch", "demo", "--duration", "20", "--seconds-per-hour",
         "2", "--upstream", "naive"],
        capture_output=True, text=True, timeout=100, check=False,
    )  # fmt: skip
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doubt = re.search(r"in doubt (\d+) \(found by lookup (\d+)\)", out)
    assert doubt, out
    assert int(doubt.group(1)) >= 1, "no write was ever in doubt: the demo showed nothing"
    assert int(doubt.group(2)) >= 1
    twice = re.search(r"database \(naive\): received twice (\d+), applied twice (\d+)", out)
    assert twice, out
    assert twice.group(2) == "0"
    assert "lost 0" in out
