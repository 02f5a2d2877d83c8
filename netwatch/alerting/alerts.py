"""Alert de-duplication: link and queue events in, alert events out. Pure, no asyncio.

Every alert is keyed by ``(alert, target)`` and is a small two-state machine driven by a
*condition* (is the problem present now?):

===================  ====================  =====================================================
alert                condition set by      condition cleared by
===================  ====================  =====================================================
``LinkDown``         link ``down``         link ``up`` or ``degraded``
``LinkDegraded``     link ``degraded``     link ``up`` (``down`` holds it: worse, not better)
``QueueBacklog``     oldest entry older    oldest entry younger than ``backlog_age``
                     than ``backlog_age``
``DeadLetters``      dead letters > 0      no dead letters
``QueueUnreadable``  entries set aside     none left (retried or purged)
                     as unreadable > 0
``QueueDiskFull``    a queue write found   a queue write committed again
                     the disk full
``QueueDamaged``     SQLite found the      a restart on a whole (salvaged) file
                     queue file corrupt
===================  ====================  =====================================================

A set condition fires once. A cleared condition resolves only after it has stayed clear for
``hold_down`` seconds, so a flapping link (down, up, down within ``hold_down``) produces one
``firing`` and, once it is stable, one ``resolved``: never a storm. Time comes in as ``now``,
an ``Instant``; ``tick(now)`` releases the resolutions whose hold-down has elapsed.

Hold-downs and how long an alert lasted are measured on ``now.mono``, the monotonic clock;
``now.wall`` only stamps ``since`` and the summaries for humans. So a wall clock stepped back
an hour does not hold a resolution for an hour, and one stepped forward does not cut a
hold-down short (docs/contract-notes.md, "Clock steps").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from netwatch.clock import Instant
from netwatch.events import LinkChanged, QueueStats
from netwatch.words import plural

AlertName = Literal[
    "LinkDown",
    "LinkDegraded",
    "QueueBacklog",
    "DeadLetters",
    "QueueUnreadable",
    "QueueDiskFull",
    "QueueDamaged",
]
Status = Literal["firing", "resolved"]

#: The pseudo-target of the station-queue alerts.
QUEUE_TARGET = "queue"


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One notification: an alert started (``firing``) or ended (``resolved``)."""

    alert: str
    status: str
    target: str
    since: datetime
    peak: bool
    summary: str
    summary_vi: str
    site: str

    def to_payload(self) -> dict[str, Any]:
        """The JSON object of the MQTT ``alerts`` topic and of webhooks (see CONTRACT.md)."""
        return {
            "alert": self.alert,
            "status": self.status,
            "target": self.target,
            "since": self.since.isoformat(),
            "peak": self.peak,
            "summary": self.summary,
            "summary_vi": self.summary_vi,
            "site": self.site,
        }


HOLD_SLACK = 1e-6


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    """How eager alerts are. ``hold_down`` comes from ``notify.hold_down``."""

    hold_down: float = 30.0
    backlog_age: float = 15 * 60.0
    timezone: str = "Asia/Ho_Chi_Minh"


@dataclass(slots=True)
class _Active:
    """A fired, not yet resolved alert; ``cleared_at`` is set while its hold-down runs.

    ``since`` and ``cleared_at`` are wall times for the messages; the ``*_mono`` twins
    time the hold-down and the duration.
    """

    since: datetime
    since_mono: float
    detail: dict[str, Any]
    cleared_at: datetime | None = None
    cleared_mono: float = 0.0
    cleared_peak: bool = False

    @property
    def lasted(self) -> float:
        """Seconds from the condition's start to its clearing (so far, if not cleared)."""
        return max(0.0, self.cleared_mono - self.since_mono)


_Change = Literal["set", "clear", "hold"]

# new link state -> what it does to each link alert (the table in the module docstring).
_LINK_TABLE: dict[str, dict[AlertName, _Change]] = {
    "up": {"LinkDown": "clear", "LinkDegraded": "clear"},
    "degraded": {"LinkDown": "clear", "LinkDegraded": "set"},
    "down": {"LinkDown": "set", "LinkDegraded": "hold"},
}


