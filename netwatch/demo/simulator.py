"""A population-database API simulator: the upstream that `netwatch demo` and the tests talk to.

It models what the station proxy must survive at the HTTP level: latency with jitter, a
fraction of transient 503s, scheduled or operator-driven outages (answered 503, or the
connection reset before any answer), and validation failures (422) for dead-letter tests.
Writes are applied once per ``Idempotency-Key``; a repeated key gets the original answer
with ``Idempotent-Replayed: true``. ``GET /_sim/applied`` lists every applied write in
apply order so tests can prove "each request applied exactly once, in order";
``exchanges`` lists every write request with its answer (faults included) and when.

Every write that reaches the API (past the injected faults) is also a *receipt*
(``GET /_sim/receipts``, ``receipt_counts()``): a replay that sends an entry twice shows up
there even when the idempotency record hides it from ``applied``. ``naive=True`` (or the
control key ``naive``) models an upstream that ignores ``Idempotency-Key`` and applies every
receipt; ``GET /api/applications/{application_no}`` and ``/api/applications/by-key/{key}``
let a client look up whether a write was applied. ``after_apply`` faults apply a write and
then drop the connection, stall before answering, or answer as a gateway whose origin
failed (``bad-gateway``: 502) or was too slow (``gateway-timeout``: 504): the in-doubt
cases.

Network faults below HTTP (refused connections, black holes, cut streams) are not the
simulator's job: the tests put a fault relay between the proxy and the simulator.

``DayClock`` and ``default_outage_plan`` compress a working day into minutes for the demo,
with outages clustered at the peak hours of a ward office.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import time as time_of_day
from typing import Any, Literal, Self, cast

from aiohttp import web

OutageKind = Literal["http503", "reset"]
AfterApply = Literal["drop", "stall", "bad-gateway", "gateway-timeout"]
OutageWindow = tuple[float, float]
OutageSchedule = Sequence[OutageWindow] | Callable[[float], bool]
Validator = Callable[[Mapping[str, Any]], str | None]

OUTAGE_KINDS: tuple[OutageKind, ...] = ("http503", "reset")
AFTER_APPLY: tuple[AfterApply, ...] = ("drop", "stall", "bad-gateway", "gateway-timeout")
# What a gateway in front of the database answers when its origin failed (502) or was too
# slow (504) after applying the write.
_GATEWAY_STATUS = {"bad-gateway": 502, "gateway-timeout": 504}
PEAK_WINDOWS: tuple[tuple[float, float], ...] = ((7.5, 11.5), (13.5, 16.5))


def reject_flagged(body: Mapping[str, Any]) -> str | None:
    """The default validation rule: a body with ``"invalid": true`` is refused with 422."""
    return "the application is marked invalid" if body.get("invalid") is True else None


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    """How the simulated API behaves from the start; most of it can change at runtime.

    ``outages`` holds windows of seconds after start (``[start, end)``), or a callable
    ``elapsed_s -> in_outage``. ``validate`` returns a reason to answer 422, or None.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    outages: OutageSchedule = ()
    outage_kind: OutageKind = "http503"
    validate: Validator = reject_flagged
    seed: int | None = None
    naive: bool = False


@dataclass(slots=True)
class SimulatorStats:
    """Counters of what the simulator did; ``GET /_sim/stats`` serves them."""

    requests: int = 0
    receipts: int = 0
    lookups: int = 0  # GETs of one application (by number, id or idempotency key)
    applied: int = 0
    duplicate_applies: int = 0
    replayed: int = 0
    rejected: int = 0
    injected_errors: int = 0
    outage_503: int = 0
    outage_resets: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Exchange:
    """One write request as it reached the simulator, and how it was answered."""

    idempotency_key: str | None
    order_key: str | None
    method: str
    path: str
    status: int  # 0: the connection was reset, nothing answered
    at: float  # the simulator's clock when the answer was decided


@dataclass(slots=True)
class _Control:
    latency_ms: float
    jitter_ms: float
    error_rate: float
    outage_kind: OutageKind
    forced_outage: bool | None = None
    reject_next: int = 0
    reject_status: int = 503
    naive: bool = False
    after_apply: AfterApply | None = None
    after_apply_next: int = 0
    stall_s: float = 5.0


