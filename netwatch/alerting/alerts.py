"""Alert de-duplication: link and queue events in, alert events out. Pure, no asyncio.

Every alert is keyed by ``(alert, target)`` and is a small two-state machine driven by a
*condition* (is the problem present now?):

=================  ===================  =====================================================
alert              condition set by     condition cleared by
=================  ===================  =====================================================
``LinkDown``       link ``down``        link ``up`` or ``degraded``
``LinkDegraded``   link ``degraded``    link ``up`` (``down`` holds it: worse, not better)
``QueueBacklog``   oldest entry older   oldest entry younger than ``backlog_age``
                   than ``backlog_age``
``DeadLetters``    dead letters > 0     no dead letters
=================  ===================  =====================================================

A set condition fires once. A cleared condition resolves only after it has stayed clear for
``hold_down`` seconds, so a flapping link (down, up, down within ``hold_down``) produces one
``firing`` and, once it is stable, one ``resolved``: never a storm. Time comes in as ``now``;
``tick(now)`` releases the resolutions whose hold-down has elapsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from netwatch.events import LinkChanged, QueueStats
from netwatch.words import plural

AlertName = Literal["LinkDown", "LinkDegraded", "QueueBacklog", "DeadLetters"]
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


@dataclass(frozen=True, slots=True)
class AlertPolicy:
    """How eager alerts are. ``hold_down`` comes from ``notify.hold_down``."""

    hold_down: float = 30.0
    backlog_age: float = 15 * 60.0
    timezone: str = "Asia/Ho_Chi_Minh"


@dataclass(slots=True)
class _Active:
    """A fired, not yet resolved alert; ``cleared_at`` is set while its hold-down runs."""

    since: datetime
    detail: dict[str, Any]
    cleared_at: datetime | None = None
    cleared_peak: bool = False


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

    def on_link(self, event: LinkChanged, now: datetime) -> list[AlertEvent]:
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
                peak=event.peak,
                detail=detail,
            )
        return out

    def on_queue(self, stats: QueueStats, now: datetime, peak: bool = False) -> list[AlertEvent]:
        """Feed a queue snapshot; ``peak`` tells whether ``now`` is inside peak hours."""
        out = self.tick(now)
        backlog: _Change = "set" if stats.oldest_age_s > self.policy.backlog_age else "clear"
        dead: _Change = "set" if stats.dead > 0 else "clear"
        detail = {"depth": stats.depth, "oldest_age_s": stats.oldest_age_s, "dead": stats.dead}
        since = now - timedelta(seconds=stats.oldest_age_s)
        conditions: tuple[tuple[AlertName, _Change, datetime], ...] = (
            ("QueueBacklog", backlog, since),
            ("DeadLetters", dead, now),
        )
        for alert, change, began in conditions:
            out += self._apply(
                alert, QUEUE_TARGET, change, now=now, since=began, peak=peak, detail=detail
            )
        return out

    def tick(self, now: datetime) -> list[AlertEvent]:
        """Resolve every alert that has stayed clear for ``hold_down`` seconds by ``now``."""
        hold = timedelta(seconds=self.policy.hold_down)
        out: list[AlertEvent] = []
        for key, active in list(self._active.items()):
            if active.cleared_at is not None and now - active.cleared_at >= hold:
                del self._active[key]
                out.append(self._event(key, "resolved", active.cleared_at, active))
        return out

    def _apply(
        self,
        alert: AlertName,
        target: str,
        change: _Change,
        *,
        now: datetime,
        since: datetime,
        peak: bool,
        detail: dict[str, Any],
    ) -> list[AlertEvent]:
        key = (alert, target)
        active = self._active.get(key)
        if change == "set":
            if active is None:
                active = _Active(since=since, detail={**detail, "peak": peak})
                self._active[key] = active
                return [self._event(key, "firing", since, active)]
            # Still (or again, within hold-down) broken: the firing already sent stands.
            active.cleared_at = None
        elif change == "hold":
            if active is not None:
                active.cleared_at = None
        elif active is not None and active.cleared_at is None:
            active.cleared_at = now
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
        lasted = (active.cleared_at or active.since) - active.since
        took = _duration(lasted.total_seconds())
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
    return (
        f"[{site}] {plural(d['dead'], 'queued request')} failed for good (dead letters) "
        f"since {at}: "
        "run `netwatch queue list`",
        f"[{site}] {d['dead']} yêu cầu không thể gửi lên hệ thống từ {at}: "
        "cần kiểm tra bằng `netwatch queue list`",
    )