class AlertState:
    """The de-duplicating alert machine of one site."""

    def __init__(self, policy: AlertPolicy, site: str) -> None:
        self.policy = policy
        self.site = site
        self._tz = ZoneInfo(policy.timezone)
        self._active: dict[tuple[str, str], _Active] = {}

    @property
    def firing(self) -> frozenset[tuple[str, str]]:
        """The ``(alert, target)`` pairs currently firing (including those in hold-down)."""
        return frozenset(self._active)

    def on_link(self, event: LinkChanged, now: Instant) -> list[AlertEvent]:
        """Feed a link change; returns the alerts to send now."""
        out = self.tick(now)
        detail = {"latency_ms": event.latency_ms, "loss": event.loss, "reason": event.reason}
        for alert, change in _LINK_TABLE.get(event.new, {}).items():
            out += self._apply(
                alert,
                event.target,
                change,
                now=now,
                since=event.since,
                age=0.0,
                peak=event.peak,
                detail=detail,
            )
        return out

    def on_queue(self, stats: QueueStats, now: Instant, peak: bool = False) -> list[AlertEvent]:
        """Feed a queue snapshot; ``peak`` tells whether ``now`` is inside peak hours."""
        out = self.tick(now)
        backlog: _Change = "set" if stats.oldest_age_s > self.policy.backlog_age else "clear"
        dead: _Change = "set" if stats.dead > 0 else "clear"
        detail = {
            "depth": stats.depth,
            "oldest_age_s": stats.oldest_age_s,
            "dead": stats.dead,
            "unreadable": stats.unreadable,
        }
        age = max(0.0, stats.oldest_age_s)
        conditions: tuple[tuple[AlertName, _Change, float], ...] = (
            ("QueueBacklog", backlog, age),
            ("DeadLetters", dead, 0.0),
            ("QueueUnreadable", "set" if stats.unreadable > 0 else "clear", 0.0),
            ("QueueDiskFull", "set" if stats.health == "disk_full" else "clear", 0.0),
            ("QueueDamaged", "set" if stats.health == "damaged" else "clear", 0.0),
        )
        for alert, change, began_ago in conditions:
            out += self._apply(
                alert,
                QUEUE_TARGET,
                change,
                now=now,
                since=now.wall - timedelta(seconds=began_ago),
                age=began_ago,
                peak=peak,
                detail=detail,
            )
        return out

    def tick(self, now: Instant) -> list[AlertEvent]:
        """Resolve every alert that has stayed clear for ``hold_down`` seconds by ``now``."""
        out: list[AlertEvent] = []
        for key, active in list(self._active.items()):
            if active.cleared_at is None:
                continue
            # A microsecond of slack: the difference of two float readings can fall a hair
            # short of an exact hold-down.
            if now.mono - active.cleared_mono >= self.policy.hold_down - HOLD_SLACK:
                del self._active[key]
                out.append(self._event(key, "resolved", active.cleared_at, active))
        return out

    def _apply(
        self,
        alert: AlertName,
        target: str,
        change: _Change,
        *,
        now: Instant,
        since: datetime,
        age: float,
        peak: bool,
        detail: dict[str, Any],
    ) -> list[AlertEvent]:
        """``since`` is the wall time the condition began, ``age`` how long ago that was."""
        key = (alert, target)
        active = self._active.get(key)
        if change == "set":
            if active is None:
                active = _Active(since, now.mono - age, detail={**detail, "peak": peak})
                self._active[key] = active
                return [self._event(key, "firing", since, active)]
            # Still (or again, within hold-down) broken: the firing already sent stands.
            active.cleared_at = None
        elif change == "hold":
            if active is not None:
                active.cleared_at = None
        elif active is not None and active.cleared_at is None:
            active.cleared_at = now.wall
            active.cleared_mono = now.mono
            active.cleared_peak = peak
        return []

    def _event(
        self, key: tuple[str, str], status: Status, at: datetime, active: _Active
    ) -> AlertEvent:
        peak = bool(active.detail["peak"]) if status == "firing" else active.cleared_peak
        en, vi = _summaries(
            key, status, site=self.site, active=active, at=self._local(at), peak=peak
        )
        return AlertEvent(key[0], status, key[1], at, peak, en, vi, self.site)

    def _local(self, at: datetime) -> str:
        return at.astimezone(self._tz).strftime("%H:%M %d/%m")


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes < 1:
        return f"{int(seconds)}s"
    if minutes < 120:
        return f"{minutes}m"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _summaries(
    key: tuple[str, str],
    status: Status,
    *,
    site: str,
    active: _Active,
    at: str,
    peak: bool,
) -> tuple[str, str]:
    """English and Vietnamese one-liners: what broke, where, since when, peak or not."""
    alert, target = key
    d = active.detail
    peak_en = " during peak hours" if peak else ""
    peak_vi = " trong giờ cao điểm" if peak else ""
    if status == "resolved":
        took = _duration(active.lasted)
        return (
            f"[{site}] {alert} on {target} resolved at {at}{peak_en} (lasted {took})",
            f"[{site}] Đã khắc phục {alert} tại {target} lúc {at}{peak_vi} (kéo dài {took})",
        )
    if alert == "LinkDown":
        return (
            f"[{site}] {target} is DOWN since {at}{peak_en}: {d['reason']}",
            f"[{site}] Mất kết nối tới {target} từ {at}{peak_vi}: {d['reason']}",
        )
    if alert == "LinkDegraded":
        latency = "?" if d["latency_ms"] is None else f"{d['latency_ms']:.0f} ms"
        loss = "?" if d["loss"] is None else f"{d['loss']:.0%}"
        return (
            f"[{site}] {target} is DEGRADED since {at}{peak_en} (latency {latency}, loss {loss})",
            f"[{site}] Kết nối tới {target} bị chậm từ {at}{peak_vi} "
            f"(độ trễ {latency}, mất gói {loss})",
        )
    if alert == "QueueBacklog":
        age = _duration(d["oldest_age_s"])
        return (
            f"[{site}] {plural(d['depth'], 'station request')} queued, oldest waiting "
            f"{age}{peak_en}",
            f"[{site}] {d['depth']} yêu cầu đang chờ trong hàng đợi, lâu nhất {age}{peak_vi}",
        )
    if alert in _QUEUE_FAULTS:
        return _QUEUE_FAULTS[alert](site, at, d)
    return (
        f"[{site}] {plural(d['dead'], 'queued request')} failed for good (dead letters) "
        f"since {at}: "
        "run `netwatch queue list`",
        f"[{site}] {d['dead']} yêu cầu không thể gửi lên hệ thống từ {at}: "
        "cần kiểm tra bằng `netwatch queue list`",
    )


