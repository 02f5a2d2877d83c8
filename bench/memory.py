"""Resident memory of ``netwatch run`` with many targets and of an idle ``netwatch proxy``,
and what each import costs.

    .venv/bin/python bench/memory.py [--targets 1000] [--scrapes 3] [--idle 5]
        [--netwatch-cmd CMD] [--baseline-cmd CMD]

Everything stays on loopback. A child process accepts TCP on ``--targets`` host:port pairs
(127.71.x.y, see ``_loopback.py``); another serves as the proxy's upstream (``_upstream.py
serve``). For each command (``--baseline-cmd`` first when given, then ``--netwatch-cmd``):

- ``run``: ``CMD run`` on a config of ``--targets`` TCP targets (interval ``--interval``,
  timeout 1 s). Settled when every target has logged its first link change (read from its
  JSON log, so no scrape happens before); then ``/metrics`` is scraped ``--scrapes`` times,
  1 s apart, as Prometheus would. Printed: peak RSS (VmHWM) when settled and at the end,
  RSS now (VmRSS), threads and the size of one scrape.
- ``proxy``: ``CMD proxy`` with its guard target on the upstream, idle: settled when the
  guard's link is up; ``/_netwatch/metrics`` scraped ``--scrapes`` times; ``--idle`` s later
  the same readings.
- imports: ``CMD run`` once more on one TCP target, with ``PYTHONPROFILEIMPORTTIME=1`` and
  ``_importrss/sitecustomize.py`` on ``PYTHONPATH``: the 15 slowest imports (cumulative, as
  ``-X importtime`` prints them) and the 15 packages that add the most resident memory
  (each module's own growth of VmRSS while it was imported, summed per top-level package;
  netwatch and probes per subpackage). Page-granular: figures under ~0.2 MB are noise.

Each command first runs once on one target (run and proxy, not measured) to write the
bytecode caches of what it imports, as a pip install would have: children run without
``PYTHONDONTWRITEBYTECODE``.

A command is split like a shell line; leading ``NAME=value`` words are set in its
environment (``--baseline-cmd "NETWATCH_LOOP=asyncio .venv/bin/python -m netwatch"``
compares the event loops). Another checkout needs a venv of its own (see bench/README.md):
an editable install wins over ``PYTHONPATH``. MB are 10^6 bytes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _loopback
import _upstream
import yaml
from _blackbox import free_port
from _measure import fetch, memory_mb, stop, terminate

ROOT = Path(__file__).resolve().parents[1]
NETWATCH = f"{ROOT / '.venv/bin/python'} -m netwatch"
IMPORT_METER = Path(__file__).resolve().parent / "_importrss"
RESULTS = ROOT / "bench/results/memory.json"
PORTS_PER_HOST = 20
RSS_GOAL_MB = 60.0
TOP = 15


@dataclass
class Command:
    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, label: str, line: str) -> Command:
        words = shlex.split(line)
        env = {}
        while words and "=" in words[0] and not words[0].startswith(("/", ".")):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        # The children start in a work directory: relative program and script paths are
        # taken from here.
        words = [
            os.path.abspath(w) if (n == 0 and "/" in w) or w.endswith(".py") else w
            for n, w in enumerate(words)
        ]
        return cls(label, words, env)

    def start(
        self, *args: str, log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        # Bytecode caches are written and read as on an installed system (pip compiles the
        # modules it installs), so that no measured run pays for compiling netwatch's sources.
        inherited = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        merged = {**inherited, **self.env, **(env or {})}
        with log.open("wb") as out:
            # Started in the work directory: ``python -m netwatch`` puts its working directory
            # first on sys.path, which must not pick this checkout for another command.
            return subprocess.Popen(
                [*self.argv, *args],
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                env=merged,
                cwd=log.parent,
            )


def linked(log: Path) -> set[str]:
    """Targets that have logged a link change (JSON log lines; other lines are skipped)."""
    seen = set()
    with log.open("rb") as lines:
        for line in lines:
            if b"link_state_changed" not in line:
                continue
            with contextlib.suppress(ValueError):
                seen.add(json.loads(line)["target"])
    return seen


def wait_linked(proc: subprocess.Popen[bytes], log: Path, names: set[str], limit: float) -> float:
    started = time.monotonic()
    while not names <= linked(log):
        if proc.poll() is not None or time.monotonic() - started > limit:
            raise RuntimeError(f"netwatch exited or never settled; see {log}")
        time.sleep(0.5)
    return time.monotonic() - started


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def readings(pid: int) -> dict[str, float]:
    mem = memory_mb(pid)
    return {"peak_mb": round(mem["VmHWM"], 1), "rss_mb": round(mem["VmRSS"], 1)}


def scrape(url: str, times: int) -> int:
    size = 0
    for n in range(times):
        if n:
            time.sleep(1.0)
        size = len(fetch(url))
    return size


# --- the three measurements ------------------------------------------------------------------


def site_config(targets: list[tuple[str, int]], interval: float, listen: str) -> dict[str, Any]:
    return {
        "site": {"id": "bench"},
        "defaults": {"interval": interval, "timeout": 1},
        "targets": [
            {"name": f"t{i:04d}", "type": "tcp", "host": h, "port": p}
            for i, (h, p) in enumerate(targets)
        ],
        "metrics": {"listen": listen},
    }


def measure_run(
    cmd: Command, targets: list[tuple[str, int]], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    listen = f"127.0.0.1:{free_port()}"
    cfg = work / f"run-{cmd.label}.yaml"
    cfg.write_text(yaml.safe_dump(site_config(targets, args.interval, listen)))
    log = work / f"run-{cmd.label}.log"
    proc = cmd.start("run", "-c", str(cfg), log=log)
    try:
        names = {f"t{i:04d}" for i in range(len(targets))}
        settle_s = wait_linked(proc, log, names, args.interval * 2 + 60)
        out: dict[str, Any] = {"settle_s": round(settle_s, 1), "settled": readings(proc.pid)}
        out["scrape_bytes"] = scrape(f"http://{listen}/metrics", args.scrapes)
        out["end"] = readings(proc.pid)
        out["threads"] = threads(proc.pid)
    finally:
        terminate(proc)
    return out


def measure_proxy(
    cmd: Command, upstream: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    port = free_port()
    config = {
        "site": {"id": "bench"},
        "defaults": {"interval": "2s", "timeout": "1s"},
        "targets": [{"name": "api", "type": "tcp", "host": "127.0.0.1", "port": upstream}],
        "proxy": {
            "listen": f"127.0.0.1:{port}",
            "upstream": f"http://127.0.0.1:{upstream}",
            "guard": ["api"],
            "queue": {"path": str(work / f"queue-{cmd.label}.db")},
        },
    }
    cfg = work / f"proxy-{cmd.label}.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log = work / f"proxy-{cmd.label}.log"
    proc = cmd.start("proxy", "-c", str(cfg), log=log)
    try:
        settle_s = wait_linked(proc, log, {"api"}, 60)
        out: dict[str, Any] = {"settle_s": round(settle_s, 1), "settled": readings(proc.pid)}
        out["scrape_bytes"] = scrape(f"http://127.0.0.1:{port}/_netwatch/metrics", args.scrapes)
        time.sleep(args.idle)
        out["end"] = readings(proc.pid)
        out["threads"] = threads(proc.pid)
    finally:
        terminate(proc)
    return out


def measure_imports(cmd: Command, target: tuple[str, int], work: Path) -> dict[str, Any]:
    listen = f"127.0.0.1:{free_port()}"
    cfg = work / f"imports-{cmd.label}.yaml"
    cfg.write_text(yaml.safe_dump(site_config([target], 1.0, listen)))
    log = work / f"imports-{cmd.label}.log"
    meter = work / f"imports-{cmd.label}.json"
    path = os.pathsep.join(p for p in (str(IMPORT_METER), cmd.env.get("PYTHONPATH", "")) if p)
    env = {
        "PYTHONPROFILEIMPORTTIME": "1",
        "PYTHONPATH": path,
        "NETWATCH_BENCH_IMPORT_RSS": str(meter),
    }
    proc = cmd.start("run", "-c", str(cfg), log=log, env=env)
    try:
        wait_linked(proc, log, {"t0000"}, 60)
        scrape(f"http://{listen}/metrics", 1)
    finally:
        terminate(proc)
    times = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("import time:") and "|" in line:
            own, total, name = (part.strip() for part in line[len("import time:") :].split("|"))
            if own.isdigit():
                times.append((name, int(own) / 1000, int(total) / 1000))
    slowest = sorted(times, key=lambda t: -t[2])[:TOP]
    rss: dict[str, Any] = json.loads(meter.read_text()) if meter.exists() else {}
    per_package: collections.Counter[str] = collections.Counter()
    for name, grown in rss.get("modules", {}).items():
        parts = name.split(".")
        unit = ".".join(parts[:2]) if parts[0] in ("netwatch", "probes") else parts[0]
        per_package[unit] += grown
    return {
        "modules": len(times),
        "slowest": [{"module": n, "self_ms": s, "cumulative_ms": c} for n, s, c in slowest],
        "start_mb": rss.get("start", math.nan) / 1e6,
        "end_mb": rss.get("end", math.nan) / 1e6,
        "imported_mb": sum(per_package.values()) / 1e6,
        "packages": [{"package": p, "mb": b / 1e6} for p, b in per_package.most_common(TOP)],
    }


# --- report ---------------------------------------------------------------------------------


def print_report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    labels = list(results)
    width = 12
    head = f"{'':<52}" + "".join(f"{label:>{width}}" for label in labels)

    def row(text: str, values: list[Any]) -> None:
        print(f"{text:<52}" + "".join(f"{v:>{width}}" for v in values))

    print(f"\nnetwatch run, {args.targets:,} TCP targets every {args.interval:g} s")
    print(head)
    runs = [results[label]["run"] for label in labels]
    row("  settled after (s)", [r["settle_s"] for r in runs])
    row("  peak RSS when settled, before any scrape (MB)", [r["settled"]["peak_mb"] for r in runs])
    row(f"  peak RSS after {args.scrapes} scrapes (VmHWM, MB)", [r["end"]["peak_mb"] for r in runs])
    row("  RSS now (VmRSS, MB)", [r["end"]["rss_mb"] for r in runs])
    row("  threads", [r["threads"] for r in runs])
    row("  one /metrics scrape (bytes)", [f"{r['scrape_bytes']:,}" for r in runs])
    row(
        f"  goal: peak < {RSS_GOAL_MB:g} MB",
        ["PASS" if r["end"]["peak_mb"] < RSS_GOAL_MB else "MISS" for r in runs],
    )
    print(
        f"\nnetwatch proxy, idle (guard probed every 2 s, {args.scrapes} scrapes, {args.idle:g} s)"
    )
    print(head)
    proxies = [results[label]["proxy"] for label in labels]
    row("  peak RSS when settled (MB)", [p["settled"]["peak_mb"] for p in proxies])
    row("  peak RSS at the end (VmHWM, MB)", [p["end"]["peak_mb"] for p in proxies])
    row("  RSS now (VmRSS, MB)", [p["end"]["rss_mb"] for p in proxies])
    row("  threads", [p["threads"] for p in proxies])
    for label in labels:
        imp = results[label]["imports"]
        print(f"\nimports of `run` ({label}): {imp['modules']} modules")
        print(f"  {'slowest (cumulative)':<44}{'self ms':>9}{'cum. ms':>9}")
        for t in imp["slowest"]:
            print(f"  {t['module']:<44}{t['self_ms']:>9.1f}{t['cumulative_ms']:>9.1f}")
        print(
            f"  resident memory: {imp['start_mb']:.1f} MB at interpreter start, "
            f"+{imp['imported_mb']:.1f} MB while importing, {imp['end_mb']:.1f} MB at exit"
        )
        print(f"  {'package (own growth while imported)':<44}{'MB':>9}")
        for p in imp["packages"]:
            print(f"  {p['package']:<44}{p['mb']:>9.2f}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=int, default=1000)
    p.add_argument("--interval", type=float, default=10.0, help="probe interval, s")
    p.add_argument("--scrapes", type=int, default=3, help="scrapes of /metrics, 1 s apart")
    p.add_argument("--idle", type=float, default=5.0, help="proxy: seconds idle before reading")
    p.add_argument("--netwatch-cmd", default=NETWATCH, help="command that runs netwatch's CLI")
    p.add_argument("--baseline-cmd", default=None, help="another one, measured in the same run")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    if not 1 <= args.targets <= 5000 or args.scrapes < 1:
        p.error("--targets 1..5000, --scrapes >= 1")
    return args


def main() -> int:
    args = parse_args()
    commands = [Command.parse("candidate", args.netwatch_cmd)]
    if args.baseline_cmd:
        commands.insert(0, Command.parse("baseline", args.baseline_cmd))
    hosts = math.ceil(args.targets / PORTS_PER_HOST)
    tcp, addrs = _loopback.start("tcp-server", f"--hosts={hosts}", f"--ports={PORTS_PER_HOST}")
    targets = [(str(h), int(p)) for h, p in addrs][: args.targets]  # type: ignore[attr-defined]
    upstream, upstream_port = _upstream.start("serve")
    results: dict[str, dict[str, Any]] = {c.label: {} for c in commands}
    try:
        with tempfile.TemporaryDirectory(prefix="memory-") as tmp:
            work = Path(tmp)
            for cmd in commands:  # writes the bytecode caches of what run and proxy import
                print(f"[{time.strftime('%H:%M:%S')}] warm-up: {cmd.label} ...", file=sys.stderr)
                warm = argparse.Namespace(**{**vars(args), "interval": 1.0, "idle": 0.0})
                measure_run(cmd, targets[:1], warm, work)
                measure_proxy(cmd, upstream_port, warm, work)
            for name, order in (("run", commands), ("proxy", commands[::-1])):
                for cmd in order:
                    print(f"[{time.strftime('%H:%M:%S')}] {name}: {cmd.label} ...", file=sys.stderr)
                    if name == "run":
                        results[cmd.label]["run"] = measure_run(cmd, targets, args, work)
                    else:
                        results[cmd.label]["proxy"] = measure_proxy(cmd, upstream_port, args, work)
            for cmd in commands:
                print(f"[{time.strftime('%H:%M:%S')}] imports: {cmd.label} ...", file=sys.stderr)
                results[cmd.label]["imports"] = measure_imports(cmd, targets[0], work)
    finally:
        stop(tcp)
        stop(upstream)
    print_report(results, args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items() if k != "output"}
    args.output.write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    print(f"\nwritten: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
