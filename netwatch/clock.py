"""Time as an injected dependency: monotonic for intervals, wall for humans and peak hours."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What the daemon needs to know about time."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary origin, never going backwards."""
        ...

    def now(self) -> datetime:
        """The timezone-aware wall-clock time (UTC)."""
        ...


class SystemClock:
    """The real clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)


class FakeClock:
    """A clock that only moves when told to; for pure state-machine tests."""

    def __init__(self, start: datetime | None = None, monotonic: float = 1000.0) -> None:
        self._wall = start or datetime(2026, 11, 23, 0, 0, tzinfo=UTC)
        self._mono = monotonic

    def monotonic(self) -> float:
        return self._mono

    def now(self) -> datetime:
        return self._wall

    def advance(self, seconds: float) -> None:
        self._mono += seconds
        self._wall += timedelta(seconds=seconds)

    def step_wall(self, seconds: float) -> None:
        """Step the wall clock only (an NTP step, an operator's ``date -s``)."""
        self._wall += timedelta(seconds=seconds)


class FileTime:
    """Unix seconds for the times a file shared with other processes keeps (the station
    queue's ``queued_at``, ``age_from``, ``next_attempt_at``).

    Between ``resync`` calls it advances with the monotonic clock only, so a step of the
    wall clock changes nothing until its owner has dealt with it (shifted the file's times,
    see ``StationProxy``) and resyncs; ``step()`` says how far the wall clock has moved away.
    """

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._wall = 0.0
        self._mono = 0.0
        self.resync()

    def now(self) -> float:
        return self._wall + (self._clock.monotonic() - self._mono)

    def step(self) -> float:
        """Seconds the wall clock is ahead of this frame (negative: behind)."""
        return self._clock.now().timestamp() - self.now()

    def resync(self) -> None:
        """Take the wall clock as it is now."""
        self._wall = self._clock.now().timestamp()
        self._mono = self._clock.monotonic()
