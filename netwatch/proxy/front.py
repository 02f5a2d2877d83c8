"""The fast front: plain station requests served on an asyncio protocol, the rest by aiohttp.

Each station connection starts here. A request whose head is *plain* (``wire.py`` says
exactly what that is: in short, a complete, strictly formed HTTP/1.x request with at most a
Content-Length body, outside ``/_netwatch``) is parsed with httptools and handed to the
same ``Dispatcher`` as the aiohttp app, and its answer is written straight to the socket.
The first request that is not plain hands the connection over, with every byte not yet
consumed, to aiohttp's own protocol, which serves it from then on: every bad-input and
smuggling defence stays aiohttp's, and the ``/_netwatch`` endpoints live only there.

As in the aiohttp app: one request at a time per connection (pipelined ones wait, in
order); a replayable body still arriving is awaited within ``body_timeout`` (else 408 and
the connection closes); a non-replayable one still arriving is handed over (aiohttp
streams it upstream); a station that hangs up does not cancel its request (a write it sent
is still forwarded or queued); a handler failure answers 500 JSON; an upstream answer cut
after its head cuts the station's connection. The slow-client deadlines and the connection
cap are ``ConnectionLimits``' as before: this protocol marks its busy spans there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import structlog
from multidict import CIMultiDict

from netwatch.proxy.connections import ConnectionLimits
from netwatch.proxy.dedupe import rule_for
from netwatch.proxy.dispatch import Answer, Dispatcher, error
from netwatch.proxy.flow import WriteGate
from netwatch.proxy.forward import (
    BODYLESS,
    SMALL_RESPONSE,
    BodyTooLarge,
    Response,
    ResponseCut,
    response_headers,
)
from netwatch.proxy.wire import HEAD_END, MAX_HEAD, Head, HeadScan, json_answer, parse_head
from netwatch.proxy.wire import response_head as render_head

log = structlog.get_logger("netwatch.proxy.front")

# Bytes of later (pipelined) requests buffered while one is served, before reading pauses.
PIPELINE_BUFFER = 256 * 1024
# The largest body the fast front buffers itself; a larger one is handed over.
MAX_FAST_BODY = 1024 * 1024

Fallback = Callable[[], asyncio.Protocol]


class FastRequest:
    """A plain request, as the dispatcher reads it (``dispatch.Station``)."""

    __slots__ = ("_body", "_front", "_head", "remote")

    scheme = "http"

    def __init__(self, head: Head, body: bytes | None, front: StationFront) -> None:
        self._head = head
        self._body = body
        self._front = front
        self.remote = front.peer

    @property
    def method(self) -> str:
        return self._head.method

    @property
    def path(self) -> str:
        return self._head.path

    @property
    def raw_path(self) -> str:
        return self._head.path  # a plain path has no escapes: decoded and raw agree

    @property
    def raw_query(self) -> str:
        return self._head.raw_query

    @property
    def headers(self) -> CIMultiDict[str]:
        return self._head.headers

    @property
    def content_length(self) -> int | None:
        return self._head.content_length

    @property
    def body_exists(self) -> bool:
        return self._head.body_size > 0

    def body_arrived(self) -> bool:
        return self._body is not None

    async def read_body(self, limit: int) -> bytes:
        if self._body is None:
            self._body = await self._front.body()
        if len(self._body) > limit:
            raise BodyTooLarge
        return self._body

    def streamed(self, limit: int) -> bytes:
        # Only a complete body reaches a forward that streams (see ``StationFront._take``).
        if self._body is None or len(self._body) > limit:
            raise BodyTooLarge
        return self._body


class StationFront(asyncio.Protocol):
    """One station connection (see the module docstring)."""

    def __init__(self, owner: Fronts) -> None:
        self._owner = owner
        self._dispatcher = owner.dispatcher
        self._limits = owner.limits
        self._fallback = owner.fallback
        self._max_body = owner.max_body
        self._transport: asyncio.Transport | None = None
        self._inner: asyncio.Protocol | None = None  # aiohttp's, once handed over
        self._buf = bytearray()
        self._scan = HeadScan()  # the head still arriving, checked as it comes
        self._task: asyncio.Task[None] | None = None
        self._waiting_body: tuple[int, asyncio.Future[bytes]] | None = None
        self._gate = WriteGate()
        self._reading_paused = False
        self._eof = False
        self._lost = False
        self._closing = False
        self._answered = False  # the current request's response head is written
        self._closing_soon = False  # shutting down: close after the current request
        self.peer: str | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # a TCP server's transports
        self._transport = transport
        self._owner.open.add(self)
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else None

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
            return
        if self._closing:
            return
        buf = self._buf
        buf += data
        if self._waiting_body is not None:
            need, future = self._waiting_body
            if len(buf) >= need:
                self._waiting_body = None
                if not future.done():
                    future.set_result(self._consume(need))
            return
        if self._task is None:
            self._next()
        elif len(buf) > PIPELINE_BUFFER and not self._reading_paused:
            self._reading_paused = True
            self._transport_or_raise().pause_reading()

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        self._eof = True
        self._fail_body_wait()
        if self._task is None:
            self._close()
        return True  # half-open: the answer in progress still goes out

    def pause_writing(self) -> None:
        self._gate.pause()
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._gate.resume()
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.open.discard(self)
        self._lost = True
        self._fail_body_wait()
        self._gate.lose()  # a writer waiting ends as "the station left" (reset)
        if self._inner is not None:
            self._inner.connection_lost(exc)

    # --- requests -------------------------------------------------------------------------

    def _transport_or_raise(self) -> asyncio.Transport:
        if self._transport is None:
            raise RuntimeError("no connection yet")
        return self._transport

    def _next(self) -> None:
        """Take the next request from the buffer, if its head is in (called when idle)."""
        buf = self._buf
        if self._lost or self._closing:
            return
        if self._reading_paused:
            self._reading_paused = False
            self._transport_or_raise().resume_reading()
        if not buf:
            if self._eof:
                self._close()
            return
        scan = self._scan
        end = buf.find(HEAD_END, max(0, scan.scanned - 3), MAX_HEAD + len(HEAD_END))
        if end < 0:
            if len(buf) > MAX_HEAD or not scan.plain(buf):
                self._hand_over()
            elif self._eof:
                self._close()  # a head that will never end
            return
        scan.reset()
        size = end + len(HEAD_END)
        head = parse_head(bytes(buf[:size]), self._max_body)
        if head is None:
            self._hand_over()
            return
        self._take(head, size)

    def _take(self, head: Head, size: int) -> None:
        need = size + head.body_size
        if len(self._buf) >= need:
            del self._buf[:size]
            body = self._consume(head.body_size) if head.body_size else b""
            request = FastRequest(head, body, self)
        else:
            settings = self._dispatcher.settings
            if rule_for(settings.replayable, head.method, head.path) is None:
                self._hand_over()  # aiohttp streams a body it need not keep
                return
            del self._buf[:size]
            request = FastRequest(head, None, self)
            future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self._waiting_body = (head.body_size, future)
        transport = self._transport_or_raise()
        self._limits.busy(transport)
        self._task = asyncio.get_running_loop().create_task(self._serve(request, head))

    def _consume(self, size: int) -> bytes:
        body = bytes(self._buf[:size])
        del self._buf[:size]
        return body

    async def body(self) -> bytes:
        """The body of the request being served, once it has all arrived."""
        if self._waiting_body is None:
            raise ConnectionResetError("the station closed before its body")
        return await self._waiting_body[1]

    def _fail_body_wait(self) -> None:
        if self._waiting_body is not None:
            _, future = self._waiting_body
            self._waiting_body = None
            if not future.done():
                future.set_exception(ConnectionResetError("the station closed before its body"))

    def _hand_over(self) -> None:
        """aiohttp's protocol takes the connection from here, with the unread bytes."""
        transport = self._transport_or_raise()
        self._owner.open.discard(self)  # aiohttp's server closes it on shutdown
        self._owner.handed_over += 1
        inner = self._inner = self._fallback()
        inner.connection_made(transport)
        if self._gate.paused:
            inner.pause_writing()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        data = bytes(self._buf)
        self._buf.clear()
        if data:
            inner.data_received(data)
        if self._eof:
            inner.eof_received()

    async def _serve(self, request: FastRequest, head: Head) -> None:
        dispatcher = self._dispatcher
        keep_alive = head.keep_alive
        self._answered = False
        try:
            outcome, answer = await dispatcher.handle(request)
            if self._waiting_body is not None:
                keep_alive = False  # the rest of an unread body would pass for a request
            if isinstance(answer, Answer):
                keep_alive = keep_alive and not answer.close
                self._write_answer(head, answer, keep_alive)
            else:
                keep_alive = await self._relay(head, answer, keep_alive)
            dispatcher.counted(head.method, outcome)
        except ResponseCut as cut:
            dispatcher.cut(cut.reason)
            dispatcher.counted(head.method, "failed")
            log.warning("proxy_response_cut", method=head.method, reason=str(cut))
            self.abort()
        except ConnectionResetError:
            log.debug("proxy_station_disconnected", method=head.method)
            self.abort()
        except Exception:
            log.exception("proxy_handler_failed", method=head.method)
            keep_alive = False
            if self._answered:  # a head is out already: only a cut can tell the station
                self.abort()
            else:
                self._write_answer(head, error(500, "internal_error"), keep_alive)
        finally:
            self._task = None
            self._fail_body_wait()
            if self._transport is not None:
                self._limits.idle(self._transport)
        if not keep_alive or self._closing_soon:
            self._close()
        elif not self._closing:
            self._next()

    def _write(self, data: bytes) -> None:
        if not self._lost and not self._closing and self._transport is not None:
            self._transport.write(data)

    def _write_answer(self, head: Head, answer: Answer, keep_alive: bool) -> None:
        self._write(
            json_answer(
                head.minor, answer.status, answer.payload, answer.headers, keep_alive=keep_alive
            )
        )

    def _relay_head(self, head: Head, upstream: Response, keep_alive: bool, framing: str) -> bytes:
        self._answered = True
        headers = response_headers(upstream.headers).items()
        return render_head(
            head.minor,
            upstream.status,
            upstream.reason,
            headers,
            keep_alive=keep_alive,
            framing=framing,
        )

    async def _relay(self, head: Head, upstream: Response, keep_alive: bool) -> bool:
        """The upstream's answer to the station, as ``server.relay`` writes it; False when
        the connection must close after it."""
        length = upstream.content_length
        try:
            if upstream.status in BODYLESS:
                self._write(self._relay_head(head, upstream, keep_alive, ""))
            elif length is not None and length <= SMALL_RESPONSE:
                body = await upstream.read()
                framing = f"Content-Length: {len(body)}\r\n"
                self._write(self._relay_head(head, upstream, keep_alive, framing) + body)
            else:
                return await self._stream(head, upstream, keep_alive)
        finally:
            upstream.release()
        return keep_alive

    async def _stream(self, head: Head, upstream: Response, keep_alive: bool) -> bool:
        length = upstream.content_length
        chunked = length is None and head.minor == 1
        # HTTP/1.0 and no length: the body ends when the connection does.
        keep_alive = keep_alive and (length is not None or chunked)
        if length is not None:
            framing = f"Content-Length: {length}\r\n"
        else:
            framing = "Transfer-Encoding: chunked\r\n" if chunked else ""
        self._write(self._relay_head(head, upstream, keep_alive, framing))
        while chunk := await upstream.read_chunk():
            self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            await self._gate.wait()
        if chunked:
            self._write(b"0\r\n\r\n")
        return keep_alive

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None and not self._lost:
            self._transport.close()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def shut(self) -> asyncio.Task[None] | None:
        """Take no more requests: close now if idle, else return the request's task."""
        if self._task is None:
            self._close()
        self._closing_soon = True
        return self._task


class Fronts:
    """Makes the fast front of each new connection, and closes those still open."""

    def __init__(self, dispatcher: Dispatcher, limits: ConnectionLimits, fallback: Fallback):
        self.dispatcher = dispatcher
        self.limits = limits
        self.fallback = fallback
        self.max_body = min(dispatcher.settings.max_body, MAX_FAST_BODY)
        self.open: set[StationFront] = set()
        self.handed_over = 0  # connections aiohttp's server took over, since the start

    def __call__(self) -> StationFront:
        return StationFront(self)

    async def close(self, grace: float) -> None:
        """Idle connections close at once; requests in progress get ``grace`` seconds to
        finish (as aiohttp's shutdown gives its own), then are cancelled and their
        connections cut. (Each request's task is made here, per request, like aiohttp's:
        ``_serve`` answers or logs every failure, and this waits for the last ones.)"""
        busy = [task for front in list(self.open) if (task := front.shut()) is not None]
        if busy:
            _, late = await asyncio.wait(busy, timeout=grace)
            for task in late:  # as aiohttp's shutdown does with its handlers
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=grace)
        for front in list(self.open):
            front.abort()
