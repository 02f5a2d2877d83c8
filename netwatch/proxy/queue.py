"""Durable station queue in SQLite (INTERFACE STUB: the implementer replaces the bodies).

WAL, synchronous=FULL, BEGIN IMMEDIATE, one writer thread that group-commits concurrent
enqueues in one transaction; ``enqueue`` returns only after the commit, so the proxy's
202 is sent only for entries on disk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

EntryState = Literal["queued", "delivered", "dead"]


@dataclass(frozen=True, slots=True)
class NewEntry:
    """What the proxy hands the queue for one station request."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    idempotency_key: str
    order_key: str = ""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored request and its replay bookkeeping (times are Unix seconds)."""

    id: str                      # the ticket handed to the station
    seq: int                     # global arrival order
    order_key: str
    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    idempotency_key: str
    queued_at: float
    state: EntryState
    attempts: int
    next_attempt_at: float
    upstream_status: int | None
    upstream_body: bytes | None
    reason: str | None           # dead letters: "expired", "rejected", "operator", ...
    delivered_at: float | None
    size: int                    # bytes this entry accounts for against max_bytes


@dataclass(frozen=True, slots=True)
class QueueStats:
    depth: int                   # entries in state "queued"
    oldest_age_s: float          # age of the oldest queued entry, 0.0 when empty
    bytes: int                   # on-disk size of the database files (db + wal)
    dead: int                    # entries in state "dead"


class DurableQueue:
    """Open with ``async with DurableQueue.open(path, ...) as q:``."""

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        max_bytes: int,
        max_age: float,
        key: bytes | None = None,
    ) -> DurableQueue: ...

    async def __aenter__(self) -> DurableQueue: ...
    async def __aexit__(self, *exc: object) -> None: ...

    async def enqueue(self, new: NewEntry, *, now: float) -> tuple[Entry, int]:
        """Commit durably, then return (entry, position among queued entries, 1-based).
        Raises QueueFullError when max_bytes would be exceeded (nothing else touched)."""
        ...

    async def ready(self, *, now: float, limit: int) -> Sequence[Entry]:
        """Queued entries that may be sent now: only the head of each order key
        (FIFO per key), whose next_attempt_at <= now, oldest seq first."""
        ...

    async def mark_delivered(self, entry_id: str, *, status: int, now: float) -> None: ...

    async def mark_retry(
        self, entry_id: str, *, status: int | None, next_attempt_at: float, now: float
    ) -> None:
        """Count an attempt; keep it at the head of its order key until next_attempt_at."""
        ...

    async def mark_dead(
        self, entry_id: str, *, reason: str, status: int | None, body: bytes | None, now: float
    ) -> None: ...

    async def expire(self, *, now: float) -> list[str]:
        """Queued entries older than max_age become dead letters with reason 'expired'."""
        ...

    async def get(self, entry_id: str) -> Entry | None: ...

    async def stats(self, *, now: float) -> QueueStats: ...

    async def list(
        self, *, state: EntryState | None = None, limit: int = 100
    ) -> Sequence[Entry]: ...

    async def retry_dead(self, entry_id: str | None = None, *, now: float) -> int:
        """Put one dead letter (or all, with None) back in the queue; returns how many."""
        ...

    async def purge_dead(self) -> int: ...
