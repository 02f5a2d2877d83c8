"""One-shot commands: ``netwatch probe`` and ``netwatch status`` (parsing and rendering)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from rich.console import Console
from rich.table import Table

import probes
from netwatch.config.schema import parse_duration
from netwatch.errors import DaemonError, UsageError
from netwatch.pathcmd import path_line, render_path
from probes import ProbeResult
from probes.path import PathProbe

_SECONDS_DETAILS = frozenset({"min", "avg", "max", "jitter", "resolve"})
_STATE_STYLE = {"up": "green", "degraded": "yellow", "down": "bold red", "unknown": "dim"}
_MODE_STYLE = {"online": "green", "replaying": "yellow", "offline": "bold red"}


def _host_port(target: str, default_port: int | None) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if sep and port.isdigit() and host:
        return host.strip("[]"), int(port)
    if default_port is None:
        raise UsageError(f"{target!r}: expected HOST:PORT")
    return target.strip("[]"), default_port


def probe_params(
    probe_type: str,
    target: str,
    *,
    count: int,
    expect_status: tuple[int, ...],
    body_regex: str | None,
    insecure: bool,
    record: str,
    server: str | None,
    expect: tuple[str, ...],
    rounds: int = 3,
    max_hops: int = 30,
    protocol: str = "auto",
) -> dict[str, Any]:
    """Turn the command line into the probe's keyword parameters."""
    if probe_type == "icmp":
        return {"host": target, "count": count}
    if probe_type == "path":
        return {"host": target, "rounds": rounds, "max_hops": max_hops, "protocol": protocol}
    if probe_type == "tcp":
        host, port = _host_port(target, None)
        return {"host": host, "port": port}
    if probe_type == "http":
        if not target.startswith(("http://", "https://")):
            raise UsageError(f"{target!r}: expected an http:// or https:// URL")
        return {
            "url": target,
            "expect_status": expect_status or (200,),
            "body_regex": body_regex,
            "verify_tls": not insecure,
        }
    if probe_type == "dns":
        return {"query": target, "record": record, "server": server, "expect": expect}
    host, port = _host_port(target, 443)
    return {"host": host, "port": port, "verify": not insecure}


def run_probe(probe_type: str, params: dict[str, Any], timeout: str) -> ProbeResult:
    try:
        seconds = parse_duration(timeout)
    except ValueError as exc:
        raise UsageError(f"--timeout: {exc}") from None
    try:
        probe = probes.create(probe_type, **params)
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None

    if isinstance(probe, PathProbe):
        seconds = probe.budget(seconds)  # the timeout is each answer's, not the trace's

    async def once() -> ProbeResult:
        try:
            return await probe.run(seconds)
        finally:
            if probe_type == "http":
                from probes.http import close_shared_sessions  # noqa: PLC0415 - http only

                await close_shared_sessions()

    return asyncio.run(once())


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def render_result(result: ProbeResult, console: Console | None = None) -> None:
    console = console or Console()
    if result.type == "path":
        render_path(result, console)
        return
    verdict = "[green]ok[/]" if result.success else f"[bold red]failed[/] ({result.error})"
    console.print(f"{result.type} {result.target}: {verdict}  latency {_ms(result.latency)}")
    if result.message:
        console.print(f"  {result.message}")
    if result.loss is not None and result.type == "icmp":
        console.print(f"  loss {result.loss:.0%}")
    for phase, seconds in result.phases.items():
        console.print(f"  {phase:<11} {_ms(seconds)}")
    for key, value in result.details.items():
        if key in _SECONDS_DETAILS and isinstance(value, float):
            console.print(f"  {key}: {_ms(value)}")
        elif isinstance(value, float):
            console.print(f"  {key}: {value:.2f}")
        else:
            console.print(f"  {key}: {value}")


