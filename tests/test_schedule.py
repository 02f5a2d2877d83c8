"""Peak-hour schedule: wall-clock windows in the site's zone, asked about UTC instants."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netwatch.config.schema import PeakWindow, parse_config
from netwatch.monitor.schedule import PeakSchedule

HCM = "Asia/Ho_Chi_Minh"  # UTC+7 all year, no DST
NEW_YORK = "America/New_York"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
US = timedelta(microseconds=1)

OFFICE = (
    PeakWindow(days=("mon", "tue", "wed", "thu", "fri"), start="07:30", end="11:30"),
    PeakWindow(days=("mon-fri",), start="13:30", end="16:30"),
)


def hcm(day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> datetime:
    """A wall time in Ho Chi Minh City in November 2026 (the 23rd is a Monday)."""
    return datetime(2026, 11, day, hour, minute, second, us, tzinfo=ZoneInfo(HCM))


@pytest.fixture
def office() -> PeakSchedule:
    return PeakSchedule(OFFICE, HCM)


@pytest.mark.parametrize(
    ("when", "peak"),
    [
        (hcm(23, 7, 29, 59), False),
        (hcm(23, 7, 30), True),
        (hcm(23, 11, 29, 59, 999999), True),
        (hcm(23, 11, 30), False),
        (hcm(23, 12, 0), False),
        (hcm(23, 13, 30), True),
        (hcm(23, 16, 29), True),
        (hcm(23, 16, 30), False),
        (hcm(27, 9, 0), True),  # Friday
        (hcm(28, 9, 0), False),  # Saturday
        (hcm(29, 14, 0), False),  # Sunday
    ],
)
def test_office_hours_in_ho_chi_minh(office: PeakSchedule, when: datetime, peak: bool) -> None:
    assert office.is_peak(when) is peak


def test_utc_and_other_zones_are_converted_to_the_site_zone(office: PeakSchedule) -> None:
    assert office.is_peak(datetime(2026, 11, 23, 0, 30, tzinfo=UTC))  # 07:30 in HCM
    assert not office.is_peak(datetime(2026, 11, 23, 0, 29, 59, tzinfo=UTC))
    # Sunday 19:00 in Paris is already Monday 01:00 in HCM: not peak; 02:30 Paris = 08:30 HCM.
    paris = ZoneInfo("Europe/Paris")
    assert not office.is_peak(datetime(2026, 11, 22, 19, 0, tzinfo=paris))
    assert office.is_peak(datetime(2026, 11, 23, 2, 30, tzinfo=paris))


def test_naive_datetimes_are_refused(office: PeakSchedule) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        office.is_peak(datetime(2026, 11, 23, 8, 0))


def test_window_wrapping_past_midnight_belongs_to_its_start_day() -> None:
    night = PeakSchedule([PeakWindow(days=("fri",), start="22:00", end="02:00")], HCM)
    assert night.is_peak(hcm(27, 22, 0))  # Friday
    assert night.is_peak(hcm(28, 1, 59))  # Saturday morning, still Friday's window
    assert not night.is_peak(hcm(28, 2, 0))
    assert not night.is_peak(hcm(28, 23, 0))  # Saturday night: not listed
    assert not night.is_peak(hcm(27, 1, 0))  # Friday morning: Thursday's, not listed
    assert night.next_change(hcm(27, 23, 0)) == hcm(28, 2, 0)


def test_sunday_night_window_wraps_into_monday() -> None:
    night = PeakSchedule([PeakWindow(days=("sun",), start="23:00", end="01:00")], HCM)
    assert night.is_peak(hcm(23, 0, 30))  # Monday 00:30
    assert night.split(hcm(22, 22, 0), hcm(23, 2, 0)) == (7200.0, 7200.0)


def test_next_change_walks_the_boundaries_and_answers_in_utc(office: PeakSchedule) -> None:
    when = hcm(23, 7, 0)
    expected = [
        hcm(23, 7, 30),
        hcm(23, 11, 30),
        hcm(23, 13, 30),
        hcm(23, 16, 30),
        hcm(24, 7, 30),
    ]
    for boundary in expected:
        change = office.next_change(when)
        assert change == boundary
        assert change is not None
        assert change.tzinfo is UTC
        when = change


def test_next_change_skips_the_weekend(office: PeakSchedule) -> None:
    assert office.next_change(hcm(27, 17, 0)) == hcm(30, 7, 30)
    assert office.next_change(hcm(29, 23, 59)) == hcm(30, 7, 30)


def test_next_change_is_none_without_windows_or_without_flips() -> None:
    assert PeakSchedule([], HCM).next_change(hcm(23, 8, 0)) is None
    every_day = (*DAYS,)
    always = PeakSchedule(
        [
            PeakWindow(days=every_day, start="00:00", end="12:00"),
            PeakWindow(days=every_day, start="12:00", end="00:00"),
        ],
        HCM,
    )
    assert always.is_peak(hcm(23, 3, 0))
    assert always.next_change(hcm(23, 3, 0)) is None
    assert always.split(hcm(23), hcm(24)) == (0.0, 86400.0)


def test_split_is_exact_at_boundaries(office: PeakSchedule) -> None:
    assert office.split(hcm(23, 7, 0), hcm(23, 8, 0)) == (1800.0, 1800.0)
    assert office.split(hcm(23), hcm(24)) == (17 * 3600.0, 7 * 3600.0)
    week = office.split(hcm(23), hcm(30))
    assert week == ((7 * 24 - 35) * 3600.0, 35 * 3600.0)
    saturday = office.split(hcm(28), hcm(29))
    assert saturday == (86400.0, 0.0)


def test_split_of_empty_and_reversed_intervals(office: PeakSchedule) -> None:
    when = hcm(23, 8, 0)
    assert office.split(when, when) == (0.0, 0.0)
    with pytest.raises(ValueError, match="before start"):
        office.split(when, when - US)


def test_split_accepts_mixed_zones(office: PeakSchedule) -> None:
    start = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)  # 07:00 HCM
    assert office.split(start, hcm(23, 8, 0)) == (1800.0, 1800.0)


def test_from_config_uses_peak_hours_and_site_timezone() -> None:
    config = parse_config(
        """
