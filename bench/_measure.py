"""What the benchmarks read from other processes (CPU and memory from /proc, counters and
histograms from a Prometheus text exposition), and how they stop their helper children."""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import re
import signal
import subprocess
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the whole process (every thread), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def memory_mb(pid: int) -> dict[str, float]:
    """VmHWM (peak RSS over the process's life) and VmRSS (now), in MB (10^6 bytes)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024 / 1e6
    return out


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat (to show contention)."""
    line = Path("/proc/stat").read_text().split("\n", 1)[0]
    values = [int(v) for v in line.split()[1:9]]  # guest time is already in user
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def fetch(url: str, timeout: float = 10.0) -> str:
    """GET ``url`` as Prometheus scrapes: gzip accepted, and decoded when the server uses it."""
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        body = resp.read()
        if resp.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return body.decode()


@dataclass
class Scrape:
    """The netwatch series the probe benchmark needs, summed over targets."""

    probes_ok: float = 0.0
    errors: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    lag_buckets: dict[float, float] = field(default_factory=lambda: defaultdict(float))
    skipped: float = 0.0
    unknown: int = 0
    targets: int = 0

    @property
    def failed(self) -> float:
        return sum(self.errors.values())

    @property
    def probes(self) -> float:
        return self.probes_ok + self.failed


def parse_netwatch(text: str) -> Scrape:
    s = Scrape()
    for line in text.splitlines():
        if not line.startswith("netwatch_"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "netwatch_probe_duration_seconds_count":
            s.probes_ok += value
            s.targets += 1
        elif name == "netwatch_probe_errors_total":
            s.errors[dict(_LABEL.findall(labels)).get("error", "?")] += value
        elif name == "netwatch_scheduler_lag_seconds_bucket":
            le = dict(_LABEL.findall(labels))["le"]
            s.lag_buckets[math.inf if le == "+Inf" else float(le)] += value
        elif name == "netwatch_scheduler_skipped_total":
            s.skipped += value
        elif name == "netwatch_link_state" and 'state="unknown"' in labels and value == 1:
            s.unknown += 1
    return s


def delta(after: Scrape, before: Scrape) -> Scrape:
    d = Scrape(
        probes_ok=after.probes_ok - before.probes_ok,
        skipped=after.skipped - before.skipped,
        unknown=after.unknown,
        targets=after.targets,
    )
    for k, v in after.errors.items():
        if v - before.errors.get(k, 0.0):
            d.errors[k] = v - before.errors.get(k, 0.0)
    for le, v in after.lag_buckets.items():
        d.lag_buckets[le] = v - before.lag_buckets.get(le, 0.0)
    return d


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile on cumulative bucket counts: linear interpolation
    inside the bucket holding the q-th observation (so only bucket-resolution); ``inf``
    when it falls past the last finite bound; ``nan`` with no observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    rank = q * buckets[bounds[-1]]
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return math.inf
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return math.inf


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of raw samples (``nan`` when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def stop(proc: subprocess.Popen[str], timeout: float = 5.0) -> None:
    """Close the child's stdin (its signal to exit); kill it if it lingers."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def terminate(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """Stop a netwatch (or exporter) child with SIGTERM, as a service manager would; kill it
    if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