def _get_json(endpoint: str, timeout: float, token: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = Request(endpoint, headers=headers)  # noqa: S310 - the operator's own URL
    with urlopen(request, timeout=timeout) as resp:  # noqa: S310 - the operator's own URL
        data: dict[str, Any] = json.load(resp)
        return data


def _refused(endpoint: str, exc: HTTPError, token: str | None) -> DaemonError:
    if exc.code == 401:
        hint = "the token was refused" if token else "it needs a token: --token or NETWATCH_TOKEN"
        return DaemonError(f"{endpoint} answered 401 Unauthorized: {hint}")
    return DaemonError(f"{endpoint} answered {exc.code} {exc.reason}")


def fetch_status(url: str, timeout: float = 5.0, token: str | None = None) -> dict[str, Any]:
    """The status of a site daemon, or of a stand-alone ``netwatch proxy`` (which has only
    its ``/_netwatch/status``: shown as a daemon status with a proxy and no targets).
    ``token``: the bearer token (``metrics.token`` or ``proxy.admin_token``)."""
    base = url.rstrip("/")
    endpoint = base + "/api/v1/status"
    try:
        return _get_json(endpoint, timeout, token)
    except HTTPError as exc:
        if exc.code != 404:
            raise _refused(endpoint, exc, token) from None
    except (URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DaemonError(f"cannot reach the daemon at {endpoint}: {reason}") from None
    endpoint = base + "/_netwatch/status"
    try:
        proxy = _get_json(endpoint, timeout, token)
    except HTTPError as exc:
        if exc.code == 401:
            raise _refused(endpoint, exc, token) from None
        raise DaemonError(f"{url} is neither a netwatch daemon nor a station proxy") from exc
    except (URLError, OSError, ValueError) as exc:
        raise DaemonError(f"{url} is neither a netwatch daemon nor a station proxy") from exc
    return {"site": {"id": "(station proxy)"}, "role": "proxy", "targets": [], "proxy": proxy}


def _zone(data: dict[str, Any]) -> tuple[ZoneInfo | None, str]:
    """The site's time zone, from the daemon's or the proxy's status; local time without."""
    name = (data.get("site") or {}).get("timezone") or (
        (data.get("proxy") or {}).get("site") or {}
    ).get("timezone")
    try:
        return (ZoneInfo(name), name) if name else (None, "local time")
    except (ZoneInfoNotFoundError, ValueError):
        return None, "local time"


def _local(iso: str | None, zone: ZoneInfo | None) -> str:
    """An ISO time from the daemon as ``YYYY-MM-DD HH:MM:SS`` in the site's time zone."""
    if not iso:
        return "-"
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S")


def render_status(data: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    zone, zone_name = _zone(data)
    site = data.get("site", {})
    if "version" in data:
        peak = "[yellow]peak hours[/]" if data.get("peak") else "off-peak"
        console.print(
            f"[bold]{site.get('id')}[/] {site.get('name', '')}  netwatch {data.get('version')}  "
            f"{peak}  up {data.get('uptime_s', 0):.0f}s"
        )
    else:
        guards = (data.get("proxy") or {}).get("guard") or {}
        console.print(
            "[bold]station proxy[/]  guard: "
            + (", ".join(f"{name} {state}" for name, state in guards.items()) or "none")
        )
    _render_fault(console, data)
    if not data.get("targets"):
        _render_proxy(console, data)
        return
    table = Table(
        "target",
        "type",
        "role",
        "state",
        "since",
        "latency",
        "loss",
        "last error",
        caption=f"times in {zone_name}",
        caption_justify="left",
    )
    for t in data.get("targets", []):
        last = t.get("last") or {}
        state = t.get("state", "unknown")
        loss = last.get("loss")
        table.add_row(
            t.get("name"),
            t.get("type"),
            t.get("role", "service"),
            f"[{_STATE_STYLE.get(state, '')}]{state}[/]",
            _local(t.get("since"), zone),
            "-" if last.get("latency_ms") is None else f"{last['latency_ms']:.1f} ms",
            "-" if loss is None else f"{loss:.0%}",
            last.get("error") or "",
        )
    console.print(table)
    for t in data.get("targets", []):
        if t.get("path"):
            console.print(path_line(t.get("name", "?"), t["path"]))
    _render_proxy(console, data)


def _render_fault(console: Console, data: dict[str, Any]) -> None:
    site = data.get("site", {})
    labels = [f"{k} {site[k]}" for k in ("district", "isp", "uplink") if site.get(k)]
    if labels:
        console.print("  " + " · ".join(labels))
    fault = data.get("fault")
    if not fault:
        return
    domain = fault.get("domain", "none")
    style = "green" if domain == "none" else "bold red"
    line = f"fault [{style}]{domain}[/] since {(fault.get('since') or '-')[:19]}"
    if domain != "none":
        line += f" ({fault.get('reason', '')})"
    if fault.get("degraded", "none") not in ("none", domain):
        line += f"  degraded: {fault['degraded']}"
    console.print(line)


def _render_proxy(console: Console, data: dict[str, Any]) -> None:
    proxy = data.get("proxy")
    if proxy:
        zone, zone_name = _zone(data)
        mode = proxy.get("mode", "?")
        queue = proxy.get("queue") or {}
        waiting = proxy.get("backlog", queue.get("depth", 0))
        console.print(
            f"proxy [{_MODE_STYLE.get(mode, '')}]{mode}[/] ({proxy.get('reason', '')}) "
            f"since {_local(proxy.get('since'), zone)} ({zone_name})"
        )
        console.print(
            f"queue {waiting} waiting, oldest {queue.get('oldest_age_s', 0):.0f}s, "
            f"{queue.get('dead', 0)} dead"
        )
    mqtt = data.get("mqtt")
    if mqtt:
        console.print(f"mqtt {'connected' if mqtt.get('connected') else 'disconnected'}")
