"""Station connections: deadlines for slow and idle clients, and a cap on how many are open.

A connection is either *waiting* for a complete request head, or *busy* (a handler runs).
A waiting connection has a deadline: ``header_timeout`` after it was opened, then
``idle_timeout`` after each answer (keep-alive). A sweep closes every waiting connection
past its deadline; a busy one is bounded by the handler (``body_timeout`` for the body it
buffers, ``request_timeout`` upstream).

At most ``cap`` connections are open. A new one beyond the cap closes the connection that
has waited longest for its request head (a slow or idle client), so a station still gets
in while a thousand slow sockets are open; if every connection is busy, the new one is
closed instead. The cap is kept below the open-file limit, so ``accept()`` never fails with
"Too many open files".

Each connection's protocol (the fast front, which may hand over to aiohttp's) is wrapped
(``protocol_factory``) to see connections open and close; the front calls ``busy`` and
``idle`` around the requests it serves, ``middleware`` around aiohttp's.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import structlog
from aiohttp import web

log = structlog.get_logger("netwatch.proxy.connections")

SWEEP_EVERY = 0.5
# Descriptors the proxy needs besides station connections: the upstream pool, the queue
# files, probes, the metrics and MQTT sockets, logs.
FD_RESERVE = 160

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def connection_cap(configured: int, reserve: int = FD_RESERVE) -> int:
    """``configured``, lowered to fit under the soft open-file limit (at least 16)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, soft - reserve))


@dataclass(slots=True)
class _Conn:
    deadline: float  # while waiting for a request head; ignored while busy
    busy: int = 0  # handlers running (pipelining may overlap one closing, one starting)


class ConnectionLimits:
    """Tracks the station connections of one server (see the module docstring)."""

    def __init__(
        self,
        *,
        header_timeout: float,
        idle_timeout: float,
        cap: int,
        clock: Callable[[], float],
    ) -> None:
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.cap = cap
        self._clock = clock
        self._conns: dict[asyncio.Transport, _Conn] = {}  # oldest first
        self.evicted = 0  # closed to make room for a new connection
        self.timed_out = 0  # closed for a missed deadline
        self.refused = 0  # closed at once: every connection was busy

    @property
    def open(self) -> int:
        return len(self._conns)

    def protocol_factory(
        self, inner: Callable[[], asyncio.BaseProtocol]
    ) -> Callable[[], asyncio.Protocol]:
        return lambda: _Tracked(inner(), self)

    def admit(self, transport: asyncio.Transport) -> bool:
        if len(self._conns) >= self.cap and not self._make_room():
            self.refused += 1
            log.warning("proxy_connection_refused", open=len(self._conns), cap=self.cap)
            return False
        self._conns[transport] = _Conn(self._clock() + self.header_timeout)
        return True

    def _make_room(self) -> bool:
        for transport, conn in self._conns.items():  # the oldest first
            if not conn.busy:
                del self._conns[transport]
                transport.abort()
                self.evicted += 1
                return True
        return False

    def closed(self, transport: asyncio.Transport) -> None:
        self._conns.pop(transport, None)

    def busy(self, transport: asyncio.Transport) -> None:
        """A request is being served on ``transport``: no deadline while it lasts."""
        conn = self._conns.get(transport)
        if conn is not None:
            conn.busy += 1

    def idle(self, transport: asyncio.Transport) -> None:
        """Its request answered: the next one must come within ``idle_timeout``."""
        conn = self._conns.get(transport)
        if conn is not None:
            conn.busy -= 1
            conn.deadline = self._clock() + self.idle_timeout

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        if transport is None:
            return await handler(request)
        self.busy(transport)  # (both a no-op for a connection no longer tracked)
        try:
            return await handler(request)
        finally:
            self.idle(transport)

    def sweep(self) -> int:
        """Close the waiting connections past their deadline; how many were closed."""
        now = self._clock()
        late = [t for t, c in self._conns.items() if not c.busy and c.deadline <= now]
        for transport in late:
            del self._conns[transport]
            transport.abort()
        self.timed_out += len(late)
        return len(late)

    async def run(self) -> None:
        """Sweep until cancelled (in the proxy's TaskGroup)."""
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            if closed := self.sweep():
                log.info("proxy_slow_connections_closed", count=closed, open=self.open)


class _Tracked(asyncio.Protocol):
    """The aiohttp protocol of one connection, seen opening and closing."""

    __slots__ = ("_admitted", "_inner", "_limits", "_transport")

    def __init__(self, inner: asyncio.BaseProtocol, limits: ConnectionLimits) -> None:
        self._inner = inner
        self._limits = limits
        self._transport: asyncio.Transport | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # a TCP server's transports
        self._transport = transport
        if not self._limits.admit(transport):
            transport.abort()
            return
        self._admitted = True
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._admitted:
            self._inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        if self._admitted:
            return self._inner.eof_received()  # type: ignore[attr-defined, no-any-return]
        return None

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._limits.closed(self._transport)
        if self._admitted:
            self._inner.connection_lost(exc)
