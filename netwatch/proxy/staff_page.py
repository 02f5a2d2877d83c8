"""The counter staff's page, ``GET /_netwatch/`` on the station proxy.

One self-contained HTML file (``staff_page.html``, package data): inline CSS and script, no
font, image or library from anywhere, so it loads from the proxy with the link down. The
script reads the proxy's status every few seconds and says in plain words, Vietnamese by
default (``?lang=en`` for English), whether applications are sent now or kept and sent later.

Its data URL is ``/_netwatch/status``, or ``/_netwatch/public`` when ``proxy.admin_token``
protects the status: the public view keeps only what the page shows (mode, counts, times),
nothing about the upstream, guards or overrides.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import cache
from importlib.resources import files
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

LANGUAGES = ("vi", "en")
REFRESH_MS = 3000  # the contract asks for at least every 5 s

# The page may talk to its own origin only: a typo cannot make it fetch from outside.
_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@cache
def _template() -> str:
    return files("netwatch.proxy").joinpath("staff_page.html").read_text(encoding="utf-8")


def render(lang: str, data_url: str) -> str:
    """The page in ``lang`` (``vi`` unless ``en``), reading its data from ``data_url``."""
    lang = lang if lang in LANGUAGES else "vi"
    return (
        _template()
        .replace("{{LANG}}", lang)
        .replace("{{DATA_URL}}", data_url)
        .replace("{{REFRESH_MS}}", str(REFRESH_MS))
    )


def staff_page(data_url: str) -> Handler:
    """The ``GET /_netwatch/`` handler."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            text=render(request.query.get("lang", "vi"), data_url),
            content_type="text/html",
            charset="utf-8",
            headers=_HEADERS,
        )

    return page


def public_status(status: dict[str, Any]) -> dict[str, Any]:
    """What the page needs of the proxy's status, and nothing else."""
    queue = status.get("queue") or {}
    public = {
        key: status.get(key)
        for key in ("mode", "since", "backlog", "last_delivered_at", "checked_at", "site")
    }
    public["queue"] = {
        key: queue[key] for key in ("depth", "oldest_age_s", "dead", "in_doubt") if key in queue
    }
    if "in_doubt" in status:
        public["in_doubt"] = status["in_doubt"]
    return public
