"""``netwatch probe path HOST``: the trace as an mtr-style table (``--json`` for the raw)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from probes import ProbeResult


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def render_path(result: ProbeResult, console: Console) -> None:
    """One row per hop: address, loss, sent, and RTT avg / best / worst in ms."""
    details: dict[str, Any] = dict(result.details)
    verdict = (
        "[green]reached[/]" if result.success else f"[bold red]not reached[/] ({result.error})"
    )
    how = ""
    if "address" in details:
        how = f" ({details['address']}, {details['protocol']}, {details['rounds']} rounds)"
    console.print(f"path {result.target}{how}: {verdict}")
    if result.message:
        console.print(f"  {result.message}")
    hops = details.get("hops") or []
    if not hops:
        return
    table = Table("hop", "address", "loss", "sent", "avg ms", "best ms", "worst ms")
    for hop in hops:
        address = hop["address"] or "???"
        others = len(hop["addresses"]) - 1
        if others > 0:
            address += f" (+{others})"
        if hop["unreachable"]:
            address += " !unreachable"
        loss_style = "bold red" if hop["loss"] >= 1.0 else ("yellow" if hop["loss"] > 0 else "")
        table.add_row(
            str(hop["hop"]),
            address,
            f"[{loss_style}]{hop['loss']:.0%}[/]" if loss_style else f"{hop['loss']:.0%}",
            str(hop["sent"]),
            _ms(hop["rtt_avg"]),
            _ms(hop["rtt_min"]),
            _ms(hop["rtt_max"]),
        )
    console.print(table)
    loss_from = details.get("loss_from")
    console.print(
        f"last responding hop {details.get('last_hop') or '-'}; "
        f"loss starts at hop {loss_from if loss_from is not None else '- (none)'}"
    )


def path_line(name: str, path: dict[str, Any]) -> str:
    """One line per path target under ``netwatch status``: the route and where it breaks."""
    hops = path.get("hops") or []
    route = " > ".join(h.get("address") or "???" for h in hops)
    if path.get("reached"):
        loss = path.get("loss_from")
        tail = f", loss from hop {loss}" if loss else ""
        return f"path {name}: reached in {len(hops)} hops{tail}  {route}"
    return (
        f"path {name}: [bold red]not reached[/], last answer hop {path.get('last_hop') or '-'}, "
        f"loss from hop {path.get('loss_from') or '-'}  {route}"
    )