def _json(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(payload, status=status, headers=headers)


def _reset_connection(request: web.Request) -> None:
    """Abort the connection with a TCP RST (linger 0) before anything is answered."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class PopulationSimulator:
    """The simulated API on a real loopback socket; ``port=0`` picks a free port."""

    def __init__(
        self,
        settings: SimulatorSettings | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or SimulatorSettings()
        self.host = host
        self.port = port
        self.stats = SimulatorStats()
        self._clock = clock
        self._started_at = clock()
        self._rng = random.Random(self.settings.seed)
        self._control = _Control(
            latency_ms=self.settings.latency_ms,
            jitter_ms=self.settings.jitter_ms,
            error_rate=self.settings.error_rate,
            outage_kind=self.settings.outage_kind,
            naive=self.settings.naive,
        )
        self._applied: list[dict[str, Any]] = []
        self._exchanges: list[Exchange] = []
        self._receipts: list[dict[str, Any]] = []
        self._applied_keys: set[str] = set()
        self._by_no: dict[str, str] = {}
        self._applications: dict[str, dict[str, Any]] = {}
        self._responses: dict[str, tuple[int, dict[str, Any]]] = {}
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    # --- lifetime -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = cast(tuple[str, int], runner.addresses[0])[1]
        self._started_at = self._clock()

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- state and runtime control ----------------------------------------------------------

    @property
    def applied(self) -> list[dict[str, Any]]:
        """Applied writes in apply order (a copy)."""
        return list(self._applied)

    @property
    def exchanges(self) -> list[Exchange]:
        """Every write request under ``/api/``, faults included, with its answer and time
        (a copy): what the upstream *received*, refused or not."""
        return list(self._exchanges)

    @property
    def receipts(self) -> list[dict[str, Any]]:
        """Every write that reached the API, in arrival order (a copy)."""
        return list(self._receipts)

    def receipt_counts(self, by: Literal["key", "body"] = "key") -> dict[str, int]:
        """How many times each idempotency key (or body digest) was received."""
        field = "idempotency_key" if by == "key" else "body_sha256"
        counts: dict[str, int] = {}
        for receipt in self._receipts:
            name = receipt[field]
            if name is not None:
                counts[name] = counts.get(name, 0) + 1
        return counts

    def received_more_than_once(self, by: Literal["key", "body"] = "key") -> dict[str, int]:
        """The keys (or bodies) received twice or more, with their counts."""
        return {name: n for name, n in self.receipt_counts(by).items() if n > 1}

    def elapsed(self) -> float:
        return self._clock() - self._started_at

    def in_outage(self) -> bool:
        if self._control.forced_outage is not None:
            return self._control.forced_outage
        schedule = self.settings.outages
        now = self.elapsed()
        if callable(schedule):
            return schedule(now)
        return any(start <= now < end for start, end in schedule)

    def set_outage(self, on: bool | None, kind: OutageKind | None = None) -> None:
        """Force an outage on or off; ``None`` hands control back to the schedule."""
        self._control.forced_outage = on
        if kind is not None:
            self._control.outage_kind = kind

    def control_state(self) -> dict[str, Any]:
        state = asdict(self._control)
        state["outage"] = self.in_outage()
        return state

    def control(self, **changes: Any) -> dict[str, Any]:
        """Change behaviour at runtime, as ``POST /_sim/control`` does; returns the new state.

        Keys: ``outage`` (True/False, or None to follow the schedule), ``outage_kind``,
        ``latency_ms``, ``jitter_ms``, ``error_rate``, ``reject_next`` (answer the next N API
        requests with ``reject_status``, default 503), ``naive`` (ignore ``Idempotency-Key``),
        ``after_apply`` (``"drop"``, ``"stall"``, ``"bad-gateway"``, ``"gateway-timeout"`` or
        None) for the next ``after_apply_next`` writes, ``stall_s``. A bad key or value
        raises ValueError.
        """
        for key, value in changes.items():
            if key == "outage" and (value is None or isinstance(value, bool)):
                self._control.forced_outage = value
            elif key == "outage_kind" and value in OUTAGE_KINDS:
                self._control.outage_kind = value
            elif key in {"latency_ms", "jitter_ms"} and _is_number(value) and value >= 0:
                setattr(self._control, key, float(value))
            elif key == "error_rate" and _is_number(value) and 0 <= value <= 1:
                self._control.error_rate = float(value)
            elif (
                key in {"reject_next", "reject_status", "after_apply_next"}
                and isinstance(value, int)
                and value >= 0
            ):
                setattr(self._control, key, value)
            elif key == "naive" and isinstance(value, bool):
                self._control.naive = value
            elif key == "after_apply" and (value is None or value in AFTER_APPLY):
                self._control.after_apply = value
            elif key == "stall_s" and _is_number(value) and value >= 0:
                self._control.stall_s = float(value)
            else:
                raise ValueError(f"bad control value {key}={value!r}")
        return self.control_state()

    # --- HTTP -----------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._faults])
        app.router.add_get("/health", self._health)
        app.router.add_post("/api/applications", self._create)
        app.router.add_put("/api/applications/{id}", self._update)
        app.router.add_get("/api/applications/by-key/{key}", self._lookup_by_key)
        app.router.add_get("/api/applications/{id}", self._read_application)
        app.router.add_get("/api/citizens/{id}", self._read_citizen)
        app.router.add_get("/_sim/applied", self._sim_applied)
        app.router.add_get("/_sim/receipts", self._sim_receipts)
        app.router.add_get("/_sim/stats", self._sim_stats)
        app.router.add_post("/_sim/control", self._sim_control)
        return app

    @web.middleware
    async def _faults(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        if request.path.startswith("/_sim/"):
            return cast(web.StreamResponse, await handler(request))
        response = await self._serve(request, handler)
        if request.path.startswith("/api/") and request.method not in {"GET", "HEAD"}:
            reset = request.transport is None or request.transport.is_closing()
            exchange = Exchange(
                idempotency_key=request.headers.get("Idempotency-Key"),
                order_key=request.headers.get("Netwatch-Order-Key"),
                method=request.method,
                path=request.path,
                status=0 if reset else response.status,
                at=self._clock(),
            )
            self._exchanges.append(exchange)
        return response

    async def _serve(
        self, request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        self.stats.requests += 1
        control = self._control
        if self.in_outage():
            if control.outage_kind == "reset":
                self.stats.outage_resets += 1
                _reset_connection(request)
                return web.Response(status=503)  # never reaches the peer: the socket is gone
            self.stats.outage_503 += 1
            return _json({"error": "outage"}, 503)
        delay_ms = control.latency_ms + self._rng.uniform(-control.jitter_ms, control.jitter_ms)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        if request.path.startswith("/api/"):
            if control.reject_next > 0:
                control.reject_next -= 1
                self.stats.injected_errors += 1
                return _json({"error": "injected"}, control.reject_status)
            if control.error_rate > 0 and self._rng.random() < control.error_rate:
                self.stats.injected_errors += 1
                return _json({"error": "injected"}, 503)
        return cast(web.StreamResponse, await handler(request))

    async def _health(self, _request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _create(self, request: web.Request) -> web.Response:
        return await self._after_apply(request, await self._receive(request, None))

    async def _update(self, request: web.Request) -> web.Response:
        return await self._after_apply(
            request, await self._receive(request, request.match_info["id"])
        )

    async def _receive(self, request: web.Request, app_id: str | None) -> web.Response:
        raw = await request.read()
        body = _json_object(raw)
        self.stats.receipts += 1
        self._receipts.append(
            {
                "idempotency_key": request.headers.get("Idempotency-Key"),
                "body_sha256": hashlib.sha256(raw).hexdigest(),
                "method": request.method,
                "path": request.path,
                "order_key": request.headers.get("Netwatch-Order-Key"),
                "elapsed_s": round(self.elapsed(), 6),
            }
        )
        return self._write(request, body, app_id)

    async def _after_apply(self, request: web.Request, response: web.Response) -> web.Response:
        control = self._control
        if control.after_apply is None or control.after_apply_next <= 0:
            return response
        control.after_apply_next -= 1
        if control.after_apply == "drop":
            _reset_connection(request)
        elif control.after_apply in _GATEWAY_STATUS:
            status = _GATEWAY_STATUS[control.after_apply]
            return _json({"error": control.after_apply}, status)
        else:
            await asyncio.sleep(control.stall_s)
        return response

    async def _read_application(self, request: web.Request) -> web.Response:
        self.stats.lookups += 1
        wanted = request.match_info["id"]
        record = self._applications.get(self._by_no.get(wanted, wanted))
        return _json(record) if record else _json({"error": "not_found"}, 404)

    async def _lookup_by_key(self, request: web.Request) -> web.Response:
        self.stats.lookups += 1
        key = request.match_info["key"]
        if key in self._applied_keys:
            return _json({"idempotency_key": key, "applied": True})
        return _json({"error": "not_found"}, 404)

    async def _read_citizen(self, request: web.Request) -> web.Response:
        citizen_id = request.match_info["id"]
        if not citizen_id.isdigit():
            return _json({"error": "not_found"}, 404)
        apps = [a["id"] for a in self._applications.values() if a["citizen_id"] == citizen_id]
        return _json({"id": citizen_id, "applications": apps})

    async def _sim_applied(self, _request: web.Request) -> web.Response:
        return _json(self._applied)

    async def _sim_receipts(self, _request: web.Request) -> web.Response:
        return _json(self._receipts)

    async def _sim_stats(self, _request: web.Request) -> web.Response:
        return _json({**self.stats.as_dict(), **self.control_state()})

    async def _sim_control(self, request: web.Request) -> web.Response:
        try:
            return _json(self.control(**await _json_body(request)))
        except ValueError as exc:
            return _json({"error": "bad_control", "detail": str(exc)}, 400)

    def _write(
        self, request: web.Request, body: dict[str, Any], app_id: str | None
    ) -> web.Response:
        # No await from here on: check-then-apply is atomic on the event loop.
        key = request.headers.get("Idempotency-Key")
        if key is not None and key in self._responses and not self._control.naive:
            self.stats.replayed += 1
            status, payload = self._responses[key]
            return _json(payload, status, headers={"Idempotent-Replayed": "true"})
        status, payload = self._execute(request, body, app_id, key)
        if key is not None:
            self._responses[key] = (status, payload)
        return _json(payload, status)

    def _execute(
        self, request: web.Request, body: dict[str, Any], app_id: str | None, key: str | None
    ) -> tuple[int, dict[str, Any]]:
        problem = self.settings.validate(body)
        if problem is not None:
            self.stats.rejected += 1
            return 422, {"error": "validation_failed", "detail": problem}
        if app_id is not None and app_id not in self._applications:
            return 404, {"error": "not_found", "id": app_id}
        seq = len(self._applied) + 1
        if key is not None and key in self._applied_keys:
            self.stats.duplicate_applies += 1
        if app_id is None:
            app_id = f"APP-{len(self._applications) + 1:06d}"
            self._applications[app_id] = {"id": app_id, "citizen_id": body.get("citizen_id")}
            number = body.get("application_no")
            if isinstance(number, str | int) and not isinstance(number, bool):
                self._by_no[str(number)] = app_id
            status = 201
        else:
            status = 200
        record = self._applications[app_id]
        record.update(data=body, seq=seq, version=record.get("version", 0) + 1)
        self._applied.append(
            {
                "seq": seq,
                "idempotency_key": key,
                "method": request.method,
                "path": request.path,
                "body": body,
                "order_key": request.headers.get("Netwatch-Order-Key"),
                "station": body.get("station"),
                "station_seq": body.get("seq"),
                "elapsed_s": round(self.elapsed(), 6),
            }
        )
        self.stats.applied += 1
        if key is not None:
            self._applied_keys.add(key)
        return status, {
            "id": app_id,
            "seq": seq,
            "status": "received",
            "version": record["version"],
        }


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text='{"error": "body must be a JSON object"}', content_type="application/json"
        )
    return body


async def _json_body(request: web.Request) -> dict[str, Any]:
    return _json_object(await request.read())


# --- a compressed day for the demo ----------------------------------------------------------


class DayClock:
    """Maps real seconds since creation to a simulated hour of day (0 <= hour < 24)."""

    def __init__(
        self,
        seconds_per_hour: float,
        start_hour: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if seconds_per_hour <= 0 or not 0 <= start_hour < 24:
            raise ValueError("seconds_per_hour must be > 0 and 0 <= start_hour < 24")
        self.seconds_per_hour = seconds_per_hour
        self.start_hour = start_hour
        self._clock = clock
        self._origin = clock()

    def elapsed(self) -> float:
        return self._clock() - self._origin

    def hour_at(self, elapsed_s: float) -> float:
        return (self.start_hour + elapsed_s / self.seconds_per_hour) % 24

    def hour(self) -> float:
        return self.hour_at(self.elapsed())

    def time_at(self, elapsed_s: float) -> time_of_day:
        minutes = int(self.hour_at(elapsed_s) * 60 + 1e-6) % (24 * 60)
        return time_of_day(minutes // 60, minutes % 60)

    def seconds_until(self, hour: float, after_s: float = 0.0) -> float:
        """Real seconds from start until the simulated clock next shows ``hour``."""
        ahead = (hour - self.hour_at(after_s)) % 24
        return after_s + ahead * self.seconds_per_hour


def in_windows(hour: float, windows: Sequence[tuple[float, float]] = PEAK_WINDOWS) -> bool:
    return any(start <= hour < end for start, end in windows)


def default_outage_plan(
    day: DayClock,
    duration_s: float,
    *,
    seed: int = 0,
    peak_windows: Sequence[tuple[float, float]] = PEAK_WINDOWS,
    peak_rate_per_hour: float = 1.0,
    off_peak_rate_per_hour: float = 0.1,
    min_minutes: float = 5.0,
    max_minutes: float = 20.0,
) -> list[OutageWindow]:
    """Outage windows (real seconds after start), mostly inside peak hours, merged and sorted.

    The day is cut into simulated quarter hours; each starts an outage with probability
    ``rate * 0.25`` (the rate of the peak or off-peak hour it falls in), lasting a uniform
    ``min_minutes``..``max_minutes`` of simulated time. Same seed, same plan.
    """
    rng = random.Random(seed)
    slot = day.seconds_per_hour / 4
    windows: list[OutageWindow] = []
    for index in range(math.ceil(duration_s / slot)):
        begin = index * slot
        in_peak = in_windows(day.hour_at(begin + slot / 2), peak_windows)
        rate = peak_rate_per_hour if in_peak else off_peak_rate_per_hour
        if rng.random() < min(1.0, rate / 4):
            start = begin + rng.random() * slot
            length = rng.uniform(min_minutes, max_minutes) / 60 * day.seconds_per_hour
            if start < duration_s:
                windows.append((start, min(start + length, duration_s)))
    merged: list[OutageWindow] = []
    for start, end in sorted(windows):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


# --- manual use: python -m netwatch.demo.simulator --port 8099 ----------------------------


async def _serve_forever(settings: SimulatorSettings, host: str, port: int) -> None:
    async with PopulationSimulator(settings, host=host, port=port) as sim:
        print(f"population-database simulator on {sim.url} (Ctrl-C to stop)", flush=True)
        await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the population-database API simulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--jitter-ms", type=float, default=5.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--outage-kind", choices=OUTAGE_KINDS, default="http503")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--naive", action="store_true", help="ignore Idempotency-Key: apply every write received"
    )
    args = parser.parse_args(argv)
    settings = SimulatorSettings(
        latency_ms=args.latency_ms,
        jitter_ms=args.jitter_ms,
        error_rate=args.error_rate,
        outage_kind=args.outage_kind,
        seed=args.seed,
        naive=args.naive,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(settings, args.host, args.port))


if __name__ == "__main__":
    main()