_Summary = Callable[[str, str, dict[str, Any]], tuple[str, str]]

# The queue's own faults: what happened, what the counter sees, what the operator runs.
_QUEUE_FAULTS: dict[str, _Summary] = {
    "QueueUnreadable": lambda site, at, d: (
        f"[{site}] {d['unreadable']} queued requests could not be read back (damaged or "
        f"sealed with another key) and were set aside since {at}; the rest are sent: "
        "run `netwatch queue list --state dead`",
        f"[{site}] {d['unreadable']} yêu cầu trong hàng đợi không đọc được (hỏng hoặc sai "
        f"khóa) và đã được tách riêng từ {at}; các yêu cầu khác vẫn được gửi: "
        "kiểm tra bằng `netwatch queue list --state dead`",
    ),
    "QueueDiskFull": lambda site, at, _d: (
        f"[{site}] the station queue cannot take writes since {at}: disk full; offline "
        "requests are refused (507) and replay is paused until space is freed",
        f"[{site}] Hàng đợi không ghi được từ {at}: ổ đĩa đầy; yêu cầu khi mất kết nối bị "
        "từ chối (507) và việc gửi lại tạm dừng cho tới khi giải phóng dung lượng",
    ),
    "QueueDamaged": lambda site, at, _d: (
        f"[{site}] the station queue file is damaged since {at}: offline requests are "
        "refused (503), replay stopped, the file is kept as it is; run "
        "`netwatch queue salvage`",
        f"[{site}] Tệp hàng đợi bị hỏng từ {at}: yêu cầu khi mất kết nối bị từ chối (503), "
        "ngừng gửi lại, tệp được giữ nguyên; chạy `netwatch queue salvage`",
    ),
}
