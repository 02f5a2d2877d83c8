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
link) and keeps the backlog depth it reasons about close to the truth.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any, Self, cast, get_args

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry

from netwatch.clock import Clock, SystemClock
from netwatch.config.schema import Proxy
from netwatch.events import EventHub, ModeChanged, QueueStats
from netwatch.proxy import mode as machine
from netwatch.proxy.forward import Forwarder
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
from netwatch.proxy.server import ProxyServer, iso

log = structlog.get_logger("netwatch.proxy")

STATS_EVERY = 1.0
EXPIRE_EVERY = 30.0
PUBLISH_EVERY = 15.0  # queue stats go to the hub on change, and at least this often
HEALTH_TIMEOUT = 2.0


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


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


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
        self._replay_concurrency = replay_concurrency
        self._guard: dict[str, bool | None] = dict.fromkeys(settings.guard)
        self._state = machine.initial(self._clock.now())
        self._depth = 0  # committed queued entries, as far as this process knows
        self._enqueuing = 0  # enqueues not yet committed (already count as backlog)
        self._enqueued = 0  # generation counter: detects enqueues racing a stats read
        self._stats: QueueSnapshot | None = None
        self._published: tuple[int, int] | None = None
        self._stack: AsyncExitStack | None = None
        self._queue: DurableQueue | None = None
        self._forwarder: Forwarder | None = None
        self._replayer: Replayer | None = None
        self._runner: web.AppRunner | None = None

    # --- lifetime -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            q = self.settings.queue
            opener = DurableQueue.open(
                q.path,
                max_bytes=q.max_bytes,
                max_age=q.max_age,
                key=self._key,
                max_batch=1024 if q.group_commit else 1,
            )
            # QueueKeyError (wrong or missing key) propagates from here: fail fast.
            self._queue = await stack.enter_async_context(opener)
            now = self._clock.now()
            self._stats = await self._queue.stats(now=now.timestamp())
            self._depth = self._stats.depth
            self._last_delivered = await self._queue.last_delivered_at()
            self.metrics.queue_stats = self._stats
            # A backlog left by a crash waits offline for the guard before replaying.
            self._state = machine.initial(now, depth=self._depth)
            self._forwarder = await stack.enter_async_context(Forwarder(self.settings))
            self._replayer = Replayer(
                self._queue,
                self._forwarder.replay,
                self.settings.replay,
                clock=self._clock,
                is_peak=self._is_peak,
                active=lambda: self.mode != "offline",
                on_result=self._replayed,
                on_network_error=self.passive_failure,
                concurrency=self._replay_concurrency,
            )
            server = ProxyServer(self.settings, self, self._forwarder, self.metrics, self._registry)
            runner = web.AppRunner(
                server.app(),
                access_log=None,  # paths carry citizens' identifiers
                handle_signals=False,
                shutdown_timeout=2.0,
                logger=AIOHTTP_LOG,
            )
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            host, port = split_listen(self.settings.listen)
            await web.TCPSite(runner, host, port, reuse_address=True).start()
            self._runner = runner
            self._announce(self._state.mode, self._state.reason)
            if not self.settings.guard:
                # No guard targets: only passive detection drives the mode.
                self._feed(GuardChanged(all_ok=True))
            self._stack = stack.pop_all()
        log.info("proxy_listening", url=self.url, mode=self.mode, backlog=self._depth)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    @property
    def port(self) -> int:
        if self._runner is None:
            raise RuntimeError("StationProxy is not open")
        return cast(tuple[str, int], self._runner.addresses[0])[1]

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
        self._state, effects = machine.step(self._state, event, self._clock.now())
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
            result = await self.queue.enqueue(new, now=self._clock.now().timestamp())
            self._depth += 1
            self._enqueued += 1
        finally:
            self._enqueuing -= 1
            self._backlog()
        if self._replayer is not None:
            self._replayer.wake()
        return result

    async def ticket(self, ticket: str) -> Entry | None:
        return await self.queue.get(ticket)

    async def healthy(self) -> bool:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await self.queue.stats(now=self._clock.now().timestamp())
        except Exception:  # any failure means "not usable"; logged
            log.warning("proxy_queue_unhealthy", exc_info=True)
            return False
        return True

    def _replayed(self, entry: Entry, outcome: Outcome, now: float) -> None:
        lag = now - entry.queued_at if outcome == "delivered" else None
        self.metrics.replayed(outcome, lag)
        if outcome == "delivered":
            self._last_delivered = now
        if outcome != "retried":
            self._depth = max(0, self._depth - 1)
            self._backlog()

    async def _housekeeping(self) -> None:
        last_expire = last_publish = float("-inf")
        while True:
            mono = self._clock.monotonic()
            if mono - last_expire >= EXPIRE_EVERY:
                last_expire = mono
                await self._expire()
            await self._refresh(force_publish=mono - last_publish >= PUBLISH_EVERY)
            if self._published is not None and mono - last_publish >= PUBLISH_EVERY:
                last_publish = mono
            self._feed(Tick())
            await asyncio.sleep(STATS_EVERY)

    async def _expire(self) -> None:
        try:
            expired = await self.queue.expire(now=self._clock.now().timestamp())
        except Exception:  # housekeeping must outlive a bad moment of the disk
            log.exception("proxy_expire_failed")
            return
        if expired:
            log.warning("proxy_entries_expired", count=len(expired))
            for _ in expired:
                self.metrics.replayed("dead")
            self._depth = max(0, self._depth - len(expired))
            self._backlog()

    async def _refresh(self, *, force_publish: bool) -> None:
        generation = self._enqueued
        try:
            stats = await self.queue.stats(now=self._clock.now().timestamp())
        except Exception:  # logged; the last good figures stay exported
            log.exception("proxy_stats_failed")
            return
        self._stats = stats
        self.metrics.queue_stats = stats
        # Re-sync the depth from disk (the CLI may retry dead letters behind our back), but
        # not with a read that may predate an enqueue: an undercount could let a new write
        # overtake a queued one, an overcount only delays going online by a second.
        if generation == self._enqueued and self._enqueuing == 0:
            self._depth = stats.depth
            self._backlog()
        key = (stats.depth, stats.dead)
        if force_publish or key != self._published:
            self._published = key
            self.hub.publish(QueueStats(self.site_id, stats.depth, stats.oldest_age_s, stats.dead))

    # --- status -----------------------------------------------------------------------------

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
            "passive_hold_until": state.suspect_until.isoformat() if state.suspect_until else None,
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
            },
            "replay": {
                "in_flight": self._replayer.in_flight if self._replayer else 0,
                "rate_per_s": self._replayer.rate() if self._replayer else None,
            },
            "checked_at": iso(self._clock.now().timestamp()),
            "site": self._site,
            # The last replayed entry delivered (forwards online are not entries).
            "last_delivered_at": iso(self._last_delivered),
        }
