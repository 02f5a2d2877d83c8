"""Real loopback servers for tests, started and stopped by async context managers."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Self, TypeVar, cast

from aiohttp import web

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (prefer binding port 0 where the API allows it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return cast(int, sock.getsockname()[1])


@asynccontextmanager
async def run_http_server(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> AsyncIterator[str]:
    """Serve ``app`` on loopback and yield its base URL (``http://127.0.0.1:PORT``);
    ``options``: more ``web.AppRunner`` options (``auto_decompress=False``: bodies raw)."""
    runner = web.AppRunner(app, **{"access_log": None, "shutdown_timeout": 1.0, **options})
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        bound_port = cast(tuple[str, int], runner.addresses[0])[1]
        yield f"http://{host}:{bound_port}"
    finally:
        await runner.cleanup()


async def wait_for_port(host: str, port: int, timeout: float = 5.0) -> None:
    """Wait until something accepts TCP connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            last_error = exc
            await asyncio.sleep(0.02)
        else:
            writer.close()
            await writer.wait_closed()
            return
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s ({last_error!r})")


async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 5.0,
    interval: float = 0.02,
    message: str = "",
) -> T:
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that.

    On timeout, fail with the predicate's name, ``message`` and the last value it returned.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return cast(T, value)
        if time.monotonic() >= deadline:
            name = getattr(predicate, "__qualname__", repr(predicate))
            detail = f": {message}" if message else ""
            raise AssertionError(
                f"condition {name} not met within {timeout}s{detail}; last value {value!r}"
            )
        await asyncio.sleep(interval)


class EchoServer:
    """A TCP echo server on loopback that records, per connection, the bytes it received.

    Built on a Protocol so every received chunk is recorded even when a reset follows it.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.received: list[bytearray] = []
        self._server: asyncio.Server | None = None
        self._connections: list[_Echo] = []

    async def __aenter__(self) -> Self:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, self.host, 0)
        self.port = cast(int, self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.close()
            for connection in self._connections:
                connection.close()
            await self._server.wait_closed()

    def _protocol(self) -> asyncio.Protocol:
        buffer = bytearray()
        self.received.append(buffer)
        connection = _Echo(buffer)
        self._connections.append(connection)
        return connection


class _Echo(asyncio.Protocol):
    def __init__(self, buffer: bytearray) -> None:
        self._buffer = buffer
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer.extend(data)
        if self._transport is not None:
            self._transport.write(data)

    def eof_received(self) -> bool:
        return False

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
