"""CPU, memory and scheduling lag of netwatch's probes against Prometheus blackbox_exporter.

    .venv/bin/python bench/probe_cost.py [--targets 1000] [--rates 100,500] [--duration 30]
        [--warmup 5] [--kinds tcp,http,icmp] [--quick]
        [--compare-cmd CMD] [--repeat N]

Everything stays on loopback. Child processes serve the targets (so their CPU is nobody's):
TCP listeners on 127.71.x.y (``--targets`` distinct host:port pairs), an HTTP responder
(200 "ok", ``Connection: close``) on 127.72.x.y, and ICMP to 127.73.x.y (the kernel answers).

For every kind and rate, in the same run and alternating which goes first:

- netwatch: ``netwatch run`` on a generated config with ``--targets`` targets of the kind,
  interval ``targets / rate`` (1,000 targets at 100/s: 10 s), timeout 1 s, ICMP count 1.
  Warm-up lasts until every target has finished a round (its first link transition is a
  start-up cost) and at least ``--warmup`` s. Over the next ``--duration`` s the daemon is
  scraped every ``--scrape-interval`` s as Prometheus would, gzip accepted (that scrape cost
  is counted);
  probes are the deltas of ``netwatch_probe_duration_seconds_count`` plus
  ``netwatch_probe_errors_total``; lag p99 comes from the deltas of the
  ``netwatch_scheduler_lag_seconds`` buckets (interpolated: bucket resolution only).
- blackbox_exporter 0.23: the same probes through ``/probe`` at the same rate, evenly spread,
  over keep-alive connections with Prometheus' headers (see ``_blackbox.py``).
- baseline (TCP rows): bare ``loop.sock_connect`` to the same targets at the same rate in a
  child process, the floor for a Python asyncio prober.
- compare (with ``--compare-cmd``): another netwatch (another checkout, through a wrapper)
  measured exactly like netwatch, in the same run, for A/B tests of a change. ``--repeat N``
  runs each netwatch N times per row in alternating order (ABBA...) and pools the windows.

Scheduling lag goal: p99 < 5 ms at 500 probes/s and above (``LAG_GOAL``), printed for every
netwatch row with the lag p50, the share of probes later than 5 ms and the scrapes' wall time.

CPU is utime + stime of the measured process (/proc/PID/stat, 10 ms ticks) over the window,
per 1,000 probes; RSS is VmHWM (peak over the process's life). Results also go to
``bench/results/probe_cost.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _blackbox
import _loopback
import yaml
from _measure import (
    Scrape,
    cpu_seconds,
    delta,
    fetch,
    histogram_quantile,
    machine_ticks,
    memory_mb,
    parse_netwatch,
    percentile,
    stop,
    terminate,
)

ROOT = Path(__file__).resolve().parents[1]
NETWATCH = [str(ROOT / ".venv/bin/python"), "-m", "netwatch"]
RESULTS = ROOT / "bench/results/probe_cost.json"
PORTS_PER_HOST = 20
CPU_GOAL = {"tcp": 0.6, "icmp": 0.6, "http": 1.0}  # netwatch / blackbox CPU per probe
LAG_GOAL_S, LAG_GOAL_RATE = 0.005, 500  # p99 below 5 ms at 500 probes/s and above
RSS_GOAL_MB = 60.0
MIN_SUCCESS = 0.999  # below this a row's CPU figures are not comparable


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of the machine's CPU (all cores) that was busy between two readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else math.nan


def summary(cpu: float, probes: float, ok: float, seconds: float, mem: dict[str, float]) -> dict:
    return {
        "probes": int(probes),
        "ok": int(ok),
        "failed": int(probes - ok),
        "success": ok / probes if probes else 0.0,
        "window_s": round(seconds, 2),
        "probe_rate": round(probes / seconds, 1) if seconds else 0.0,
        "cpu_s": round(cpu, 3),
        "cpu_s_per_1000": cpu / probes * 1000 if probes else math.nan,
        "rss_peak_mb": round(mem.get("VmHWM", math.nan), 1),
        "rss_end_mb": round(mem.get("VmRSS", math.nan), 1),
    }


# --- targets ------------------------------------------------------------------------------


class Services:
    """The loopback targets of every kind asked for, served by child processes."""

    def __init__(self, kinds: list[str], n: int) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        self.tcp: list[tuple[str, int]] = []
        self.http: list[str] = []
        self.icmp = [_loopback.address(_loopback.ICMP_BLOCK, i) for i in range(n)]
        if "tcp" in kinds:
            hosts = math.ceil(n / PORTS_PER_HOST)
            proc, addrs = _loopback.start(
                "tcp-server", f"--hosts={hosts}", f"--ports={PORTS_PER_HOST}"
            )
            self.procs.append(proc)
            self.tcp = [(h, p) for h, p in addrs][:n]  # type: ignore[attr-defined]
        if "http" in kinds:
            proc, addrs = _loopback.start("http-server", "--hosts=10", "--ports=2")
            self.procs.append(proc)
            listen = [(h, p) for h, p in addrs]  # type: ignore[attr-defined]
            self.http = [
                f"http://{h}:{p}/t/{i}" for i in range(n) for h, p in [listen[i % len(listen)]]
            ]

    def close(self) -> None:
        for proc in self.procs:
            stop(proc)

    def netwatch_targets(self, kind: str) -> list[dict[str, Any]]:
        if kind == "tcp":
            return [
                {"name": f"t{i:04d}", "type": "tcp", "host": h, "port": p}
                for i, (h, p) in enumerate(self.tcp)
            ]
        if kind == "http":
            return [
                {"name": f"t{i:04d}", "type": "http", "url": u} for i, u in enumerate(self.http)
            ]
        return [
            {"name": f"t{i:04d}", "type": "icmp", "host": h, "count": 1}
            for i, h in enumerate(self.icmp)
        ]

    def blackbox_targets(self, kind: str) -> list[str]:
        if kind == "tcp":
            return [f"{h}:{p}" for h, p in self.tcp]
        return self.http if kind == "http" else self.icmp


# --- the three systems ----------------------------------------------------------------------


def run_netwatch(
    kind: str, rate: float, svc: Services, args: argparse.Namespace, work: Path, *, cmd: str
) -> dict:
    targets = svc.netwatch_targets(kind)
    interval = len(targets) / rate
    listen = f"127.0.0.1:{_blackbox.free_port()}"
    config = {
        "site": {"id": "bench"},
        "defaults": {"interval": interval, "timeout": 1},
        "targets": targets,
        "metrics": {"listen": listen},
    }
    cfg = work / f"netwatch-{kind}-{rate:g}.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    log = work / f"netwatch-{kind}-{rate:g}.log"
    url = f"http://{listen}/metrics"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd.split(), "run", "-c", str(cfg)],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    try:
        started = time.monotonic()
        deadline = started + interval * 2 + args.warmup + 30
        while True:  # warm-up: every target has a state, and --warmup has passed
            time.sleep(1.0)
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"netwatch exited or never settled; see {log}")
            try:
                s = parse_netwatch(fetch(url))
            except OSError:
                continue
            settled = s.targets == len(targets) and s.unknown == 0
            if settled and time.monotonic() - started >= args.warmup:
                break
        s0 = parse_netwatch(fetch(url))
        c0, m0, t0 = cpu_seconds(proc.pid), machine_ticks(), time.monotonic()
        # Segments between scrapes give the probing cost alone; the excess is the scrapes'.
        quiet_cpu = quiet_s = scrape_s = 0.0
        seg_cpu, seg_t, scrapes = c0, t0, 0
        scrape_at = t0
        while True:
            scrape_at = min(scrape_at + args.scrape_interval, t0 + args.duration)
            time.sleep(max(0.0, scrape_at - time.monotonic()))
            cpu_before, t_before = cpu_seconds(proc.pid), time.monotonic()
            quiet_cpu += cpu_before - seg_cpu
            quiet_s += t_before - seg_t
            text = fetch(url)
            scrape_s += time.monotonic() - t_before  # the fetch alone, not our parsing
            s1 = parse_netwatch(text)
            seg_cpu, seg_t = cpu_seconds(proc.pid), time.monotonic()
            scrapes += 1
            if scrape_at >= t0 + args.duration:
                break
        c1, m1, t1 = seg_cpu, machine_ticks(), seg_t
        mem = memory_mb(proc.pid)
    finally:
        terminate(proc)
    d: Scrape = delta(s1, s0)
    out = summary(c1 - c0, d.probes, d.probes_ok, t1 - t0, mem)
    out.update(
        errors=dict(d.errors),
        skipped_rounds=int(d.skipped),
        **lag_figures(d.lag_buckets),
        lag_buckets={str(k): v for k, v in sorted(d.lag_buckets.items())},
        scrapes=scrapes,
        scrape_wall_ms=scrape_s / scrapes * 1000,
        scrape_cpu_s=(c1 - c0 - quiet_cpu * (t1 - t0) / quiet_s) / scrapes,
        cpu_s_per_1000_excl_scrapes=quiet_cpu / (d.probes * quiet_s / (t1 - t0)) * 1000
        if d.probes
        else math.nan,
        machine_busy=busy_share(m0, m1),
    )
    return out


def lag_figures(buckets: dict[float, float]) -> dict[str, float]:
    """Lag p50, p99 (ms) and the share of probes later than the goal, from bucket deltas."""
    return {
        "lag_p50_ms": histogram_quantile(0.5, buckets) * 1000,
        "lag_p99_ms": histogram_quantile(0.99, buckets) * 1000,
        "lag_over_5ms": 1 - buckets.get(LAG_GOAL_S, 0) / max(buckets.get(math.inf, 1), 1),
    }


def pooled(runs: list[dict]) -> dict:
    """Several windows of one netwatch as one: counts and CPU summed, lag from the summed
    bucket deltas, scrape figures averaged over every scrape, peak RSS the highest."""
    if len(runs) == 1:
        return runs[0]
    buckets: dict[float, float] = {}
    for run in runs:
        for le, n in run["lag_buckets"].items():
            buckets[float(le)] = buckets.get(float(le), 0.0) + n
    probes = sum(r["probes"] for r in runs)
    ok = sum(r["ok"] for r in runs)
    seconds = sum(r["window_s"] for r in runs)
    scrapes = sum(r["scrapes"] for r in runs)
    mem = {"VmHWM": max(r["rss_peak_mb"] for r in runs), "VmRSS": runs[-1]["rss_end_mb"]}
    out = summary(sum(r["cpu_s"] for r in runs), probes, ok, seconds, mem)
    errors: dict[str, float] = {}
    for run in runs:
        for k, v in run["errors"].items():
            errors[k] = errors.get(k, 0.0) + v
    out.update(
        errors=errors,
        skipped_rounds=sum(r["skipped_rounds"] for r in runs),
        **lag_figures(buckets),
        scrapes=scrapes,
        scrape_wall_ms=sum(r["scrape_wall_ms"] * r["scrapes"] for r in runs) / scrapes,
        scrape_cpu_s=sum(r["scrape_cpu_s"] * r["scrapes"] for r in runs) / scrapes,
        cpu_s_per_1000_excl_scrapes=sum(
            r["cpu_s_per_1000_excl_scrapes"] * r["probes"] for r in runs
        )
        / probes,
        machine_busy=sum(r["machine_busy"] * r["window_s"] for r in runs) / seconds,
        runs=runs,
    )
    return out


def run_blackbox(
    kind: str, rate: float, svc: Services, args: argparse.Namespace, work: Path
) -> dict:
    targets = svc.blackbox_targets(kind)
    proc, listen = _blackbox.start_exporter(work, work / "blackbox.log")
    try:
        m0 = machine_ticks()
        res = asyncio.run(
            _blackbox.drive(
                listen,
                kind,
                targets,
                rate=rate,
                warmup=args.warmup,
                duration=args.duration,
                concurrency=args.concurrency,
                cpu=lambda: cpu_seconds(proc.pid),
                scrape_timeout=min(10.0, len(targets) / rate),
            )
        )
        m1 = machine_ticks()
        mem = memory_mb(proc.pid)
    finally:
        terminate(proc)
    out = summary(res.cpu_marks[1] - res.cpu_marks[0], res.probes, res.ok, res.seconds, mem)
    out.update(
        errors=res.errors,
        driver_late_p99_ms=percentile(res.late, 0.99) * 1000,
        machine_busy=busy_share(m0, m1),
    )
    return out


def run_baseline(rate: float, svc: Services, args: argparse.Namespace, work: Path) -> dict:
    targets = work / "tcp-targets.json"
    targets.write_text(json.dumps(svc.tcp))
    seconds = args.warmup + args.duration + 1
    proc, _ = _loopback.start(
        "connect-loop", f"--targets={targets}", f"--rate={rate:g}", f"--seconds={seconds:g}"
    )
    assert proc.stdout is not None

    def mark() -> tuple[int, int]:
        proc.send_signal(signal.SIGUSR1)
        ok, failed = (int(x) for x in proc.stdout.readline().split())  # type: ignore[union-attr]
        return ok, failed

    try:
        time.sleep(args.warmup)
        (ok0, f0), c0, t0 = mark(), cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.duration)
        (ok1, f1), c1, t1 = mark(), cpu_seconds(proc.pid), time.monotonic()
        mem = memory_mb(proc.pid)
    finally:
        stop(proc, timeout=5.0)
    ok, failed = ok1 - ok0, f1 - f0
    return summary(c1 - c0, ok + failed, ok, t1 - t0, mem)


# --- report -----------------------------------------------------------------------------------


def verdicts(row: dict) -> dict[str, str]:
    nw, bb = row["netwatch"], row["blackbox"]
    valid = nw["success"] >= MIN_SUCCESS and bb["success"] >= MIN_SUCCESS
    ratio = row["ratio"]
    return {
        "cpu": ("PASS" if ratio <= CPU_GOAL[row["kind"]] else "MISS") if valid else "INVALID",
        "rss": "PASS" if nw["rss_peak_mb"] < RSS_GOAL_MB else "MISS",
        "lag": lag_verdict(row["rate"], nw),
    }


def print_lag(rows: list[dict], scrape_interval: float) -> None:
    """Every netwatch row's scheduling lag against the goal, and what its scrapes cost."""
    print(
        f"\nscheduling lag: goal p99 < {LAG_GOAL_S * 1000:g} ms at {LAG_GOAL_RATE}+ probes/s"
        f" (scraped every {scrape_interval:g} s, gzip accepted)"
    )
    head = (
        f"{'kind':<5} {'rate':>5} {'system':<9} {'runs':>4} | {'lag p50':>7} {'p99':>7} "
        f"{'>5ms':>6} {'goal':>5} | {'scrape wall':>11} {'CPU':>6} | {'CPU-s/1k':>8} "
        f"{'RSS':>6} {'ok%':>7} {'busy':>5}"
    )
    ruled(head)
    for r in rows:
        for name in ("netwatch", "compare"):
            nw = r.get(name)
            if nw is None:
                continue
            goal = lag_verdict(r["rate"], nw)
            p99 = f"{nw['lag_p99_ms']:.2f}" if math.isfinite(nw["lag_p99_ms"]) else ">1000"
            print(
                f"{r['kind']:<5} {r['rate']:>5g} {name:<9} {len(nw.get('runs', [nw])):>4} | "
                f"{nw['lag_p50_ms']:>7.2f} {p99:>7} {nw['lag_over_5ms'] * 100:>5.2f}% {goal:>5} | "
                f"{nw['scrape_wall_ms']:>8.1f} ms {nw['scrape_cpu_s'] * 1000:>3.0f}ms | "
                f"{fmt(nw['cpu_s_per_1000']):>8} {nw['rss_peak_mb']:>6.1f} "
                f"{nw['success'] * 100:>7.2f} {nw['machine_busy'] * 100:>4.0f}%"
            )
    print(
        "lag in ms, interpolated inside buckets; >5ms: share of probes later than 5 ms;"
        " scrape wall: one /metrics fetch, CPU: netwatch's CPU per scrape beyond probing;"
        " busy: the whole machine's CPU in use (other work included)."
    )


