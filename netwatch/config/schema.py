"""YAML config -> pydantic schema -> frozen settings, parsed once at the edge.

``load_config(path)`` is the only entry point the rest of netwatch uses. Every problem
becomes one line of a ``ConfigError``: ``FILE:LINE: KEY.PATH: message``, all problems at
once, so an operator fixes a file in one pass. The pieces:

- ``netwatch.config.yamlpos``: YAML -> plain data + the line of each key path, ``${ENV}``
  expansion, duplicate keys;
- ``netwatch.config.units``: durations, sizes, rates, times of day, day names;
- this module: the schema, cross-field checks, and turning it all into problem lines;
- ``netwatch.config.errors``: pydantic errors -> readable, located messages.

Every model is frozen (assignment raises) and mappings inside are read-only views.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from netwatch.config.errors import translate
from netwatch.config.units import (
    Days,
    Duration,
    Host,
    HttpUrl,
    Listen,
    MqttUrl,
    Name,
    Rate,
    Size,
    TimeOfDay,
    Timezone,
    parse_days,
    parse_duration,
    parse_rate,
    parse_size,
    parse_time_of_day,
)
from netwatch.config.yamlpos import KeyPath, Problem, YamlSyntaxError, format_path, load_yaml
from netwatch.errors import ConfigError
from netwatch.proxy.dedupe import bodyless_problem, parse_template
from probes.path import trace_budget

__all__ = [
    "AnyTarget",
    "Config",
    "Dedupe",
    "Defaults",
    "DnsTarget",
    "HttpTarget",
    "IcmpTarget",
    "Link",
    "Lookup",
    "LookupDedupe",
    "Metrics",
    "Mqtt",
    "Notify",
    "PathTarget",
    "PeakWindow",
    "Proxy",
    "Queue",
    "Replay",
    "Replayable",
    "Scheduler",
    "Site",
    "TcpTarget",
    "TlsTarget",
    "Webhook",
    "load_config",
    "parse_config",
    "parse_days",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "parse_time_of_day",
]

# Validation context flag: parse_config runs the cross-field checks itself, on the raw data,
# so that they are reported with their lines and alongside every other problem.
_LOCATED = "netwatch.located_cross_checks"

Port = Annotated[int, Field(ge=1, le=65535)]
# Read-only so that a frozen model is frozen all the way down.
Headers = Annotated[
    Mapping[str, str],
    AfterValidator(MappingProxyType),
    PlainSerializer(dict, return_type=dict[str, str]),
]


def _no_headers() -> Mapping[str, str]:
    return MappingProxyType({})


def _empty_is_none(value: Any) -> Any:
    # `${VAR:-}` is how a file says "optional secret": unset must mean absent, not "".
    return None if value == "" else value


OptionalText = Annotated[str | None, BeforeValidator(_empty_is_none)]


def _yes_no(value: Any) -> Any:
    # YAML 1.1 reads unquoted yes/no as booleans; the operator meant the words.
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- sections -----------------------------------------------------------------------------


class Site(Frozen):
    id: Name
    name: str = ""
    timezone: Timezone = "Asia/Ho_Chi_Minh"
    # City view: labels that let central rules group sites (netwatch_site_info).
    district: str = ""
    isp: str = ""
    uplink: str = ""


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


Role = Literal["gateway", "isp", "core", "service"]


class _TargetBase(Frozen):
    name: Name
    interval: Duration | None = None
    timeout: Duration | None = None
    # Where along the site's path the target sits (netwatch.monitor.fault reads it).
    role: Role = "service"


class IcmpTarget(_TargetBase):
    type: Literal["icmp"]
    host: Host
    count: Annotated[int, Field(ge=1, le=100)] = 5
    spacing: Duration = 0.2
    privileged: Annotated[Literal["auto", "yes", "no"], BeforeValidator(_yes_no)] = "auto"
    fallback_tcp_port: Port | None = None


class TcpTarget(_TargetBase):
    type: Literal["tcp"]
    host: Host
    port: Port


class HttpTarget(_TargetBase):
    type: Literal["http"]
    url: HttpUrl
    method: Literal["GET", "HEAD", "POST"] = "GET"
    expect_status: tuple[Annotated[int, Field(ge=100, le=599)], ...] = (200,)
    body_regex: OptionalText = None
    verify_tls: bool = True
    ca_file: OptionalText = None
    headers: Headers = Field(default_factory=_no_headers)

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
    server: OptionalText = None
    expect: tuple[str, ...] = ()


class TlsTarget(_TargetBase):
    type: Literal["tls"]
    host: Host
    port: Port = 443
    server_name: OptionalText = None
    verify: bool = True
    ca_file: OptionalText = None


class PathTarget(_TargetBase):
    type: Literal["path"]
    host: Host
    # A trace costs max_hops x rounds packets: its own, slower default interval.
    interval: Duration | None = 60.0
    rounds: Annotated[int, Field(ge=1, le=20)] = 3
    max_hops: Annotated[int, Field(ge=1, le=64)] = 30
    spacing: Duration = 0.5
    protocol: Literal["auto", "icmp", "udp"] = "auto"
    port: Annotated[int, Field(ge=1024, le=64000)] = 33434

    @field_validator("port")
    @classmethod
    def _port_needs_udp(cls, port: int, info: ValidationInfo) -> int:
        # Runs only when port is written (defaults are not validated).
        if info.data.get("protocol") == "icmp":
            raise ValueError(
                "port is used by protocol udp only (an icmp trace has no port): "
                "drop port, or use protocol udp or auto"
            )
        return port

    def worst_case(self, timeout: float) -> float:
        """How long one trace may take when nothing answers (the runner's budget)."""
        return trace_budget(timeout, self.rounds, self.spacing, self.max_hops)


AnyTarget = IcmpTarget | TcpTarget | HttpTarget | DnsTarget | TlsTarget | PathTarget
Target = Annotated[AnyTarget, Field(discriminator="type")]


class Link(Frozen):
    fail_after: Annotated[int, Field(ge=1, le=100)] = 3
    recover_after: Annotated[int, Field(ge=1, le=100)] = 3
    degraded_latency: Duration = 0.8
    degraded_loss: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2


class Metrics(Frozen):
    listen: Listen = "127.0.0.1:9108"
    # Bearer token for /metrics and /api/v1/status (``${ENV}`` recommended); none: open.
    token: OptionalText = None


class Scheduler(Frozen):
    max_concurrency: Annotated[int, Field(ge=1, le=10000)] = 512


class Mqtt(Frozen):
    url: MqttUrl = "mqtt://127.0.0.1:1883"
    prefix: str = "netwatch/v1"
    client_id: OptionalText = None
    username: OptionalText = None
    password: OptionalText = None
    ca_file: OptionalText = None
    cert_file: OptionalText = None
    key_file: OptionalText = None
    keepalive: Duration = 30.0
    alert_buffer: Annotated[int, Field(ge=1, le=100000)] = 1000


class Webhook(Frozen):
    url: HttpUrl
    headers: Headers = Field(default_factory=_no_headers)


class Notify(Frozen):
    webhooks: tuple[Webhook, ...] = ()
    hold_down: Duration = 30.0


Status = Annotated[int, Field(ge=100, le=599)]


class Lookup(Frozen):
    """How to ask the upstream whether an entry in doubt was applied (see proxy/dedupe.py)."""

    method: Literal["GET", "HEAD"] = "GET"
    url: str
    applied: tuple[Status, ...] = (200,)
    absent: tuple[Status, ...] = (404,)

    @model_validator(mode="after")
    def _valid(self) -> Lookup:
        parse_template(self.url)  # ValueError names the bad placeholder
        both = sorted(set(self.applied) & set(self.absent))
        if both:
            raise ValueError(f"status {both[0]} is both applied and absent")
        if not self.applied or not self.absent:
            raise ValueError("lookup needs at least one applied and one absent status")
        return self


class LookupDedupe(Frozen):
    lookup: Lookup


DEDUPE_NAMES = ("idempotency-key", "hold")


def _dedupe_kind(value: Any) -> str:
    return "dedupe-lookup" if isinstance(value, dict | LookupDedupe) else "dedupe-name"


def _dedupe_shape(value: Any) -> Any:
    # One clear message instead of one per member of the union.
    if not isinstance(value, dict | LookupDedupe) and value not in DEDUPE_NAMES:
        raise ValueError(
            f"expected idempotency-key, hold or {{lookup: {{url: ...}}}}, got {_show(value)}"
        )
    return value


def _show(value: Any) -> str:
    return "a list" if isinstance(value, list) else repr(value)


# idempotency-key: the upstream de-duplicates; hold: an operator decides; {lookup: ...}.
Dedupe = Annotated[
    Annotated[Literal["idempotency-key", "hold"], Tag("dedupe-name")]
    | Annotated[LookupDedupe, Tag("dedupe-lookup")],
    Discriminator(_dedupe_kind),
    BeforeValidator(_dedupe_shape),
]


class Replayable(Frozen):
    methods: tuple[Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"], ...] = (
        "POST",
        "PUT",
        "PATCH",
        "DELETE",
    )
    path: str = "/api/*"
    dedupe: Dedupe | None = None  # None: proxy.dedupe

    @model_validator(mode="after")
    def _lookup_fits(self) -> Replayable:
        problem = None if self.dedupe is None else bodyless_problem(self.dedupe, self.methods)
        if problem:
            raise ValueError(f"dedupe: {problem}")
        return self


class Queue(Frozen):
    path: str = "/var/lib/netwatch/queue.db"
    max_bytes: Size = 1024**3
    max_age: Duration = 72 * 3600.0
    key_file: OptionalText = None
    # Sealed at rest (AES-256-GCM) by default: without key_file, a key is created beside
    # the queue at first start (see crypto.default_key_path). false: plaintext.
    encrypt: bool = True
    # Concurrent enqueues share one fsync. Off (one commit per request) only to measure it.
    group_commit: bool = True


class Replay(Frozen):
    rate: Rate = 50.0
    peak_rate: Rate = 5.0
    backoff_initial: Duration = 0.5
    backoff_max: Duration = 60.0


class Proxy(Frozen):
    listen: Listen = "127.0.0.1:8080"
    upstream: HttpUrl
    guard: tuple[Name, ...] = ()
    # How a write in doubt is settled, for every replayable rule without its own dedupe.
    dedupe: Dedupe = "idempotency-key"
    replayable: tuple[Replayable, ...] = (Replayable(),)
    queue: Queue = Queue()
    replay: Replay = Replay()
    max_body: Size = 10 * 1024**2
    connect_timeout: Duration = 2.0
    # A replayable write still without response headers after this long is queued and
    # answered 202: on a black-holed link the counter does not hang for request_timeout.
    queue_after: Duration = 2.0
    request_timeout: Duration = 30.0
    ca_file: OptionalText = None
    # Slow and idle stations: a connection must complete its request head within
    # header_timeout of connecting, then each next one within idle_timeout of the last
    # answer; a buffered (replayable) body must arrive within body_timeout (else 408).
    # At most max_connections are open (lowered to fit the open-file limit); past it the
    # connection that waited longest for its request head makes room.
    header_timeout: Duration = 10.0
    idle_timeout: Duration = 75.0  # longer than clients keep idle connections (aiohttp 15 s)
    body_timeout: Duration = 30.0
    max_connections: Annotated[int, Field(ge=16, le=1_000_000)] = 4096
    # Bearer token for /_netwatch/status and /_netwatch/metrics; none: open.
    admin_token: OptionalText = None
    # Plain requests are served by the proxy's own HTTP/1.1 front (httptools); anything
    # else, and everything when this is off, by aiohttp's server. Off only to compare.
    fast_path: bool = True

    @model_validator(mode="after")
    def _default_lookup_fits(self) -> Proxy:
        for index, rule in enumerate(self.replayable):
            problem = None if rule.dedupe else bodyless_problem(self.dedupe, rule.methods)
            if problem:
                raise ValueError(f"dedupe (default of replayable[{index}]): {problem}")
        return self


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
    def _cross_checks(self, info: ValidationInfo) -> Config:
        if info.context and info.context.get(_LOCATED):
            return self
        guards = self.proxy.guard if self.proxy is not None else ()
        problems = _cross_problems([t.name for t in self.targets], guards)
        problems += self.timing_problems()
        if problems:
            raise ValueError("; ".join(f"{format_path(p)}: {m}" for p, m in problems))
        return self

    def timing_problems(self) -> list[tuple[KeyPath, str]]:
        """Traces that cannot finish within their interval: every round would be skipped
        while the path is broken, exactly when the trace is wanted."""
        problems: list[tuple[KeyPath, str]] = []
        for index, target in enumerate(self.targets):
            if target.type != "path":
                continue
            interval, timeout = self.interval_of(target), self.timeout_of(target)
            worst = target.worst_case(timeout)
            if interval < worst:
                problems.append(
                    (
                        ("targets", index, "interval"),
                        f"interval {interval:g}s is shorter than one trace may take "
                        f"({worst:.1f}s: timeout {timeout:g}s, {target.rounds} rounds "
                        f"{target.spacing:g}s apart, up to {target.max_hops} hops): raise "
                        "interval, or lower timeout, rounds, spacing or max_hops",
                    )
                )
        return problems

    def interval_of(self, target: AnyTarget) -> float:
        return target.interval or self.defaults.interval

    def timeout_of(self, target: AnyTarget) -> float:
        return target.timeout or self.defaults.timeout


def _cross_problems(names: Sequence[object], guards: Sequence[object]) -> list[tuple[KeyPath, str]]:
    """Checks across sections; works on raw YAML data and on validated models alike."""
    problems: list[tuple[KeyPath, str]] = []
    first: dict[str, int] = {}
    for index, name in enumerate(names):
        if not isinstance(name, str):
            continue
        if name in first:
            message = f"duplicate target name {name!r} (already used by targets[{first[name]}])"
            problems.append((("targets", index, "name"), message))
        else:
            first[name] = index
    for index, guard in enumerate(guards):
        if isinstance(guard, str) and guard not in first:
            close = difflib.get_close_matches(guard, list(first), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append((("proxy", "guard", index), f"unknown target {guard!r}{hint}"))
    return problems


# --- loading ------------------------------------------------------------------------------


def parse_config(
    text: str, source: str = "<config>", *, env: Mapping[str, str] | None = None
) -> Config:
    """Parse YAML text; every problem becomes a line of one ``ConfigError``.

    ``env`` replaces ``os.environ`` for ``${VAR}`` expansion (tests, ``check-config``).
    """
    try:
        doc = load_yaml(text, os.environ if env is None else env)
    except YamlSyntaxError as exc:
        raise ConfigError(f"{source}:{exc.line}: invalid YAML: {exc.problem}") from None
    if doc.data is None:
        raise ConfigError(
            f"{source}:1: (top level): the file is empty (at least site.id is needed)"
        )
    if not isinstance(doc.data, dict):
        kind = "a list" if isinstance(doc.data, list) else f"{doc.data!r}"
        raise ConfigError(
            f"{source}:{doc.line_of(())}: (top level): expected a mapping of sections "
            f"(site, targets, ...), got {kind}"
        )
    problems = list(doc.problems)
    problems += [Problem(doc.line_of(p), p, m) for p, m in _raw_cross_problems(doc.data)]
    config: Config | None = None
    try:
        config = Config.model_validate(doc.data, context={_LOCATED: True})
    except ValidationError as exc:
        # A value already reported as unexpandable would only repeat itself as a type error.
        known = [p.path for p in doc.problems]
        for problem in translate(exc, doc, Config):
            if not any(problem.path[: len(k)] == k for k in known):
                problems.append(problem)
    if config is not None:
        problems += [Problem(doc.line_of(p), p, m) for p, m in config.timing_problems()]
    if problems or config is None:
        problems.sort(key=lambda p: p.line)
        raise ConfigError(
            [f"{source}:{p.line}: {format_path(p.path)}: {p.message}" for p in problems]
        )
    return config


def _raw_cross_problems(data: dict[str, Any]) -> list[tuple[KeyPath, str]]:
    targets = data.get("targets")
    names = (
        [t.get("name") if isinstance(t, dict) else None for t in targets]
        if isinstance(targets, list)
        else []
    )
    proxy = data.get("proxy")
    guards = proxy.get("guard") if isinstance(proxy, dict) else None
    return _cross_problems(names, guards if isinstance(guards, list) else [])


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> Config:
    """Read and parse a config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: cannot read config: not UTF-8 text ({exc.reason})") from None
    return parse_config(text, str(p), env=env)
