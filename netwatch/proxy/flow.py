"""Write flow control for the proxy's hand-written protocols (the fast front's station
connections, the upstream client's connections).

The transport calls ``pause_writing`` when its buffer passes the high-water mark and
``resume_writing`` when it drains; a writer awaits ``WriteGate.wait`` between chunks, so a
slow reader holds the writer instead of growing the buffer. Once the connection is lost,
``wait`` raises ``ConnectionResetError``: a writer already waiting gets the error ``lose``
was given, if any."""

from __future__ import annotations

import asyncio


class WriteGate:
    """``pause``/``resume``/``lose`` from the protocol's callbacks; ``wait`` for writers."""

    __slots__ = ("_lost", "_paused", "_waiter")

    def __init__(self) -> None:
        self._paused = False
        self._lost = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def lose(self, exc: BaseException | None = None) -> None:
        """The connection is gone: no writer waits for it any more."""
        self._lost = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionResetError("connection lost"))

    async def wait(self) -> None:
        """Return once writing may go on (at once when it may)."""
        if self._lost:
            raise ConnectionResetError("connection lost")
        if self._paused:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
