"""Config scalars as operators write them: ``500ms``, ``512MiB``, ``50/s``, ``"07:30"``.

Each parser is a plain function (usable from the CLI too) and an ``Annotated`` type for the
pydantic schema in ``netwatch.config.schema``. Parsers raise ``ValueError`` even for wrong types,
because pydantic only turns ``ValueError``/``AssertionError`` into validation errors; a
``TypeError`` would escape as a crash instead of a config problem line.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BeforeValidator

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_TIME_RE = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_duration(value: Any) -> float:
    """``500ms``, ``5s``, ``2m``, ``72h``, ``1d`` (or a bare number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 5s, 2m or 72h")  # noqa: TRY004
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration (use 500ms, 5s, 2m, 72h)")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    return seconds


def parse_size(value: Any) -> int:
    """``512MiB``, ``1GiB``, ``10MB`` or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB")  # noqa: TRY004
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a size (use 512MiB, 1GiB)")
        size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


def parse_rate(value: Any) -> float:
    """``50/s``, ``300/m`` -> events per second."""
    if isinstance(value, bool):
        raise ValueError("expected a rate such as 50/s")  # noqa: TRY004
    if isinstance(value, int | float):
        rate = float(value)
    else:
        match = _RATE_RE.match(str(value))
        if not match:
            raise ValueError(f"{value!r} is not a rate (use 50/s or 300/m)")
        rate = float(match.group(1)) / {"s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2)]
    if rate <= 0:
        raise ValueError("a rate must be positive")
    return rate


def parse_time_of_day(value: Any) -> str:
    """``"07:30"`` -> ``"07:30"`` (validated, zero-padded)."""
    if isinstance(value, int) and not isinstance(value, bool):
        # A YAML 1.1 parser reads unquoted 7:30 as the sexagesimal integer 450. The netwatch
        # loader keeps such scalars as text, so this only fires for other callers.
        hint = f"{value // 60:02d}:{value % 60:02d}"
        raise ValueError(f'write times of day as text, e.g. "{hint}"')  # noqa: TRY004
    match = _TIME_RE.match(str(value))
    if not match:
        raise ValueError(f'{value!r} is not a time of day (use "HH:MM", 00:00-23:59)')
    return f"{int(match.group(1)):02d}:{match.group(2)}"


def parse_days(value: Any) -> tuple[str, ...]:
    """``[mon, tue]``, ``[mon-fri]`` or ``"mon-fri"`` -> ordered weekday names."""
    if not isinstance(value, str | list | tuple):
        raise ValueError("expected a list of days such as [mon-fri, sat]")  # noqa: TRY004
    items = [value] if isinstance(value, str) else list(value)
    days: set[int] = set()
    for item in items:
        text = str(item).strip().lower()
        if "-" in text:
            first, _, last = text.partition("-")
            if first not in DAYS or last not in DAYS:
                raise ValueError(f"{item!r} is not a day range (use mon-fri)")
            lo, hi = DAYS.index(first), DAYS.index(last)
            # A range may wrap the week: fri-mon is fri, sat, sun, mon.
            span = range(lo, hi + 1) if lo <= hi else [*range(lo, 7), *range(hi + 1)]
            days.update(span)
        elif text in DAYS:
            days.add(DAYS.index(text))
        else:
            raise ValueError(f"{item!r} is not a day (use mon, tue, wed, thu, fri, sat, sun)")
    if not days:
        raise ValueError("at least one day is needed")
    return tuple(DAYS[d] for d in sorted(days))


def split_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (as ``check_listen`` accepts it) as the host, brackets off, and port."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return value


def check_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown timezone {value!r} (use an IANA name such as Asia/Ho_Chi_Minh)"
        ) from None
    return value


def check_name(value: str) -> str:
    # Names end up in Prometheus labels, MQTT topics and file names: keep them plain.
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name (letters, digits, '_', '.', '-'; at most 63)"
        )
    return value


def check_host(value: str) -> str:
    """A host name or an IP address; an IPv6 literal may come bracketed (kept bare)."""
    if not value.strip():
        raise ValueError("a host is needed (a name or an IP address)")
    if any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not a host name or IP address (it has spaces)")
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    if ":" in bare or bare != value:
        # Only an IPv6 literal has colons; anything else is HOST:PORT or a typo, which the
        # resolver would only report at run time, as a name that does not resolve.
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            raise ValueError(
                f"{value!r} is not a host name or IP address (HOST:PORT? the port is its own key)"
            ) from None
    return bare


def check_http_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value


def check_mqtt_url(value: str) -> str:
    if not re.match(r"^mqtts?://[^/\s]+", value):
        raise ValueError(f"{value!r} is not an mqtt:// or mqtts:// URL")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Rate = Annotated[float, BeforeValidator(parse_rate)]
TimeOfDay = Annotated[str, BeforeValidator(parse_time_of_day)]
Days = Annotated[tuple[str, ...], BeforeValidator(parse_days)]
Listen = Annotated[str, AfterValidator(check_listen)]
Timezone = Annotated[str, AfterValidator(check_timezone)]
Name = Annotated[str, AfterValidator(check_name)]
Host = Annotated[str, AfterValidator(check_host)]
HttpUrl = Annotated[str, AfterValidator(check_http_url)]
MqttUrl = Annotated[str, AfterValidator(check_mqtt_url)]
