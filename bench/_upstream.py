"""A fast upstream and a breakable relay for the proxy benchmarks, each in its own process.

    python bench/_upstream.py serve [--max-seconds 3600]
    python bench/_upstream.py relay --target PORT [--max-seconds 3600]

``serve`` is a minimal HTTP/1.1 keep-alive responder on raw asyncio protocols (no framework,
so the upstream costs as little CPU as possible): ``POST /api/applications`` answers 200
``{"id": N, "status": "accepted"}``, any ``GET`` (``/health`` included) 200
``{"status": "ok"}``, anything else 404. Bodies are read by ``Content-Length``; pipelined
requests are answered in order. It counts the writes it receives per ``Idempotency-Key``: the
line ``receipts`` on stdin answers ``{"receipts": N, "keys": K, "repeated": R}`` (R keys
received more than once), so a benchmark can tell a fast proxy from one that sends twice.

``relay`` forwards TCP from a loopback port to ``127.0.0.1:TARGET`` and reads commands on
stdin, one a line, answering ``ok MODE`` on stdout once applied:

- ``pass``: relay bytes both ways (reopens the listener on the same port if it was closed);
- ``refuse``: close the listener (new connections are refused) and reset every open
  connection (RST), like a dead upstream host that still answers on the network;
- ``blackhole``: accept new connections but never connect them anywhere, and drop every byte
  of the open ones both ways: nothing is ever answered. (The TCP handshake still completes,
  which a real black hole would not; there the connect would fail after the proxy's
  ``connect_timeout``, which is shorter than its ``request_timeout``: this is the worse case.)

Both print one JSON line (``{"port": N}``) once listening, then run until stdin closes or
``--max-seconds`` pass. ``start()`` / ``stop()`` drive them from the parent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import selectors
import socket
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve()
BACKLOG = 4096
MAX_HEAD = 64 * 1024


def _response(status: str, body: bytes, *, close: bool = False) -> bytes:
    conn = b"Connection: close\r\n" if close else b""
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n" + conn + b"\r\n" + body
    )


HEALTH = _response("200 OK", b'{"status": "ok"}')
NOT_FOUND = _response("404 Not Found", b'{"error": "not_found"}')
BAD = _response("400 Bad Request", b'{"error": "bad_request"}', close=True)


def _fields(lines: list[str]) -> dict[str, str]:
    """Header fields by lower-case name (the last one wins), values stripped."""
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return fields


class _Http(asyncio.Protocol):
    """One keep-alive connection: parse heads, skip bodies by Content-Length, answer."""

    created = 0
    receipts: ClassVar[Counter[str]] = Counter()  # writes received per Idempotency-Key

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    self._answer(BAD, close=True)
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            method, _, rest = lines[0].partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            fields = _fields(lines[1:])
            if "transfer-encoding" in fields:
                self._answer(BAD, close=True)  # not needed by the benchmarks
                return
            length = int(fields.get("content-length", "0"))
            close = fields.get("connection", "").lower() == "close"
            key = fields.get("idempotency-key", "")
            if len(self.buf) < end + 4 + length:
                return  # the body is still coming
            del self.buf[: end + 4 + length]
            if method == "POST" and path == "/api/applications":
                _Http.created += 1
                if key:  # sent directly (no proxy in between), a write has none
                    _Http.receipts[key] += 1
                body = b'{"id": %d, "status": "accepted"}' % _Http.created
                self._answer(_response("200 OK", body, close=close), close=close)
            elif method == "GET":
                ok = _response("200 OK", b'{"status": "ok"}', close=True) if close else HEALTH
                self._answer(ok, close=close)
            else:
                self._answer(NOT_FOUND, close=close)

    def _answer(self, payload: bytes, close: bool) -> None:
        assert self.transport is not None
        self.transport.write(payload)
        if close:
            self.transport.close()
            self.transport = None


def _rst(transport: asyncio.BaseTransport) -> None:
    """Close with RST (SO_LINGER 0) instead of FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Relay:
    """The relay's listener, its connection pairs, and the current mode."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.mode = "pass"
        self.port = 0
        self.server: asyncio.Server | None = None
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter | None]] = set()

    async def listen(self) -> None:
        self.server = await asyncio.start_server(
            self._client, "127.0.0.1", self.port, reuse_address=True, backlog=BACKLOG
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def apply(self, mode: str) -> None:
        if mode not in {"pass", "refuse", "blackhole"}:
            raise ValueError(mode)
        self.mode = mode
        if mode == "refuse":
            if self.server is not None:
                self.server.close()
                self.server = None
            for client, upstream in list(self.pairs):
                _rst(client.transport)
                if upstream is not None:
                    _rst(upstream.transport)
            self.pairs.clear()
        elif mode == "pass" and self.server is None:
            await self.listen()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter | None] = (writer, None)
        self.pairs.add(pair)
        try:
            if self.mode != "pass":
                await self._pipe(reader, None)  # swallow until the peer gives up
                return
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
            except OSError:
                _rst(writer.transport)
                return
            self.pairs.discard(pair)
            pair = (writer, up_writer)
            self.pairs.add(pair)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self.pairs.discard(pair)
            for w in pair:
                if w is not None:
                    w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if self.mode == "pass" and writer is not None:
                    writer.write(data)
                    await writer.drain()
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()


async def _stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve(max_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Http, "127.0.0.1", 0, backlog=BACKLOG)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    stdin = await _stdin_lines()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max_seconds):
            while line := await stdin.readline():
                if line.strip() == b"receipts":
                    counts = _Http.receipts
                    repeated = sum(1 for n in counts.values() if n > 1)
                    total = {"receipts": counts.total(), "keys": len(counts), "repeated": repeated}
                    print(json.dumps(total), flush=True)
    server.close()


async def relay(target: int, max_seconds: float) -> None:
    state = _Relay(target)
    await state.listen()
    print(json.dumps({"port": state.port}), flush=True)
    stdin = await _stdin_lines()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(max_seconds):
            while line := await stdin.readline():
                mode = line.decode().strip()
                try:
                    await state.apply(mode)
                except ValueError:
                    print(f"error unknown mode {mode!r}", flush=True)
                else:
                    print(f"ok {mode}", flush=True)
    await state.apply("refuse")


# --- the parent's side -----------------------------------------------------------------------


def start(mode: str, *args: str, timeout: float = 20.0) -> tuple[subprocess.Popen[str], int]:
    """Run ``serve`` or ``relay`` in a child process; return it and its port."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE), mode, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = _readline(proc, timeout)
    return proc, int(json.loads(line)["port"])


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            proc.kill()
            raise RuntimeError(f"{proc.args} did not answer within {timeout}s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{proc.args} exited (code {proc.wait()})")
    return line


def command(proc: subprocess.Popen[str], mode: str, timeout: float = 5.0) -> None:
    """Switch a relay's mode and wait until it is applied."""
    assert proc.stdin is not None
    proc.stdin.write(mode + "\n")
    proc.stdin.flush()
    answer = _readline(proc, timeout).strip()
    if answer != f"ok {mode}":
        raise RuntimeError(f"relay answered {answer!r} to {mode!r}")


def receipts(proc: subprocess.Popen[str], timeout: float = 5.0) -> dict[str, int]:
    """What a ``serve`` child received: writes, distinct keys, keys received twice or more."""
    assert proc.stdin is not None
    proc.stdin.write("receipts\n")
    proc.stdin.flush()
    counts: dict[str, int] = json.loads(_readline(proc, timeout))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("serve", "relay"))
    parser.add_argument("--target", type=int, help="relay: the port to forward to")
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args()
    if args.mode == "serve":
        asyncio.run(serve(args.max_seconds))
    else:
        if args.target is None:
            parser.error("relay needs --target")
        asyncio.run(relay(args.target, args.max_seconds))


if __name__ == "__main__":
    main()
