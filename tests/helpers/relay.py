"""A fault-injecting TCP relay: put it between a client and a server, then break the link.

    async with FaultRelay("127.0.0.1", upstream_port) as relay:
        client connects to relay.address (relay.url for HTTP)
        relay.mode = "refuse"        # or relay.set_mode("refuse"), at any time

Modes, and what each does to connections that already exist:

``pass``
    Copy bytes both ways.
``refuse``
    The listening socket is closed, so new connects fail with ECONNREFUSED; existing
    connections are reset (the far host went away). The port stays bound (not listening)
    so nobody else can take it; leaving ``refuse`` listens on the SAME port again.
``blackhole``
    New connections are accepted but never forwarded nor answered. On existing ones every
    byte, in either direction, is swallowed, so they stall. Swallowed bytes leave a gap in
    the stream, so leaving ``blackhole`` resets every connection that lost bytes or was
    accepted during it (as TCP would, once it gave up retransmitting).
``delay``
    Each chunk waits ``relay.delay`` seconds before it is forwarded, in both directions.
``cut``
    Existing connections are reset at once. New ones forward at most
    ``relay.cut_after_bytes`` bytes in each direction, then both sides are reset
    (mid-stream); with 0 they are reset as soon as they are accepted.

Resets are real TCP RSTs (``SO_LINGER`` 0), so peers see ``ConnectionResetError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Coroutine
from typing import Any, Literal, Self, get_args

RelayMode = Literal["pass", "refuse", "blackhole", "delay", "cut"]
MODES: tuple[str, ...] = get_args(RelayMode)
_CHUNK = 65536


def _rst(writer: asyncio.StreamWriter | None) -> None:
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # ValueError: uvloop's socket object of a transport already closed has no descriptor.
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and, once connected, its upstream connection."""

    def __init__(self, stalled: bool) -> None:
        self.client: asyncio.StreamWriter | None = None
        self.upstream: asyncio.StreamWriter | None = None
        self.dead = False
        self.stalled = stalled  # lost bytes to a black hole, or was accepted in one

    def reset(self) -> None:
        self.dead = True
        _rst(self.client)
        _rst(self.upstream)

    async def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


class FaultRelay:
    """A TCP relay on a free loopback port whose ``mode`` can be switched at any time."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        *,
        delay: float = 0.5,
        cut_after_bytes: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.port = 0
        self.delay = delay
        self.cut_after_bytes = cut_after_bytes
        self.connections_total = 0
        self.bytes_forwarded = 0
        self.bytes_swallowed = 0  # by the black hole: a request that is surely in it
        self._mode: RelayMode = "pass"
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sock: socket.socket | None = None
        self._listening = False
        self._tg: asyncio.TaskGroup | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (self.listen_host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    @property
    def active_connections(self) -> int:
        return len(self._links)

    @property
    def mode(self) -> RelayMode:
        return self._mode

    @mode.setter
    def mode(self, mode: RelayMode) -> None:
        self.set_mode(mode)

    def set_mode(self, mode: RelayMode) -> None:
        """Switch mode now; see the module docstring for the effect on live connections."""
        if mode not in MODES:
            raise ValueError(f"unknown relay mode {mode!r}; use one of {', '.join(MODES)}")
        old, self._mode = self._mode, mode
        if self._tg is None or mode == old:
            return
        if mode in {"refuse", "cut"}:
            self._reset_links(everyone=True)
        elif old == "blackhole":
            self._reset_links(everyone=False)
        if mode == "refuse":
            self._stop_listening()
        elif old == "refuse":
            self._start_listening()

    async def __aenter__(self) -> Self:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._bind()
        if self._mode != "refuse":
            self._start_listening()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        tg, self._tg = self._tg, None
        self._stop_listening()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._reset_links(everyone=True)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=2.0)
            for task in pending:
                task.cancel()
        if tg is not None:
            # Pass only cancellation on: the TaskGroup would wrap any other error of the
            # body in an ExceptionGroup, and a failing test should fail with its own error.
            if exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
                await tg.__aexit__(exc_type, exc, tb)
            else:
                await tg.__aexit__(None, None, None)

    # --- the listening socket -------------------------------------------------------------

    def _bind(self) -> None:
        family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setblocking(False)
        try:
            sock.bind((self.listen_host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._sock = sock

    def _start_listening(self) -> None:
        if self._sock is None:
            self._bind()
        assert self._sock is not None
        self._sock.listen(128)
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept, self._sock)
        self._listening = True

    def _stop_listening(self) -> None:
        """Close the listener (its backlog gets reset) and keep the port bound, not listening."""
        if not self._listening or self._sock is None:
            return
        asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None
        self._listening = False
        if self._tg is not None:
            self._bind()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                raw, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:  # the client gave up while waiting in the backlog
                continue
            raw.setblocking(False)
            self.connections_total += 1
            link = _Link(stalled=self._mode == "blackhole")
            self._links.add(link)
            self._spawn(self._serve(link, raw))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._tg is not None
        task = self._tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reset_links(self, *, everyone: bool) -> None:
        for link in list(self._links):
            if everyone or link.stalled:
                link.reset()

    # --- one connection -------------------------------------------------------------------

    async def _serve(self, link: _Link, raw: socket.socket) -> None:
        finished = False
        try:
            reader, link.client = await asyncio.open_connection(sock=raw)
            if link.dead:
                return
            if link.stalled:
                while chunk := await reader.read(_CHUNK):
                    self.bytes_swallowed += len(chunk)
                return
            if self._mode == "cut" and self.cut_after_bytes <= 0:
                return
            try:
                up_reader, link.upstream = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                return
            if link.dead:
                return
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(link, reader, link.upstream))
                tg.create_task(self._pump(link, up_reader, link.client))
            finished = not link.dead
        finally:
            self._links.discard(link)
            if finished:
                await link.close()
            else:
                link.reset()

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sent = 0
        try:
            while not link.dead:
                chunk = await reader.read(_CHUNK)
                if not chunk:
                    if not link.dead and writer.can_write_eof():
                        writer.write_eof()
                    return
                mode = self._mode
                if mode == "blackhole":
                    link.stalled = True
                    self.bytes_swallowed += len(chunk)
                    continue
                if mode == "delay":
                    await asyncio.sleep(self.delay)
                elif mode == "cut":
                    chunk = chunk[: max(0, self.cut_after_bytes - sent)]
                if link.dead:
                    return
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
                self.bytes_forwarded += len(chunk)
                if mode == "cut" and sent >= self.cut_after_bytes:
                    link.reset()
        except OSError:
            link.reset()
