"""``netwatch status`` prints times in the site's time zone and names it."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from netwatch.oneshot import render_status


def rendered(data: dict[str, Any]) -> str:
    console = Console(record=True, width=160, color_system=None)
    render_status(data, console)
    return console.export_text()


def test_daemon_times_are_in_the_site_time_zone() -> None:
    text = rendered(
        {
            "site": {"id": "q1", "name": "", "timezone": "Asia/Ho_Chi_Minh"},
            "version": "0.1.0",
            "peak": False,
            "uptime_s": 6,
            "targets": [
                {
                    "name": "popdb-api",
                    "type": "http",
                    "state": "down",
                    "since": "2026-11-27T05:53:29.120000+00:00",
                    "last": {},
                },
            ],
            "proxy": {
                "mode": "offline",
                "reason": "guard down",
                "since": "2026-11-27T23:10:00+00:00",
                "backlog": 2,
                "queue": {"depth": 2, "oldest_age_s": 3, "dead": 0},
            },
        }
    )
    assert "times in Asia/Ho_Chi_Minh" in text
    assert "2026-11-27 12:53:29" in text  # UTC+7
    assert "since 2026-11-28 06:10:00 (Asia/Ho_Chi_Minh)" in text  # the next day there


def test_a_stand_alone_proxy_status_uses_its_site_time_zone() -> None:
    text = rendered(
        {
            "site": {"id": "(station proxy)"},
            "role": "proxy",
            "targets": [],
            "proxy": {
                "mode": "online",
                "reason": "guard ok",
                "guard": {},
                "since": "2026-11-27T00:00:00+00:00",
                "site": {"id": "q1", "timezone": "Asia/Ho_Chi_Minh"},
                "queue": {"depth": 0, "oldest_age_s": 0, "dead": 0},
            },
        }
    )
    assert "since 2026-11-27 07:00:00 (Asia/Ho_Chi_Minh)" in text
