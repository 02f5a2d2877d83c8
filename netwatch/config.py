"""YAML config -> pydantic schema -> frozen settings, parsed once at the edge.

``load_config(path)`` is the only entry point the rest of netwatch uses. Every problem
becomes one line of a ``ConfigError`` naming the key path and the file line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from netwatch.errors import ConfigError

# --- scalar types -------------------------------------------------------------------------

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
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def parse_duration(value: Any) -> float:
    """``500ms``, ``5s``, ``2m``, ``72h``, ``1d`` (or a bare number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 5s, 2m or 72h")
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
        raise ValueError("expected a size such as 512MiB")
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
        raise ValueError("expected a rate such as 50/s")
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
    if isinstance(value, int):
        # YAML 1.1 reads an unquoted 07:30 as a sexagesimal integer (450).
        raise ValueError(f"write times of day in quotes, e.g. \"{value // 60:02d}:{value % 60:02d}\"")
    match = _TIME_RE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a time of day (use \"HH:MM\", 00:00-23:59)")
    return f"{int(match.group(1)):02d}:{match.group(2)}"


def parse_days(value: Any) -> tuple[str, ...]:
    """``[mon, tue]``, ``[mon-fri]`` or ``"mon-fri"`` -> ordered weekday names."""
    items = [value] if isinstance(value, str) else list(value)
    days: set[int] = set()
    for item in items:
        text = str(item).strip().lower()
        if "-" in text:
            first, _, last = text.partition("-")
            if first not in _DAYS or last not in _DAYS:
                raise ValueError(f"{item!r} is not a day range (use mon-fri)")
            lo, hi = _DAYS.index(first), _DAYS.index(last)
            span = range(lo, hi + 1) if lo <= hi else [*range(lo, 7), *range(hi + 1)]
            days.update(span)
        elif text in _DAYS:
            days.add(_DAYS.index(text))
        else:
            raise ValueError(f"{item!r} is not a day (use mon, tue, wed, thu, fri, sat, sun)")
    if not days:
        raise ValueError("at least one day is needed")
    return tuple(_DAYS[d] for d in sorted(days))


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    return value


def _check_timezone(value: str) -> str:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {value!r}") from None
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Rate = Annotated[float, BeforeValidator(parse_rate)]
TimeOfDay = Annotated[str, BeforeValidator(parse_time_of_day)]
Days = Annotated[tuple[str, ...], BeforeValidator(parse_days)]
Listen = Annotated[str, AfterValidator(_check_listen)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- sections -----------------------------------------------------------------------------


class Site(Frozen):
    id: Name
    name: str = ""
    timezone: Annotated[str, AfterValidator(_check_timezone)] = "Asia/Ho_Chi_Minh"


class PeakWindow(Frozen):
    days: Days = ("mon", "tue", "wed", "thu", "fri")
    start: TimeOfDay
    end: TimeOfDay

    @model_validator(mode="after")
    def _start_before_end(self) -> PeakWindow:
        if self.start == self.end:
            raise ValueError("start and end are equal: the window would be empty")
        return self


class Defaults(Frozen):
    interval: Duration = 5.0
    timeout: Duration = 2.0


class _TargetBase(Frozen):
    name: Name
    interval: Duration | None = None
    timeout: Duration | None = None


class IcmpTarget(_TargetBase):
    type: Literal["icmp"]
    host: str
    count: Annotated[int, Field(ge=1, le=100)] = 5
    spacing: Duration = 0.2
    privileged: Literal["auto", "yes", "no"] = "auto"
    fallback_tcp_port: Annotated[int, Field(ge=1, le=65535)] | None = None


class TcpTarget(_TargetBase):
    type: Literal["tcp"]
    host: str
    port: Annotated[int, Field(ge=1, le=65535)]


class HttpTarget(_TargetBase):
    type: Literal["http"]
    url: Annotated[str, Field(pattern=r"^https?://.+")]
    method: Literal["GET", "HEAD", "POST"] = "GET"
    expect_status: tuple[Annotated[int, Field(ge=100, le=599)], ...] = (200,)
    body_regex: str | None = None
    verify_tls: bool = True
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _regex_compiles(self) -> HttpTarget:
        if self.body_regex is not None:
            try:
                re.compile(self.body_regex)
            except re.error as exc:
                raise ValueError(f"body_regex does not compile: {exc}") from None
        return self


class DnsTarget(_TargetBase):
    type: Literal["dns"]
    query: str
    record: Literal["A", "AAAA"] = "A"
    server: str | None = None
    expect: tuple[str, ...] = ()


class TlsTarget(_TargetBase):
    type: Literal["tls"]
    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 443
    server_name: str | None = None
    verify: bool = True
    ca_file: str | None = None


Target = Annotated[
    IcmpTarget | TcpTarget | HttpTarget | DnsTarget | TlsTarget, Field(discriminator="type")
]


class Link(Frozen):
    fail_after: Annotated[int, Field(ge=1, le=100)] = 3
    recover_after: Annotated[int, Field(ge=1, le=100)] = 3
    degraded_latency: Duration = 0.8
    degraded_loss: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2


class Metrics(Frozen):
    listen: Listen = "127.0.0.1:9108"


class Scheduler(Frozen):
    max_concurrency: Annotated[int, Field(ge=1, le=10000)] = 512


class Mqtt(Frozen):
    url: Annotated[str, Field(pattern=r"^mqtts?://.+")] = "mqtt://127.0.0.1:1883"
    prefix: str = "netwatch/v1"
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: Duration = 30.0
    alert_buffer: Annotated[int, Field(ge=1, le=100000)] = 1000


class Webhook(Frozen):
    url: Annotated[str, Field(pattern=r"^https?://.+")]
    headers: dict[str, str] = Field(default_factory=dict)


class Notify(Frozen):
    webhooks: tuple[Webhook, ...] = ()
    hold_down: Duration = 30.0


class Replayable(Frozen):
    methods: tuple[Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"], ...] = (
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
    )
    path: str = "/api/*"


class Queue(Frozen):
    path: str = "/var/lib/netwatch/queue.db"
    max_bytes: Size = 1024**3
    max_age: Duration = 72 * 3600.0
    key_file: str | None = None


class Replay(Frozen):
    rate: Rate = 50.0
    peak_rate: Rate = 5.0
    backoff_initial: Duration = 0.5
    backoff_max: Duration = 60.0


class Proxy(Frozen):
    listen: Listen = "127.0.0.1:8080"
    upstream: Annotated[str, Field(pattern=r"^https?://.+")]
    guard: tuple[Name, ...] = ()
    replayable: tuple[Replayable, ...] = (Replayable(),)
    queue: Queue = Queue()
    replay: Replay = Replay()
    max_body: Size = 10 * 1024**2
    connect_timeout: Duration = 2.0
    request_timeout: Duration = 30.0
    ca_file: str | None = None


class Config(Frozen):
    site: Site
    peak_hours: tuple[PeakWindow, ...] = ()
    defaults: Defaults = Defaults()
    targets: tuple[Target, ...] = ()
    link: Link = Link()
    metrics: Metrics = Metrics()
    scheduler: Scheduler = Scheduler()
    mqtt: Mqtt | None = None
    notify: Notify = Notify()
    proxy: Proxy | None = None

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        seen: set[str] = set()
        for target in self.targets:
            if target.name in seen:
                raise ValueError(f"duplicate target name {target.name!r}")
            seen.add(target.name)
        if self.proxy is not None:
            for guard in self.proxy.guard:
                if guard not in seen:
                    raise ValueError(f"proxy.guard names unknown target {guard!r}")
        return self

    def interval_of(self, target: IcmpTarget | TcpTarget | HttpTarget | DnsTarget | TlsTarget) -> float:
        return target.interval or self.defaults.interval

    def timeout_of(self, target: IcmpTarget | TcpTarget | HttpTarget | DnsTarget | TlsTarget) -> float:
        return target.timeout or self.defaults.timeout


AnyTarget = IcmpTarget | TcpTarget | HttpTarget | DnsTarget | TlsTarget


# --- loading ------------------------------------------------------------------------------


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse YAML text; every problem becomes a line of one ``ConfigError``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping at the top level")
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            path = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{source}: {path}: {err['msg']}")
        raise ConfigError(lines) from None


def load_config(path: str | Path) -> Config:
    """Read and parse a config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror or exc}") from None
    return parse_config(text, str(p))