site: {id: q1, timezone: Asia/Ho_Chi_Minh}
peak_hours:
  - {days: [mon, tue, wed, thu, fri], start: "07:30", end: "11:30"}
  - {days: [mon-fri], start: "13:30", end: "16:30"}
"""
    )
    schedule = PeakSchedule.from_config(config)
    assert schedule.timezone == HCM
    assert schedule.windows == OFFICE
    assert schedule.is_peak(datetime(2026, 11, 23, 1, 0, tzinfo=UTC))


# --- DST: the wall clock jumps, the schedule follows the wall clock ---------------------


def test_window_cut_short_by_spring_forward_ends_at_the_jump() -> None:
    # 2026-03-08 02:00 EST becomes 03:00 EDT (07:00 UTC); 01:00-02:30 loses its end.
    schedule = PeakSchedule([PeakWindow(days=("sun",), start="01:00", end="02:30")], NEW_YORK)
    inside = datetime(2026, 3, 8, 6, 1, tzinfo=UTC)
    assert schedule.is_peak(inside)
    assert schedule.next_change(inside) == datetime(2026, 3, 8, 7, 0, tzinfo=UTC)
    day = schedule.split(
        datetime(2026, 3, 8, 5, 0, tzinfo=UTC), datetime(2026, 3, 9, 4, 0, tzinfo=UTC)
    )
    assert day == (23 * 3600.0 - 3600.0, 3600.0)


def test_window_inside_the_spring_forward_gap_never_happens_that_day() -> None:
    schedule = PeakSchedule([PeakWindow(days=("sun",), start="02:15", end="02:45")], NEW_YORK)
    change = schedule.next_change(datetime(2026, 3, 7, 12, 0, tzinfo=UTC))
    assert change == datetime(2026, 3, 15, 2, 15, tzinfo=ZoneInfo(NEW_YORK))


def test_window_inside_the_fall_back_fold_happens_twice() -> None:
    # 2026-11-01 02:00 EDT becomes 01:00 EST: 01:30-01:45 occurs at 05:30 and 06:30 UTC.
    schedule = PeakSchedule([PeakWindow(days=("sun",), start="01:30", end="01:45")], NEW_YORK)
    when = datetime(2026, 11, 1, 5, 0, tzinfo=UTC)
    changes = []
    for _ in range(4):
        change = schedule.next_change(when)
        assert change is not None
        changes.append(change)
        when = change
    assert [c.strftime("%H:%M") for c in changes] == ["05:30", "05:45", "06:30", "06:45"]
    sunday = schedule.split(
        datetime(2026, 11, 1, 4, 0, tzinfo=UTC), datetime(2026, 11, 2, 5, 0, tzinfo=UTC)
    )
    assert sunday == (25 * 3600.0 - 1800.0, 1800.0)


# --- properties -------------------------------------------------------------------------


def _minutes(text: str) -> int:
    return int(text[:2]) * 60 + int(text[3:])


def reference_is_peak(windows: list[PeakWindow], zone: str, when: datetime) -> bool:
    """Straight from the window definitions, independent of the schedule's weekly table."""
    local = when.astimezone(ZoneInfo(zone))
    minute = local.hour * 60 + local.minute
    today, yesterday = DAYS[local.weekday()], DAYS[(local.weekday() - 1) % 7]
    for window in windows:
        start, end = _minutes(window.start), _minutes(window.end)
        if start < end:
            if today in window.days and start <= minute < end:
                return True
        elif (today in window.days and minute >= start) or (
            yesterday in window.days and minute < end
        ):
            return True
    return False


