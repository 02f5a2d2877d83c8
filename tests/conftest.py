"""Fixtures shared by the test modules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from netwatch.demo.simulator import PopulationSimulator


@pytest.fixture
async def tcp_upstream() -> AsyncIterator[int]:
    """A loopback TCP service that accepts and closes: what a healthy gateway looks like."""

    async def handle(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@pytest.fixture
async def sim() -> AsyncIterator[PopulationSimulator]:
    """The population-database simulator on a free loopback port (modules may override)."""
    async with PopulationSimulator() as simulator:
        yield simulator
