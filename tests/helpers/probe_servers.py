"""Real loopback servers for the probe tests, each an async context manager.

Every server binds 127.0.0.1 on a kernel-chosen port and is torn down on exit, so tests
run in parallel and never touch anything off the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
import struct
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Iterator, Mapping
from dataclasses import dataclass, field

import trustme
from aiohttp import web

T = typing.TypeVar("T")

BODY = "netwatch probe target ok\n"


async def timed(run: Awaitable[T]) -> tuple[T, float]:
    """Await ``run``; return its result and the wall time it took."""
    started = time.perf_counter()
    result = await run
    return result, time.perf_counter() - started


def server_context(ca: trustme.CA, not_after: dt.datetime | None = None) -> ssl.SSLContext:
    """A server TLS context with a ``ca``-issued certificate for 127.0.0.1 and localhost."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost", not_after=not_after).configure_cert(context)
    return context


def _bound_socket(kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    return sock


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def http_server(ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """An aiohttp app; yields its base URL (``http://`` or ``https://127.0.0.1:PORT``)."""

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text=BODY)

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="no such page\n")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    app = web.Application()
    app.router.add_route("*", "/ok", ok)
    app.router.add_get("/missing", missing)
    app.router.add_get("/redirect", redirect)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    sock = _bound_socket()
    site = web.SockSite(runner, sock, ssl_context=ssl_context)
    await site.start()
    scheme = "https" if ssl_context else "http"
    try:
        yield f"{scheme}://127.0.0.1:{port_of(sock)}"
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A listening socket that is never accepted from: the kernel completes the TCP
    handshake, then nothing is ever said. Yields the port."""
    sock = _bound_socket()
    sock.listen(64)
    try:
        yield port_of(sock)
    finally:
        sock.close()


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A port bound but not listening (held, so nobody else takes it): connects are refused."""
    sock = _bound_socket()
    try:
        yield port_of(sock)
    finally:
        sock.close()


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A listener whose accept queue is full: the kernel drops new SYNs, connects hang."""
    listener = _bound_socket()
    listener.listen(0)
    port = port_of(listener)
    fillers: list[socket.socket] = []
    try:
        # Fill the queue until a connect no longer completes (its SYN is being dropped).
        for _ in range(16):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.2)
            fillers.append(filler)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@contextlib.asynccontextmanager
async def resetting_server() -> AsyncIterator[int]:
    """Accepts and immediately resets every connection. Yields the port."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        writer.close()

    server = await asyncio.start_server(handle, sock=_bound_socket())
    try:
        yield port_of(server.sockets[0])
    finally:
        server.close()
        await server.wait_closed()


@dataclass
class Scripted:
    """A scripted HTTP server's base URL and the request heads it received, in order."""

    url: str
    requests: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def scripted_http_server(
    answers: Mapping[str, bytes], *, host: str = "127.0.0.1", hold: frozenset[str] = frozenset()
) -> AsyncIterator[Scripted]:
    """Answers each request for a path with the bytes given for it (``{base}`` in them is
    the server's base URL), exactly as given: any framing, or a cut. Then it closes the
    connection, or (paths in ``hold``) keeps it open until the client closes it. Unknown
    paths get a 404. Yields a ``Scripted``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    name = f"[{host}]" if ":" in host else host
    scripted = Scripted(f"http://{name}:{port_of(sock)}")
    missing = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            scripted.requests.append(head)
            path = head.split(" ", 2)[1]
            answer = answers.get(path, missing)
            writer.write(answer.replace(b"{base}", scripted.url.encode()))
            await writer.drain()
            if path in hold:
                await reader.read()  # until the client closes
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, sock=sock)
    try:
        yield scripted
    finally:
        server.close()
        await server.wait_closed()


# --- DNS ----------------------------------------------------------------------------------

_QTYPE_A = 1
_RCODE_NXDOMAIN = 3


def _dns_answer(query: bytes, zone: Mapping[str, list[str]]) -> bytes | None:
    """Answer one query from ``zone`` (name -> IPv4 addresses), by hand-built packet."""
    if len(query) < 12:
        return None
    ident, flags = struct.unpack("!HH", query[:4])
    labels, pos = [], 12
    while pos < len(query) and query[pos] != 0:
        length = query[pos]
        labels.append(query[pos + 1 : pos + 1 + length].decode("ascii").lower())
        pos += 1 + length
    if pos + 5 > len(query):
        return None
    question = query[12 : pos + 5]  # name, its terminating zero, qtype, qclass
    (qtype,) = struct.unpack("!H", query[pos + 1 : pos + 3])
    name = ".".join(labels)
    rcode = 0 if name in zone else _RCODE_NXDOMAIN
    answers = zone.get(name, []) if qtype == _QTYPE_A else []
    header = struct.pack("!HHHHHH", ident, 0x8180 | (flags & 0x0100) | rcode, 1, len(answers), 0, 0)
    records = b"".join(
        struct.pack("!HHHIH", 0xC00C, _QTYPE_A, 1, 60, 4) + socket.inet_aton(address)
        for address in answers
    )
    return header + question + records


class _DnsProtocol(asyncio.DatagramProtocol):
    def __init__(self, zone: Mapping[str, list[str]]) -> None:
        self.zone = zone
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector datagram transport does not subclass DatagramTransport.
        self.transport = typing.cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, int]) -> None:
        answer = _dns_answer(data, self.zone)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, addr)


@contextlib.asynccontextmanager
async def dns_server(zone: Mapping[str, list[str]]) -> AsyncIterator[str]:
    """A UDP DNS responder for A records; unknown names get NXDOMAIN. Yields ``ip:port``."""
    loop = asyncio.get_running_loop()
    sock = _bound_socket(socket.SOCK_DGRAM)
    transport, _ = await loop.create_datagram_endpoint(lambda: _DnsProtocol(zone), sock=sock)
    try:
        yield f"127.0.0.1:{port_of(sock)}"
    finally:
        transport.close()


@contextlib.contextmanager
def silent_dns_server() -> Iterator[str]:
    """A bound UDP port that never answers. Yields ``ip:port``."""
    sock = _bound_socket(socket.SOCK_DGRAM)
    try:
        yield f"127.0.0.1:{port_of(sock)}"
    finally:
        sock.close()
