"""``StationProxy``: the durable queue, the HTTP server, the replayer and the mode machine,
wired together for the daemon.

::

    async with StationProxy(settings, site_id, registry, hub, is_peak, key) as proxy:
        tg.create_task(proxy.run())          # replay + housekeeping, in the daemon's TaskGroup
        proxy.set_guard("popdb-api", True)   # on every guard link change
        proxy.override("offline")            # operator command (MQTT cmd/mode)
        proxy.remote_mode("online")          # the site daemon's mode (None: broker lost)

The mode machine is pure; this class feeds it events, applies its effects (metrics, a
``ModeChanged`` on the hub, waking the replayer, ending forwards that wait on a dead
link) and feeds it the backlog as the queue file tells it (``backlog.py``).

Time: the hold, the replay's pacing and every interval here run on the monotonic clock.
The queue file keeps wall-clock times (shared with the CLI and the next run); they are
read and written through a ``FileTime``, and when the wall clock steps (more than
``STEP_TOLERANCE``) the file's waiting entries are shifted by the step before the frame
follows it: a retry wait keeps its remaining time, and an entry's age (``max_age``) moves
only with the monotonic clock (a backward step may delay an expiry, nothing brings one
forward). Across a restart there is no shared monotonic clock: future times count as now
and waits as at most ``replay.backoff_max`` (``DurableQueue.clamp_future``); a forward step
while the proxy was stopped cannot be told from downtime and counts as age.

The backlog rule that keeps per-order-key order: the mode may only say ``online`` (new
writes forwarded directly) after a read of the queue file found nothing waiting, and while
online every new write first checks that the file has not changed since (another process
may have put dead letters back). Counts kept here between reads are estimates that may
only err on the side of "something waits".

Entries in doubt: on start, every entry whose send was in flight when the process died
becomes in doubt (``recover_attempts``); the replayer settles them by their rule's dedupe
strategy. One held for an operator counts as waiting (``backlog.py``), so new writes queue
behind it until ``netwatch queue resolve``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any, Self, cast, get_args

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from netwatch.clock import Clock, FileTime, SystemClock
from netwatch.config.schema import Proxy
from netwatch.config.units import split_listen
from netwatch.errors import QueueError
from netwatch.events import EventHub, ModeChanged, QueueStats
from netwatch.proxy import mode as machine
from netwatch.proxy.backlog import BacklogWatch
from netwatch.proxy.connections import ConnectionLimits, connection_cap
from netwatch.proxy.crypto import default_key_path
from netwatch.proxy.dedupe import strategy_for
from netwatch.proxy.dispatch import Dispatcher, iso
from netwatch.proxy.forward import Forwarder
from netwatch.proxy.front import Fronts
from netwatch.proxy.metrics import ProxyMetrics
from netwatch.proxy.mode import (
    MODES,
    BacklogChanged,
    GuardChanged,
    Mode,
    ModeEvent,
    Override,
    OverrideMode,
    PassiveFailure,
    RemoteMode,
    Tick,
)
from netwatch.proxy.queue import DurableQueue, Entry, NewEntry
from netwatch.proxy.queue import QueueStats as QueueSnapshot
from netwatch.proxy.replay import Outcome, Replayer
from netwatch.proxy.server import ProxyServer

log = structlog.get_logger("netwatch.proxy")

STATS_EVERY = 1.0
EXPIRE_EVERY = 30.0
STEP_TOLERANCE = 1.0  # wall-clock moves smaller than this are slewing, not steps
PUBLISH_EVERY = 15.0  # queue stats go to the hub on change, and at least this often
HEALTH_TIMEOUT = 2.0
SHUTDOWN_GRACE = 2.0  # requests in progress at shutdown get this long to finish


class _WithoutPayloads(logging.Filter):
    """aiohttp's server logs a malformed request with a traceback quoting its bytes (which
    may be a citizen's data); keep the event and the error type, drop the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is not None:
            record.msg = f"{record.getMessage()}: {record.exc_info[0].__name__}"
            record.args = ()
        record.exc_info = None
        record.exc_text = None
        return True


AIOHTTP_LOG = logging.getLogger("netwatch.proxy.http")
AIOHTTP_LOG.addFilter(_WithoutPayloads())


