"""``netwatch queue salvage SRC DST``: copy every entry SQLite can still read out of a
damaged queue file into a new one, in arrival order, and say what could not be read.

SRC is only ever read (a read-only connection: not even a checkpoint touches it). Rows are
copied as stored, sealed fields included, so DST opens with SRC's key and the replayer sets
aside any row whose fields do not decode, as it would have in SRC. Rows are read one seek
at a time; a seek into a damaged b-tree page fails, and the copy then looks for the first
seq past the damage it can read again (doubling steps, then a binary search back), records
the gap, and goes on from there.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from netwatch.errors import QueueDamagedError, QueueError, UsageError
from netwatch.proxy.crypto import Sealer, default_key_path
from netwatch.proxy.queue_file import (
    connect,
    create_private_file,
    identify,
    immediate,
    make_private_dir,
    open_for_writing,
    prepare,
    read_only_uri,
)

_COLUMNS = (
    "seq", "id", "order_key", "method", "path", "query", "headers", "body", "idempotency_key",
    "queued_at", "age_from", "state", "attempts", "next_attempt_at", "upstream_status",
    "upstream_body", "reason", "delivered_at", "size",
)  # fmt: skip
_ROWS = (
    f"SELECT {', '.join(_COLUMNS)}, {', '.join(f'typeof({c})' for c in _COLUMNS)}"  # noqa: S608 - fixed column names
    " FROM entries"
)
_FIRST_FROM = f"{_ROWS} WHERE seq >= ? ORDER BY seq LIMIT 1"
_NO_END = 2**62


@dataclass(slots=True)
class SalvageReport:
    copied: dict[str, int] = field(default_factory=dict)  # entries copied, by state
    lost: list[tuple[int, int | None]] = field(default_factory=list)  # seq ranges unread
    rejected: list[int] = field(default_factory=list)  # read, but not a valid entry
    meta_lost: bool = False  # the encryption record could not be read
    key_copied: Path | None = None

    @property
    def complete(self) -> bool:
        return not (self.lost or self.rejected or self.meta_lost)


def salvage(src: Path, dst: Path, *, key: bytes | None = None) -> SalvageReport:
    """Copy ``src`` into the new file ``dst``. ``key`` only matters when SRC's record of
    its encryption is itself unreadable (DST is then sealed under that key's check)."""
    with contextlib.suppress(QueueDamagedError):  # damage is what salvage is for
        if identify(src) == "new":
            raise UsageError(f"{src}: no queue file there")
    if dst.exists() or Path(f"{dst}-wal").exists():
        raise UsageError(f"{dst}: already exists; salvage writes a new file")
    report = SalvageReport()
    source = connect(read_only_uri(src), uri=True)
    source.text_factory = bytes  # stored bytes as they are, valid UTF-8 or not
    try:
        meta = _read_meta(source, key, report)
        make_private_dir(dst.parent)
        create_private_file(dst)
        target = open_for_writing(dst, "new")
        try:

            def stamp(conn: sqlite3.Connection) -> None:
                conn.executemany("INSERT INTO meta VALUES (?, ?)", meta)

            prepare(target, dst, stamp)
            with immediate(target):
                _copy(source, target, report)
            target.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            target.close()
    except sqlite3.Error as exc:
        raise QueueError(f"salvage failed: {exc}") from exc
    finally:
        source.close()
    report.key_copied = _copy_key(src, dst, dict(meta))
    return report


def _read_meta(
    source: sqlite3.Connection, key: bytes | None, report: SalvageReport
) -> list[tuple[str, bytes]]:
    try:
        rows = source.execute("SELECT name, value FROM meta").fetchall()
        return [(bytes(name).decode(), bytes(value)) for name, value in rows]
    except (sqlite3.Error, UnicodeDecodeError):
        report.meta_lost = True
    if key is None:
        return [("encryption", b"none")]
    return [("encryption", b"aes-256-gcm"), ("key_check", Sealer(key).check_value())]


def _copy(source: sqlite3.Connection, target: sqlite3.Connection, report: SalvageReport) -> None:
    # One row per query (a seek, then LIMIT 1): a scan would step onto the next page before
    # handing over the current row, and so lose the last good row before a damaged page.
    end = _last_seq(source)
    after = 0
    while True:
        try:
            row = source.execute(_FIRST_FROM, (after + 1,)).fetchone()
        except sqlite3.DatabaseError:
            resume = _next_readable(source, after, end)
            report.lost.append((after + 1, None if resume is None else resume - 1))
            if resume is None:
                return
            after = resume - 1
            continue
        if row is None:
            return
        after = row[0]
        _insert(target, row, report)


def _insert(target: sqlite3.Connection, row: sqlite3.Row, report: SalvageReport) -> None:
    n = len(_COLUMNS)
    values, types = row[:n], row[n:]
    # Text goes back as text, byte for byte (CAST does not validate UTF-8); the rest as is.
    slots = ", ".join("CAST(? AS TEXT)" if t == b"text" else "?" for t in types)
    sql = f"INSERT INTO entries ({', '.join(_COLUMNS)}) VALUES ({slots})"  # noqa: S608 - fixed column names
    try:
        target.execute("SAVEPOINT row")
        target.execute(sql, values)
        target.execute("RELEASE row")
    except sqlite3.Error:
        target.execute("ROLLBACK TO row")
        target.execute("RELEASE row")
        report.rejected.append(values[0])
        return
    state = values[_COLUMNS.index("state")]
    name = bytes(state).decode("utf-8", "replace") if isinstance(state, bytes) else str(state)
    report.copied[name] = report.copied.get(name, 0) + 1


def _readable_from(source: sqlite3.Connection, start: int) -> int | bool | None:
    """The first seq >= start whose row reads, None if there is none, False if the scan
    from ``start`` runs into damage."""
    try:
        found = source.execute(_FIRST_FROM, (start,)).fetchone()
    except sqlite3.DatabaseError:
        return False
    return None if found is None else int(found[0])


def _next_readable(source: sqlite3.Connection, after: int, end: int) -> int | None:
    step, bad, probe = 1, after, after + 1
    while True:  # doubling steps until a scan starts cleanly
        found = _readable_from(source, probe)
        if found is not False:
            break
        bad, step = probe, step * 2
        probe = after + step
        if probe > end:
            return None
    good = probe
    while good - bad > 1:  # then back to the first start that reads
        mid = (bad + good) // 2
        if _readable_from(source, mid) is False:
            bad = mid
        else:
            good = mid
    result = _readable_from(source, good)
    return None if result is False else result


def _last_seq(source: sqlite3.Connection) -> int:
    for sql in ("SELECT MAX(seq) FROM entries", "SELECT seq FROM sqlite_sequence"):
        with contextlib.suppress(sqlite3.Error, TypeError):
            return int(source.execute(sql).fetchone()[0])
    return _NO_END


def _copy_key(src: Path, dst: Path, meta: dict[str, bytes]) -> Path | None:
    """DST is sealed like SRC: put SRC's default key beside DST, unless one is there."""
    if meta.get("encryption", b"none") == b"none":
        return None
    source_key, target_key = default_key_path(src), default_key_path(dst)
    if not source_key.exists() or target_key.exists():
        return None
    data = source_key.read_bytes()
    fd = os.open(target_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return target_key