times_of_day = st.builds(
    lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.sampled_from([0, 15, 30, 45])
)
peak_windows = st.builds(
    lambda days, bounds: PeakWindow(days=tuple(days), start=bounds[0], end=bounds[1]),
    st.lists(st.sampled_from(DAYS), min_size=1, max_size=7, unique=True),
    st.tuples(times_of_day, times_of_day).filter(lambda b: b[0] != b[1]),
)
window_lists = st.lists(peak_windows, max_size=3)
instants = st.datetimes(
    min_value=datetime(2024, 1, 1),  # hypothesis wants naive bounds
    max_value=datetime(2030, 12, 31),
    timezones=st.just(UTC),
)
zones = st.sampled_from([HCM, NEW_YORK, "Europe/Berlin", "UTC"])


@settings(max_examples=200, deadline=None)
@given(windows=window_lists, zone=zones, when=instants)
def test_is_peak_matches_the_window_definitions(
    windows: list[PeakWindow], zone: str, when: datetime
) -> None:
    assert PeakSchedule(windows, zone).is_peak(when) is reference_is_peak(windows, zone, when)


@settings(max_examples=150, deadline=None)
@given(windows=window_lists, zone=zones, when=instants)
def test_next_change_is_the_first_flip(
    windows: list[PeakWindow], zone: str, when: datetime
) -> None:
    schedule = PeakSchedule(windows, zone)
    change = schedule.next_change(when)
    if change is None:
        # Never flips: the value is the same at every minute of the next eight days.
        probe = [when + timedelta(minutes=m) for m in range(0, 8 * 24 * 60, 7)]
        assert len({schedule.is_peak(t) for t in probe}) == 1
        return
    assert change > when
    assert schedule.is_peak(change) is not schedule.is_peak(when)
    assert schedule.is_peak(change - US) is schedule.is_peak(when)
    if zone == HCM:
        # No DST: a plain minute-by-minute scan finds the same instant.
        minute = when.replace(second=0, microsecond=0) + timedelta(minutes=1)
        while reference_is_peak(windows, zone, minute) is reference_is_peak(windows, zone, when):
            minute += timedelta(minutes=1)
        assert change == minute


@settings(max_examples=150, deadline=None)
@given(
    windows=window_lists,
    zone=zones,
    start=instants,
    length=st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=9)),
)
def test_split_sums_to_the_interval(
    windows: list[PeakWindow], zone: str, start: datetime, length: timedelta
) -> None:
    off_peak, peak = PeakSchedule(windows, zone).split(start, start + length)
    assert off_peak >= 0
    assert peak >= 0
    assert math.isclose(off_peak + peak, length.total_seconds(), abs_tol=1e-6)


@settings(max_examples=200, deadline=None)
@given(
    windows=window_lists,
    zone=zones,
    start=instants,
    length=st.timedeltas(min_value=US, max_value=timedelta(seconds=90)),
)
def test_split_of_a_tiny_interval_agrees_with_is_peak(
    windows: list[PeakWindow], zone: str, start: datetime, length: timedelta
) -> None:
    schedule = PeakSchedule(windows, zone)
    off_peak, peak = schedule.split(start, start + length)
    change = schedule.next_change(start)
    before_change = length if change is None else min(length, change - start)
    first_part, rest = (peak, off_peak) if schedule.is_peak(start) else (off_peak, peak)
    assert first_part == pytest.approx(before_change.total_seconds(), abs=1e-6)
    assert rest == pytest.approx((length - before_change).total_seconds(), abs=1e-6)
