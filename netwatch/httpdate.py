"""The ``Date`` header's value (RFC 9110, IMF-fixdate), formatted at most once a second:
every response of the hand-written servers carries one."""

from __future__ import annotations

import time
from email.utils import formatdate

_cached: tuple[int, str] = (0, "")


def http_date() -> str:
    global _cached  # noqa: PLW0603 - one cache for the process, read on every response
    now = int(time.time())
    second, text = _cached
    if second != now:
        text = formatdate(now, usegmt=True)
        _cached = (now, text)
    return text
