"""Peak-hour windows of a site: is it peak now, when does that change, how much of an
interval was peak.

Windows are written in the site's wall-clock time ("07:30" in ``Asia/Ho_Chi_Minh``) at
minute granularity, so the whole weekly pattern fits in one table of 10 080 minutes; that
table is the single source of truth, which makes overlapping windows and windows wrapping
past midnight (or past Sunday night) fall out without special cases.

Instants go in as timezone-aware datetimes in any zone and come out in UTC. Comparing or
subtracting two datetimes that share a ``ZoneInfo`` uses naive wall-clock arithmetic in
Python, which is wrong across DST changes; working in UTC inside avoids that trap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

if TYPE_CHECKING:
    from netwatch.config.schema import Config, PeakWindow

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_MINUTES_PER_DAY = 24 * 60
_MINUTES_PER_WEEK = 7 * _MINUTES_PER_DAY
# A non-trivial weekly pattern flips within any 7 days of wall time; the longer second
# scan only matters when a DST gap swallows every flip of a week.
_NEAR_WEEKS = range(-1, 2)
_FAR_WEEKS = range(2, 54)


def _minute_of_day(text: str) -> int:
    hours, _, minutes = text.partition(":")
    return int(hours) * 60 + int(minutes)


def _to_utc(when: datetime) -> datetime:
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"a timezone-aware datetime is needed, got {when!r}")
    return when.astimezone(UTC)


class PeakSchedule:
    """The peak-hour windows of one site, answering questions about instants."""

    def __init__(self, windows: Sequence[PeakWindow], timezone: str) -> None:
        self._windows = tuple(windows)
        self._timezone = timezone
        self._tz = ZoneInfo(timezone)
        week = bytearray(_MINUTES_PER_WEEK)
        for window in self._windows:
            start = _minute_of_day(window.start)
            # end < start wraps past midnight; the window belongs to the day it starts.
            length = (_minute_of_day(window.end) - start) % _MINUTES_PER_DAY
            for day in window.days:
                first = _WEEKDAYS.index(day) * _MINUTES_PER_DAY + start
                for minute in range(first, first + length):
                    week[minute % _MINUTES_PER_WEEK] = 1
        self._week = bytes(week)
        # Minutes of the week (from Monday 00:00) where the value differs from the minute
        # before, cyclically: the only wall-clock instants where is_peak can flip.
        self._boundaries = tuple(m for m in range(_MINUTES_PER_WEEK) if week[m] != week[m - 1])

    @classmethod
    def from_config(cls, config: Config) -> PeakSchedule:
        return cls(config.peak_hours, config.site.timezone)

    @property
    def windows(self) -> tuple[PeakWindow, ...]:
        return self._windows

    @property
    def timezone(self) -> str:
        return self._timezone

    def __repr__(self) -> str:
        return f"PeakSchedule({len(self._windows)} windows, timezone={self._timezone!r})"

    def is_peak(self, when: datetime) -> bool:
        """Whether the aware instant ``when`` falls inside a window, in the site's time."""
        local = _to_utc(when).astimezone(self._tz)
        minute = local.weekday() * _MINUTES_PER_DAY + local.hour * 60 + local.minute
        return self._week[minute] == 1

    def next_change(self, when: datetime) -> datetime | None:
        """The first instant after ``when`` where ``is_peak`` flips (UTC), or None if never."""
        if not self._boundaries:
            return None
        now = _to_utc(when)
        current = self.is_peak(now)
        local = now.astimezone(self._tz).replace(tzinfo=None)
        monday = (local - timedelta(days=local.weekday())).replace(
            hour=0, minute=0, second=0, microsecond=0
        )
        for weeks in (_NEAR_WEEKS, _FAR_WEEKS):
            found = self._first_flip(now, current, self._candidates(monday, weeks))
            if found is not None:
                return found
        return None

    def split(self, start: datetime, end: datetime) -> tuple[float, float]:
        """``(off_peak_seconds, peak_seconds)`` of ``[start, end)``, exact at boundaries."""
        begin, stop = _to_utc(start), _to_utc(end)
        if stop < begin:
            raise ValueError(f"end {end.isoformat()} is before start {start.isoformat()}")
        # timedelta sums are exact to the microsecond; floats only at the very end.
        off_peak = peak = timedelta(0)
        cursor = begin
        while cursor < stop:
            change = self.next_change(cursor)
            segment_end = stop if change is None else min(change, stop)
            if self.is_peak(cursor):
                peak += segment_end - cursor
            else:
                off_peak += segment_end - cursor
            cursor = segment_end
        return off_peak.total_seconds(), peak.total_seconds()

    # --- internals ------------------------------------------------------------------------

    def _candidates(self, monday: datetime, weeks: Iterable[int]) -> list[datetime]:
        """Sorted UTC instants where a flip may happen, in the given weeks around ``monday``.

        A wall time inside a DST fold happens twice and one inside a gap never, so each
        boundary is tried with both folds; spurious candidates are harmless because the
        caller checks that the value really flips.
        """
        instants: set[datetime] = set()
        for week in weeks:
            week_start = monday + timedelta(weeks=week)
            for minute in self._boundaries:
                wall = week_start + timedelta(minutes=minute)
                for fold in (0, 1):
                    instants.add(wall.replace(tzinfo=self._tz, fold=fold).astimezone(UTC))
        return sorted(instants)

    def _first_flip(
        self, now: datetime, current: bool, candidates: list[datetime]
    ) -> datetime | None:
        # Between two consecutive candidates with the same UTC offset the wall clock runs
        # smoothly and crosses no boundary, so is_peak is constant there; a change of
        # offset in between (real zones change months apart, candidates at most weeks) is
        # the one other place a flip can happen.
        previous = now
        for candidate in candidates:
            if candidate <= now:
                continue
            if self._offset(previous) != self._offset(candidate):
                shift = self._offset_change(previous, candidate)
                if self.is_peak(shift) != current:
                    return shift
            if self.is_peak(candidate) != current:
                return candidate
            previous = candidate
        return None

    def _offset(self, instant: datetime) -> timedelta | None:
        return instant.astimezone(self._tz).utcoffset()

    def _offset_change(self, low: datetime, high: datetime) -> datetime:
        """The first instant in ``(low, high]`` with another UTC offset than ``low``.

        tzdb changes offsets on whole seconds, so bisecting on integer seconds is exact.
        """
        before = self._offset(low)
        lo, hi = math.floor(low.timestamp()), math.ceil(high.timestamp())
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._offset(datetime.fromtimestamp(mid, UTC)) == before:
                lo = mid
            else:
                hi = mid
        return datetime.fromtimestamp(hi, UTC)
