"""The optional parts of a daemon (station proxy, MQTT bridge, alerts, webhooks) and how
events flow between them. Only ``daemon.py`` uses this module."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import structlog

from netwatch.config import Config

if TYPE_CHECKING:
    from netwatch.daemon import Daemon

log = structlog.get_logger("netwatch.wiring")


class Extras:
    """Holds whatever optional components the config asks for."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    async def enter(self, stack: AsyncExitStack) -> None:
        """Open the components that own resources (sockets, files)."""

    def start(self, tg: asyncio.TaskGroup) -> None:
        """Start their long-lived tasks in the daemon's TaskGroup."""

    def reload(self, config: Config) -> None:
        """Apply what can change without a restart."""

    def status(self) -> dict[str, Any]:
        return {}
