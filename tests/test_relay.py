"""The fault relay, each mode proven with real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from helpers.relay import FaultRelay
from helpers.servers import EchoServer, wait_until


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    async with EchoServer() as server:
        yield server


@pytest.fixture
async def relay(echo: EchoServer) -> AsyncIterator[FaultRelay]:
    async with FaultRelay("127.0.0.1", echo.port, delay=0.2) as fault_relay:
        yield fault_relay


async def connect(relay: FaultRelay) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*relay.address)


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), timeout=2.0)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def read_until_closed(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """Everything readable, and how the stream ended: "eof" or "reset"."""
    data = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout=2.0):
            data += chunk
    except ConnectionResetError:
        return data, "reset"
    return data, "eof"


async def test_pass_mode_copies_bytes_both_ways(relay: FaultRelay, echo: EchoServer) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"hello") == b"hello"
    assert await roundtrip(reader, writer, b"x" * 200_000) == b"x" * 200_000
    await close(writer)
    assert relay.connections_total == 1
    assert relay.bytes_forwarded == 2 * 200_005
    await wait_until(lambda: relay.active_connections == 0)


async def test_refuse_resets_existing_connections(relay: FaultRelay) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"ping") == b"ping"
    relay.mode = "refuse"
    assert await read_until_closed(reader) == (b"", "reset")
    await close(writer)


async def test_refuse_gives_econnrefused_then_pass_listens_on_the_same_port(
    relay: FaultRelay,
) -> None:
    port = relay.port
    relay.set_mode("refuse")
    for _ in range(3):
        with pytest.raises(ConnectionRefusedError):
            await connect(relay)
    relay.set_mode("pass")
    assert relay.port == port
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"back") == b"back"
    await close(writer)


async def test_blackhole_accepts_but_never_answers(relay: FaultRelay, echo: EchoServer) -> None:
    relay.mode = "blackhole"
    reader, writer = await connect(relay)
    writer.write(b"anyone there?")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), timeout=0.3)
    assert echo.received == []
    relay.mode = "pass"
    assert await read_until_closed(reader) == (b"", "reset")
    await close(writer)


async def test_blackhole_stalls_existing_connections_and_swallows_bytes(
    relay: FaultRelay, echo: EchoServer
) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"before") == b"before"
    relay.mode = "blackhole"
    writer.write(b"lost")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), timeout=0.3)
    assert bytes(echo.received[0]) == b"before"
    relay.mode = "pass"
    assert await read_until_closed(reader) == (b"", "reset")
    await close(writer)


async def test_blackhole_leaves_idle_connections_usable(relay: FaultRelay) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"a") == b"a"
    relay.mode = "blackhole"
    await asyncio.sleep(0.05)
    relay.mode = "pass"
    assert await roundtrip(reader, writer, b"b") == b"b"
    await close(writer)


async def test_delay_adds_the_delay_to_each_direction(relay: FaultRelay) -> None:
    reader, writer = await connect(relay)
    started = time.monotonic()
    assert await roundtrip(reader, writer, b"fast") == b"fast"
    assert time.monotonic() - started < 0.2
    relay.mode = "delay"
    started = time.monotonic()
    assert await roundtrip(reader, writer, b"slow") == b"slow"
    assert time.monotonic() - started >= 2 * relay.delay
    await close(writer)


async def test_cut_resets_existing_connections(relay: FaultRelay) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"ok") == b"ok"
    relay.mode = "cut"
    assert await read_until_closed(reader) == (b"", "reset")
    await close(writer)


async def test_cut_closes_new_connections_mid_stream(relay: FaultRelay, echo: EchoServer) -> None:
    relay.cut_after_bytes = 5
    relay.mode = "cut"
    reader, writer = await connect(relay)
    writer.write(b"0123456789")
    await writer.drain()
    data, ending = await read_until_closed(reader)
    assert ending == "reset"
    assert len(data) <= 5
    await wait_until(lambda: echo.received and bytes(echo.received[0]) == b"01234")
    await close(writer)


async def test_cut_with_no_budget_resets_on_accept(relay: FaultRelay, echo: EchoServer) -> None:
    relay.mode = "cut"
    reader, writer = await connect(relay)
    assert await read_until_closed(reader) == (b"", "reset")
    assert echo.received == []
    await close(writer)


async def test_relay_starts_in_refuse_and_counts_connections(echo: EchoServer) -> None:
    relay = FaultRelay("127.0.0.1", echo.port)
    relay.mode = "refuse"
    async with relay:
        with pytest.raises(ConnectionRefusedError):
            await connect(relay)
        relay.mode = "pass"
        for _ in range(3):
            reader, writer = await connect(relay)
            assert await roundtrip(reader, writer, b"n") == b"n"
            await close(writer)
        assert relay.connections_total == 3


async def test_unreachable_target_resets_the_client() -> None:
    async with EchoServer() as gone:
        port = gone.port
    async with FaultRelay("127.0.0.1", port) as relay:
        reader, writer = await connect(relay)
        assert await read_until_closed(reader) == (b"", "reset")
        await close(writer)


def test_unknown_mode_is_rejected() -> None:
    relay = FaultRelay("127.0.0.1", 9)
    with pytest.raises(ValueError, match="unknown relay mode"):
        relay.set_mode("flaky")  # type: ignore[arg-type]