def lag_verdict(rate: float, nw: dict) -> str:
    """PASS or MISS against the lag goal; ``-`` below the rate it is set for."""
    if rate < LAG_GOAL_RATE:
        return "-"
    return "PASS" if nw["lag_p99_ms"] < LAG_GOAL_S * 1000 else "MISS"


def ruled(head: str) -> None:
    print(head)
    print("-" * len(head))


def fmt(x: float, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(rows: list[dict]) -> None:
    head = (
        f"{'kind':<5} {'rate':>5} | {'nw CPU-s/1k':>11} {'(no scrape)':>11} "
        f"{'bb CPU-s/1k':>11} {'nw/bb':>6} "
        f"{'goal':>10} | {'lag p99':>8} {'goal':>5} | {'nw RSS':>6} {'bb RSS':>6} {'goal':>5} | "
        f"{'nw ok%':>7} {'bb ok%':>7} | {'base CPU-s/1k':>13}"
    )
    ruled(head)
    for r in rows:
        nw, bb, base, v = r["netwatch"], r["blackbox"], r.get("baseline"), r["verdicts"]
        goal = f"<={CPU_GOAL[r['kind']]:.1f} {v['cpu']}"
        lag = f"{nw['lag_p99_ms']:.2f}ms" if math.isfinite(nw["lag_p99_ms"]) else ">1s"
        print(
            f"{r['kind']:<5} {r['rate']:>5g} | {fmt(nw['cpu_s_per_1000']):>11} "
            f"{fmt(nw['cpu_s_per_1000_excl_scrapes']):>11} "
            f"{fmt(bb['cpu_s_per_1000']):>11} {fmt(r['ratio'], '.2f'):>6} {goal:>10} | "
            f"{lag:>8} {v['lag']:>5} | {nw['rss_peak_mb']:>6.1f} {bb['rss_peak_mb']:>6.1f} "
            f"{v['rss']:>5} | {nw['success'] * 100:>7.2f} {bb['success'] * 100:>7.2f} | "
            f"{fmt(base['cpu_s_per_1000']) if base else '-':>13}"
        )
    print(
        "\nCPU-s/1k: CPU seconds (user+sys) of the measured process per 1,000 probes in the"
        " window; netwatch's includes its /metrics scrapes every --scrape-interval s, '(no scrape)'"
        " is the same from the segments between scrapes. RSS: peak (VmHWM), MB. lag p99:"
        " netwatch_scheduler_lag_seconds, interpolated inside buckets (bucket resolution)."
    )
    for r in rows:
        for name in ("netwatch", "blackbox", "baseline"):
            res = r.get(name)
            if res and res["failed"]:
                what = f"{r['kind']} {r['rate']:g}/s {name}"
                print(f"  {what}: {res['failed']} failed {res['errors']}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=int, default=1000)
    p.add_argument("--rates", default="100,500", help="probes per second, comma-separated")
    p.add_argument("--duration", type=float, default=30.0, help="measurement window, s")
    p.add_argument("--warmup", type=float, default=5.0, help="minimum warm-up, s")
    p.add_argument("--kinds", default="tcp,http,icmp")
    p.add_argument("--scrape-interval", type=float, default=15.0, help="netwatch /metrics, s")
    p.add_argument("--concurrency", type=int, default=64, help="blackbox driver connections")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--systems", default="netwatch,blackbox", help="which to run (A/B tests)")
    p.add_argument(
        "--netwatch-cmd",
        default=" ".join(NETWATCH),
        help="command that runs netwatch's CLI (to try a change: a wrapper script)",
    )
    p.add_argument(
        "--compare-cmd",
        help="another netwatch CLI command, measured like netwatch in the same run (A/B)",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="netwatch windows per row (alternating A/B)"
    )
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--quick", action="store_true", help="smoke run: 200 targets, 5 s windows")
    args = p.parse_args()
    if args.quick:
        args.targets, args.duration, args.warmup, args.scrape_interval = 200, 5.0, 2.0, 5.0
    if args.compare_cmd and "compare" not in args.systems:
        args.systems += ",compare"
    args.rate_list = [float(r) for r in args.rates.split(",")]
    args.kind_list = [k.strip() for k in args.kinds.split(",")]
    unknown = set(args.kind_list) - set(CPU_GOAL)
    if unknown or not 1 <= args.targets <= 5000 or not 1 <= args.repeat <= 10:
        p.error(f"kinds are tcp, http, icmp (not {sorted(unknown)}); targets 1..5000; repeat 1..10")
    return args


def schedule(n: int, args: argparse.Namespace) -> list[str]:
    """The systems of row ``n`` in the order they run: who goes first alternates between
    rows, and the netwatch windows of an A/B test alternate within the row (ABBA...)."""
    pair = [name for name in ("netwatch", "compare") if name in args.systems]
    nw: list[str] = []
    for i in range(args.repeat):
        nw += pair if (n + i) % 2 == 0 else pair[::-1]
    if "blackbox" not in args.systems:
        return nw
    return [*nw, "blackbox"] if n % 2 == 0 else ["blackbox", *nw]


def main() -> int:
    args = parse_args()
    if not Path(_blackbox.EXPORTER).exists():
        print(f"{_blackbox.EXPORTER} not found (apt-get install prometheus-blackbox-exporter)")
        return 1
    rows: list[dict] = []
    svc = Services(args.kind_list, args.targets)
    try:
        with tempfile.TemporaryDirectory(prefix="probe_cost-") as tmp:
            work = Path(tmp)
            for n, (kind, rate) in enumerate(
                (k, r) for k in args.kind_list for r in args.rate_list
            ):
                print(f"[{time.strftime('%H:%M:%S')}] {kind} {rate:g}/s ...", file=sys.stderr)
                order = schedule(n, args)
                row: dict[str, Any] = {"kind": kind, "rate": rate, "order": order}
                runs: dict[str, list[dict]] = {}
                for name in order:
                    if name == "blackbox":
                        result = run_blackbox(kind, rate, svc, args, work)
                    else:
                        cmd = args.compare_cmd if name == "compare" else args.netwatch_cmd
                        result = run_netwatch(kind, rate, svc, args, work, cmd=cmd)
                    runs.setdefault(name, []).append(result)
                    print(f"  {name}: {json.dumps(result)}", file=sys.stderr)
                for name, results in runs.items():
                    row[name] = pooled(results) if name != "blackbox" else results[0]
                if kind == "tcp" and not args.no_baseline:
                    row["baseline"] = run_baseline(rate, svc, args, work)
                    print(f"  baseline: {json.dumps(row['baseline'])}", file=sys.stderr)
                rows.append(row)
                if "netwatch" in row and "blackbox" in row:
                    nw, bb = row["netwatch"], row["blackbox"]
                    row["ratio"] = nw["cpu_s_per_1000"] / bb["cpu_s_per_1000"]
                    row["verdicts"] = verdicts(row)
    finally:
        svc.close()
    if all("verdicts" in r for r in rows):
        print_table(rows)
    if any("netwatch" in r or "compare" in r for r in rows):
        print_lag(rows, args.scrape_interval)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    doc = {
        "settings": settings,
        "machine": {"cpus": os.cpu_count(), "loadavg": Path("/proc/loadavg").read_text().split()},
        "blackbox_version": "0.23 (Debian)",
        "rows": rows,
    }
    args.output.write_text(json.dumps(doc, indent=2, default=str))
    print(f"\nwritten: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
