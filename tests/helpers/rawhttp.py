"""Raw HTTP/1.1 on loopback sockets: send bytes exactly as written, read what comes back
(for the tests of hand-written servers and of what they make of bad input)."""

from __future__ import annotations

import asyncio

import httptools

Reply = tuple[int, dict[str, str], bytes]


async def exchange(port: int, raw: bytes, *, half_close: bool = True) -> bytes:
    """Send ``raw`` and read until the server closes (at most 10 s)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        if half_close:
            writer.write_eof()
        return await read_to_end(reader)
    finally:
        writer.close()


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    """What comes until the server closes (at most 10 s), kept when it ends with a reset."""
    data = b""
    async with asyncio.timeout(10):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


class _Replies:
    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self._headers: dict[str, str] = {}
        self._body = b""

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.replies.append((self.parser.get_status_code(), self._headers, self._body))
        self._headers, self._body = {}, b""

    def feed(self, data: bytes) -> list[Reply]:
        self.parser = httptools.HttpResponseParser(self)
        self.parser.feed_data(data)
        return self.replies


def replies(data: bytes) -> list[Reply]:
    """The responses in ``data``, bodies de-chunked (none of them to a HEAD)."""
    return _Replies().feed(data)


def request(path: str, method: str = "GET", *extra: str, version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: 127.0.0.1", *extra, "", ""]
    return "\r\n".join(lines).encode()


async def talk(port: int, raw: bytes, *, quiet: float = 0.2) -> tuple[bytes, bool]:
    """Send ``raw`` (no half-close) and read until the server closes, or until it has said
    something and then stayed quiet for ``quiet`` seconds (the first byte is awaited up to
    5 s); returns what came and whether the server closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = b""
    try:
        writer.write(raw)
        async with asyncio.timeout(10):
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), quiet if data else 5)
                except TimeoutError:
                    return data, False
                except ConnectionResetError:
                    return data, True
                if not chunk:
                    return data, True
                data += chunk
    finally:
        writer.close()
