"""Fixtures shared by the test modules."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from netwatch import loop
from netwatch.demo.simulator import PopulationSimulator


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on the loop the daemon would pick (``NETWATCH_LOOP``: uvloop
    where installed; ``make test-asyncio`` runs the suite again on the standard loop).
    Child processes (``netwatch run`` in the end-to-end tests) inherit the variable."""
    name, factory = loop.loop_factory()
    return {name: factory}


def pytest_report_header(config: pytest.Config) -> str:
    return f"event loop: {loop.loop_factory()[0]} (NETWATCH_LOOP=auto|uvloop|asyncio)"


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