class StationProxy:
    """The station proxy of one site (an async context manager; see the module docstring)."""

    def __init__(  # noqa: PLR0917 - the positional signature the daemon calls
        self,
        settings: Proxy,
        site_id: str,
        registry: CollectorRegistry,
        hub: EventHub,
        is_peak: Callable[[], bool],
        key: bytes | None,
        *,
        clock: Clock | None = None,
        replay_concurrency: int = 32,
        site_name: str = "",
        timezone: str = "Asia/Ho_Chi_Minh",
    ) -> None:
        self.settings = settings
        self.site_id = site_id
        self._site = {"id": site_id, "name": site_name, "timezone": timezone}
        self._last_delivered: float | None = None
        self.hub = hub
        self.metrics = ProxyMetrics(registry, site_id)
        self._registry = registry
        self._is_peak = is_peak
        self._key = key
        self._clock = clock or SystemClock()
        self._file_time = FileTime(self._clock)
        self._replay_concurrency = replay_concurrency
        self._guard: dict[str, bool | None] = dict.fromkeys(settings.guard)
        self._state = machine.initial(self._clock.now())
        # Waiting entries: the last count read from the file, moved by this process's own
        # commits until the next read (an estimate that a read confirms before "empty").
        self._depth = 0
        self._enqueuing = 0  # enqueues not yet committed (already count as backlog)
        self._watch: BacklogWatch | None = None
        self._stats: QueueSnapshot | None = None
        self._published: tuple[int, int, str, int, int, int] | None = None
        self._stack: AsyncExitStack | None = None
        self._queue: DurableQueue | None = None
        self._forwarder: Forwarder | None = None
        self._replayer: Replayer | None = None
        self._runner: web.AppRunner | None = None
        self._fronts: Fronts | None = None
        self._port: int | None = None
        self._limits = ConnectionLimits(
            header_timeout=settings.header_timeout,
            idle_timeout=settings.idle_timeout,
            cap=settings.max_connections,
            clock=self._clock.monotonic,
        )

    # --- lifetime -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            q = self.settings.queue
            # Sealed at rest unless told otherwise: without key_file, a key beside the queue.
            auto = q.encrypt and self._key is None and q.key_file is None
            opener = DurableQueue.open(
                q.path,
                max_bytes=q.max_bytes,
                max_age=q.max_age,
                key=self._key,
                max_batch=1024 if q.group_commit else 1,
                auto_key=default_key_path(q.path) if auto else None,
            )
            # QueueKeyError (wrong or missing key) and QueueForeignError propagate from
            # here: fail fast. A damaged file opens in the damaged state (see health()).
            self._queue = await stack.enter_async_context(opener)
            self._file_time.resync()
            await self._read_backlog(stack)
            now = self._clock.now()
            self.metrics.queue_stats = self._stats
            # A backlog left by a crash waits offline for the guard before replaying.
            self._state = machine.initial(now, depth=self._depth)
            self._forwarder = await stack.enter_async_context(Forwarder(self.settings))
            settings = self.settings
            self._replayer = Replayer(
                self._queue,
                self._forwarder.replay,
                settings.replay,
                clock=self._clock,
                file_time=self._file_time,
                is_peak=self._is_peak,
                active=lambda: self.mode != "offline" and self.queue.damaged is None,
                on_result=self._replayed,
                on_network_error=self.passive_failure,
                concurrency=self._replay_concurrency,
                strategy=lambda e: strategy_for(
                    settings.replayable, settings.dedupe, e.method, e.path
                ),
                lookup=self._forwarder.lookup,
                settle=settings.request_timeout,
            )
            dispatcher = Dispatcher(self.settings, self, self._forwarder, self.metrics)
            server = ProxyServer(
                self.settings,
                self,
                dispatcher,
                self._registry,
                middlewares=[self._limits.middleware],
            )
            runner = web.AppRunner(
                server.app(),
                access_log=None,  # paths carry citizens' identifiers
                handle_signals=False,
                shutdown_timeout=SHUTDOWN_GRACE,
                logger=AIOHTTP_LOG,
                # aiohttp's own idle close stays behind ours (ConnectionLimits decides).
                keepalive_timeout=max(self.settings.idle_timeout, self.settings.header_timeout)
                + 5.0,
                lingering_time=1.0,
                # A body is forwarded and queued as the station encoded it: decoding it
                # here sent the plain bytes upstream under the station's Content-Encoding.
                auto_decompress=False,
            )
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            self._limits.cap = connection_cap(self.settings.max_connections)
            host, port = split_listen(self.settings.listen)
            if runner.server is None:
                raise RuntimeError("the aiohttp runner has no server after setup")
            aiohttp_protocol = runner.server
            protocol: Callable[[], asyncio.BaseProtocol] = aiohttp_protocol
            if self.settings.fast_path:
                protocol = fronts = Fronts(dispatcher, self._limits, aiohttp_protocol)
                stack.push_async_callback(fronts.close, SHUTDOWN_GRACE)  # before aiohttp's
                self._fronts = fronts
            listener = await asyncio.get_running_loop().create_server(
                self._limits.protocol_factory(protocol), host, port, reuse_address=True
            )
            stack.callback(listener.close)  # before runner.cleanup: no new connections
            self._port = cast(tuple[str, int], listener.sockets[0].getsockname())[1]
            self._runner = runner
            self._announce(self._state.mode, self._state.reason)
            if not self.settings.guard:
                # No guard targets: only passive detection drives the mode.
                self._feed(GuardChanged(all_ok=True))
            self._stack = stack.pop_all()
        log.info(
            "proxy_listening",
            url=self.url,
            mode=self.mode,
            backlog=self._depth,
            max_connections=self._limits.cap,
        )
        return self

    async def _read_backlog(self, stack: AsyncExitStack) -> None:
        """What the queue file holds at start: attempts cut by a crash become in doubt,
        times a clock step put in the future are clamped, the backlog is counted. A
        damaged file is only read (what still reads): healthz and the alert say why."""
        queue = self.queue
        damaged = queue.damaged is not None
        file_now = self._file_time.now()
        if not damaged:
            if recovered := await queue.recover_attempts():
                log.warning("proxy_attempts_in_doubt_after_restart", count=len(recovered))
            wait = self.settings.replay.backoff_max
            if clamped := await queue.clamp_future(now=file_now, max_wait=wait):
                log.warning("proxy_queue_times_in_future", entries=clamped)
        with contextlib.suppress(QueueError):
            self._stats = await queue.stats(now=file_now)
        try:
            self._watch = BacklogWatch(queue.path)
        except sqlite3.Error as exc:
            raise QueueError(f"{queue.path}: cannot watch the queue: {exc}") from exc
        stack.callback(self._watch.close)
        try:
            self._depth = self._watch.refresh(force=True) or 0
        except sqlite3.Error:
            if not damaged:
                raise
            self._depth = self._stats.depth if self._stats else 0
        with contextlib.suppress(QueueError):
            self._last_delivered = await queue.last_delivered_at()

    async def __aexit__(self, *exc: object) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("StationProxy is not open")
        return self._port

    @property
    def url(self) -> str:
        host, _ = split_listen(self.settings.listen)
        return f"http://{host}:{self.port}"

    @property
    def queue(self) -> DurableQueue:
        if self._queue is None:
            raise RuntimeError("StationProxy is not open")
        return self._queue

    async def run(self) -> None:
        """Replay and housekeeping until cancelled (run it in the daemon's TaskGroup)."""
        if self._replayer is None:
            raise RuntimeError("StationProxy is not open")
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._replayer.run(), name="proxy-replay")
            tg.create_task(self._housekeeping(), name="proxy-housekeeping")
            tg.create_task(self._limits.run(), name="proxy-connections")

    # --- inputs from the daemon ----------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._state.mode

    def set_guard(self, target: str, ok: bool) -> None:
        """A guard target's link changed (ok = up or degraded); others are ignored."""
        if target not in self._guard:
            return
        self._guard[target] = ok
        states = self._guard.values()
        if any(state is False for state in states):
            self._feed(GuardChanged(all_ok=False))
        elif all(state is True for state in states):
            self._feed(GuardChanged(all_ok=True))

    def override(self, mode: str) -> None:
        if mode not in get_args(OverrideMode):
            raise ValueError(f"override mode must be offline, online or auto, not {mode!r}")
        log.info("proxy_override", override=mode)
        self._feed(Override(cast(OverrideMode, mode)))

    def remote_mode(self, mode: str | None) -> None:
        if mode is not None and mode not in MODES:
            log.warning("proxy_remote_mode_ignored", mode=mode)
            return
        self._feed(RemoteMode(mode))

    def passive_failure(self, reason: str) -> None:
        self._feed(PassiveFailure(reason))

    # --- the mode machine -----------------------------------------------------------------

    def _feed(self, event: ModeEvent) -> None:
        clock = self._clock
        self._state, effects = machine.step(self._state, event, clock.now(), mono=clock.monotonic())
        for switch in effects:
            self._announce(switch.mode, switch.reason)
            if switch.mode == "offline" and self._forwarder is not None:
                self._forwarder.abandon_waiting()
            elif self._replayer is not None:
                self._replayer.wake()

    def _announce(self, mode: Mode, reason: str) -> None:
        backlog = self._depth + self._enqueuing
        log.info("proxy_mode_changed", mode=mode, reason=reason, backlog=backlog)
        self.metrics.set_mode(mode)
        self.hub.publish(ModeChanged(self.site_id, mode, reason, self._state.since))

    def _backlog(self) -> None:
        depth = self._depth + self._enqueuing
        # The mode rules only tell an empty backlog from a non-empty one: feeding every
        # count (twice per queued request) would cost the hot path for nothing.
        if (depth > 0) != (self._state.depth > 0):
            self._feed(BacklogChanged(depth))

    # --- the queue, for the server and the replayer ----------------------------------------------

    async def enqueue(self, new: NewEntry) -> tuple[Entry, int]:
        # Counted as backlog before the commit, so the mode cannot flip to online while a
        # write is on its way to disk (the next write would then overtake it).
        self._enqueuing += 1
        self._backlog()
        try:
            result = await self.queue.enqueue(new, now=self._file_time.now())
            self._depth += 1
        finally:
            self._enqueuing -= 1
            self._backlog()
        if self._replayer is not None:
            self._replayer.wake()
        return result

    async def ticket(self, ticket: str) -> Entry | None:
        return await self.queue.get(ticket)

    async def health(self) -> dict[str, str] | None:
        """None when the queue can take writes, else why not (for ``/_netwatch/healthz``)."""
        if self.queue.health == "damaged":
            return {"error": "queue_damaged", "reason": "the queue file is damaged"}
        if self.queue.health == "disk_full":
            return {"error": "queue_unwritable", "reason": "disk full"}
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await self.queue.stats(now=self._file_time.now())
        except Exception:  # any failure means "not usable"; logged
            log.warning("proxy_queue_unhealthy", exc_info=True)
            return {"error": "queue_unusable", "reason": "the queue does not answer"}
        return None

    def _replayed(self, entry: Entry, outcome: Outcome, now: float) -> None:
        lag = now - entry.queued_at if outcome in {"delivered", "found"} else None
        self.metrics.replayed(outcome, lag)
        if outcome in {"delivered", "found"}:
            self._last_delivered = now
        # A held entry still waits (for an operator): it stays in the backlog.
        if outcome not in {"retried", "held"}:
            self._settled(1)

    def _settled(self, count: int) -> None:
        """Entries left the backlog: only a read of the file may say it is empty."""
        self._depth -= count
        if self._depth <= 0 and not self._sync(force=True):
            self._depth = 1  # unknown: something may wait until a read says otherwise
            self._backlog()

    def _sync(self, *, force: bool = False) -> bool:
        """Take the backlog from the file if anyone changed it (``force``: read it anyway).
        False when the file could not be read: the caller must assume a backlog."""
        if self._watch is None:
            return False
        try:
            depth = self._watch.refresh(force=force)
        except sqlite3.Error as exc:
            log.warning("proxy_backlog_unreadable", error=str(exc))
            return False
        if depth is not None:
            self._depth = depth
            self._backlog()
        return True

    def mode_for_write(self) -> Mode:
        """The mode a new replayable write is routed by. Online only if the queue file has
        not changed since it was last found empty: otherwise it is read again (and the
        mode follows), so a write never overtakes what another process put back."""
        if self._state.mode == "online" and not self._sync():
            return "replaying"  # unknown backlog: queue it, replay sends it right away
        return self._state.mode

    async def _housekeeping(self) -> None:
        last_expire = last_publish = float("-inf")
        while True:
            mono = self._clock.monotonic()
            if await self._absorb_clock_step():
                # Ages are checked again at once: what a step did to them shows now.
                last_expire = mono
                log.info("proxy_ages_checked_after_step", expired=await self._expire())
            if mono - last_expire >= EXPIRE_EVERY:
                last_expire = mono
                await self._expire()
            await self._refresh(force_publish=mono - last_publish >= PUBLISH_EVERY)
            if self._published is not None and mono - last_publish >= PUBLISH_EVERY:
                last_publish = mono
            self._feed(Tick())
            await asyncio.sleep(STATS_EVERY)

    async def _absorb_clock_step(self) -> bool:
        """Shift the queue file's times by a wall clock step, then follow the wall clock.
        True when there was a step (and it is now absorbed)."""
        step = self._file_time.step()
        if abs(step) <= STEP_TOLERANCE:
            self._file_time.resync()  # slewing: follow it, never let it add up to a "step"
            return False
        try:
            moved = await self.queue.shift_times(step)
        except Exception:  # the frame stays steady until the shift succeeds
            log.exception("proxy_clock_step_shift_failed", step_s=round(step, 3))
            return False
        self._file_time.resync()
        log.warning("wall_clock_stepped", step_s=round(step, 3), entries_shifted=moved)
        return True

    async def _expire(self) -> int:
        if self.queue.damaged is not None:  # logged once when found; nothing to write
            return 0
        try:
            expired = await self.queue.expire(now=self._file_time.now())
        except Exception:  # housekeeping must outlive a bad moment of the disk
            log.exception("proxy_expire_failed")
            return 0
        if expired:
            log.warning("proxy_entries_expired", count=len(expired))
            for _ in expired:
                self.metrics.replayed("dead")
            self._settled(len(expired))
        return len(expired)

    async def _refresh(self, *, force_publish: bool) -> None:
        # The backlog from the file: catches what another process did (a retry of dead
        # letters) even while no station writes, and corrects this process's estimate.
        self._sync(force=True)
        queue = self.queue
        if queue.health == "disk_full":
            # Nothing else may write for a while (online, no backlog): find out ourselves
            # when there is room again.
            with contextlib.suppress(QueueError):
                await queue.check_writable()
        try:
            stats = await queue.stats(now=self._file_time.now())
        except Exception:  # logged (a damaged file once, when found); the last figures stay
            if queue.damaged is None:
                log.exception("proxy_stats_failed")
            if self._stats is None:
                return
            stats = self._stats
        self._stats = stats
        self.metrics.queue_stats = stats
        key = (stats.depth, stats.dead, queue.health, stats.unreadable, stats.in_doubt, stats.held)
        if force_publish or key != self._published:
            self._published = key
            self.hub.publish(
                QueueStats(
                    self.site_id,
                    stats.depth,
                    stats.oldest_age_s,
                    stats.dead,
                    health=queue.health,
                    unreadable=stats.unreadable,
                    in_doubt=stats.in_doubt,
                    held=stats.held,
                )
            )

    # --- status -----------------------------------------------------------------------------

    def _hold_until(self) -> str | None:
        until = self._state.suspect_until
        if until is None:
            return None
        return iso(self._clock.now().timestamp() + until - self._clock.monotonic())

    def status(self) -> dict[str, Any]:
        state = self._state
        stats = self._stats
        return {
            "mode": state.mode,
            "reason": state.reason,
            "since": state.since.isoformat(),
            "override": state.override,
            "remote_mode": state.remote,
            "backlog": self._depth + self._enqueuing,  # live; "queue" is the last disk read
            # Entries that may have been applied upstream without an answer (held for an
            # operator or not): the staff page shows them as needing attention.
            "in_doubt": stats.in_doubt if stats else 0,
            "passive_hold_until": self._hold_until(),
            "guard": {
                name: ("unknown" if ok is None else "ok" if ok else "down")
                for name, ok in self._guard.items()
            },
            "queue": None
            if stats is None
            else {
                "depth": stats.depth,
                "oldest_age_s": round(stats.oldest_age_s, 3),
                "bytes": stats.bytes,
                "dead": stats.dead,
                "unreadable": stats.unreadable,
                "health": self.queue.health,
                "in_doubt": stats.in_doubt,
                "held": stats.held,
                "blocked": stats.blocked,
            },
            "replay": {
                "in_flight": self._replayer.in_flight if self._replayer else 0,
                "rate_per_s": self._replayer.rate() if self._replayer else None,
            },
            "connections": {
                "open": self._limits.open,
                "cap": self._limits.cap,
                "evicted": self._limits.evicted,
                "timed_out": self._limits.timed_out,
                "refused": self._limits.refused,
                # Served by the fast front unless handed over to aiohttp's server (see
                # proxy/front.py); None when the fast front is off.
                "handed_over": None if self._fronts is None else self._fronts.handed_over,
            },
            "checked_at": iso(self._clock.now().timestamp()),
            "site": self._site,
            # The last replayed entry delivered (forwards online are not entries).
            "last_delivered_at": iso(self._last_delivered),
        }
