"""The queue file itself: whose it is, who may read it, which schema it holds, whether it is
whole. ``queue_writer.py`` writes to it, ``queue.py`` is the queue built on it.

Opening never writes to a file before knowing it is a netwatch queue: the SQLite header's
``application_id`` (and, for queues made before it was set, the netwatch tables) is read
through a read-only connection first, before the journal mode is switched or a table is
created. A file of another application is refused and left exactly as it was.

Citizens' data: the queue directory is created 0700, the database 0600 before SQLite first
writes it (SQLite gives its ``-wal`` and ``-shm`` files the database's mode), whatever the
umask. Files of an older netwatch that are more open are tightened at open.

Schema versions live in ``user_version``; ``MIGRATIONS[n]`` takes a queue from ``n - 1`` to
``n`` inside the opening transaction. A new file gets ``SCHEMA`` (version 1) and then every
migration, so there is one path to each version.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

import structlog

from netwatch.errors import QueueDamagedError, QueueDiskFullError, QueueError, QueueForeignError

log = structlog.get_logger(__name__)

APPLICATION_ID = 0x4E575155  # "NWQU" in the SQLite header: this file is a netwatch queue
SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 5.0  # the CLI and the daemon share the file; neither holds it for long
_LEGACY_TABLES = frozenset({"entries", "meta", "tally"})  # version 1 had no application_id
_SQLITE_MAGIC = b"SQLite format 3\x00"
_CORRUPT, _FULL, _NOTADB = 11, 13, 26  # SQLite primary result codes

SCHEMA = """
CREATE TABLE entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order, never reused
    id TEXT NOT NULL UNIQUE,                 -- the ticket: 128 random bits
    order_key TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,                      -- a sealed BLOB when the queue has a key
    query BLOB NOT NULL,                     -- sealed when the queue has a key
    headers BLOB,                            -- sealed JSON, NULL once delivered
    body BLOB,                               -- sealed, NULL once delivered
    idempotency_key TEXT NOT NULL,
    queued_at REAL NOT NULL,
    age_from REAL NOT NULL,                  -- max_age counts from here (operator retry resets)
    state TEXT NOT NULL CHECK (state IN ('queued', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    upstream_status INTEGER,
    upstream_body BLOB,                      -- sealed, capped
    reason TEXT,
    delivered_at REAL,
    size INTEGER NOT NULL                    -- bytes accounted against max_bytes
);
CREATE INDEX entries_state_seq ON entries (state, seq);
CREATE INDEX entries_queued_key ON entries (order_key, seq) WHERE state = 'queued';
CREATE INDEX entries_queued_age ON entries (age_from) WHERE state = 'queued';
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
-- Entries and bytes per state, kept by triggers: O(1) positions, depth and max_bytes checks,
-- right across processes (the CLI purging dead letters frees space the daemon sees at once)
-- and across crashes (they commit with the rows they count).
CREATE TABLE tally (state TEXT PRIMARY KEY, entries INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT INTO tally VALUES ('queued', 0, 0), ('delivered', 0, 0), ('dead', 0, 0);
CREATE TRIGGER tally_insert AFTER INSERT ON entries BEGIN
    UPDATE tally SET entries = entries + 1, bytes = bytes + NEW.size WHERE state = NEW.state;
END;
CREATE TRIGGER tally_delete AFTER DELETE ON entries BEGIN
    UPDATE tally SET entries = entries - 1, bytes = bytes - OLD.size WHERE state = OLD.state;
END;
CREATE TRIGGER tally_update AFTER UPDATE OF state, size ON entries BEGIN
    UPDATE tally SET entries = entries - 1, bytes = bytes - OLD.size WHERE state = OLD.state;
    UPDATE tally SET entries = entries + 1, bytes = bytes + NEW.size WHERE state = NEW.state;
END;
"""

# version -> statements that bring a queue from version - 1 to it (application_id and
# user_version are set by ``prepare`` after the last step).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 2: application_id in the header; unreadable dead letters counted without a scan.
    2: ("CREATE INDEX entries_unreadable ON entries (seq) WHERE reason = 'unreadable'",),
}

Kind = Literal["new", "netwatch"]


def translate(exc: sqlite3.Error, what: str) -> QueueError:
    """The one place SQLite errors become netwatch errors: corruption and a full disk are
    told apart from everything else, because the proxy answers each differently."""
    code = (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    if code in {_CORRUPT, _NOTADB}:
        return QueueDamagedError(
            f"{what}: the queue file is damaged ({exc}); it is kept as it is "
            "(`netwatch queue salvage` copies what can still be read)"
        )
    if code == _FULL:
        return QueueDiskFullError(f"{what}: disk full")
    return QueueError(f"{what}: {exc}")


def connect(path: Path | str, *, uri: bool = False) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), never implicit.
    # check_same_thread=False: each connection is used by one thread at a time, but not
    # always by the thread that opened it (opening runs in a worker thread).
    return sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False, uri=uri
    )


def read_only_uri(path: Path) -> str:
    """A connection on this URI never writes the database file (nor checkpoints it)."""
    return f"{path.resolve().as_uri()}?mode=ro"


def identify(path: Path) -> Kind:
    """``new`` (absent or empty) or ``netwatch``; anything else raises QueueForeignError
    without a byte of the file changed."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "new"
    except OSError as exc:
        raise QueueError(f"{path}: cannot open the queue: {exc.strerror or exc}") from None
    if size == 0:
        return "new"
    try:
        with path.open("rb") as f:
            head = f.read(100)
    except OSError as exc:
        raise QueueError(f"{path}: cannot open the queue: {exc.strerror or exc}") from None
    if not head.startswith(_SQLITE_MAGIC):
        raise QueueForeignError(
            f"{path}: not a netwatch queue (not an SQLite database); left untouched"
        )
    # From the header bytes: no connection, so not even a -shm file appears beside a
    # foreign database. Only a file without an application_id needs its tables read.
    app_id = int.from_bytes(head[68:72], "big", signed=True)
    if app_id == APPLICATION_ID:
        return "netwatch"
    tables: set[str] = set()
    if app_id == 0:
        tables = _tables(path, immutable=True)
        if not tables and Path(f"{path}-wal").exists():  # a young queue, all in its WAL
            tables = _tables(path, immutable=False)
        if tables >= _LEGACY_TABLES:  # a queue from before application_id
            return "netwatch"
    owner = f"application_id {app_id:#x}" if app_id else f"tables: {', '.join(sorted(tables))}"
    raise QueueForeignError(
        f"{path}: not a netwatch queue (an SQLite database with {owner}); left untouched"
    )


def _tables(path: Path, *, immutable: bool) -> set[str]:
    # immutable=1: the main file only, no locks, no WAL or -shm opened (so none created).
    uri = read_only_uri(path) + ("&immutable=1" if immutable else "")
    try:
        conn = connect(uri, uri=True)
        try:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise translate(exc, f"{path}: cannot read the queue") from exc
    return {str(row[0]) for row in rows}


def make_private_dir(directory: Path) -> None:
    """Create the queue's directory 0700; an existing, more open one is only reported (it
    may be shared, e.g. /tmp: changing it is the operator's call)."""
    if directory.is_dir():
        mode = stat.S_IMODE(directory.stat().st_mode)
        if mode & 0o077:
            log.warning("queue_dir_not_private", path=str(directory), mode=oct(mode))
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)  # the umask may have taken bits off, never added: be exact


def create_private_file(path: Path) -> None:
    """An empty database file, 0600 from its first instant (SQLite would use 0644 & ~umask)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def tighten(path: Path) -> None:
    """Make the database and its -wal/-shm private if an older netwatch left them open."""
    for each in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(each.stat().st_mode) & 0o077:
                os.chmod(each, 0o600)


def open_for_writing(path: Path, kind: Kind) -> sqlite3.Connection:
    """The writer's connection, in WAL mode; a new file is stamped with APPLICATION_ID first,
    so even a crash right after leaves a file that says whose it is."""
    conn = connect(path)
    try:
        if kind == "new":
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        _wal_mode(conn, path)
        conn.execute("PRAGMA synchronous=FULL")
        # Checkpoints are the writer's checkpointer thread's job (on WAL size): SQLite's
        # own would run inside a commit and make every enqueue of that group wait.
        conn.execute("PRAGMA wal_autocheckpoint=0")
    except BaseException:
        conn.close()
        raise
    return conn


def _wal_mode(conn: sqlite3.Connection, path: Path) -> None:
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise QueueError(f"{path}: cannot switch the queue to WAL mode ({mode})")


def quick_check(conn: sqlite3.Connection) -> str | None:
    """None when ``PRAGMA quick_check`` finds the file whole, else what it found."""
    problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)")]
    return None if problems == ["ok"] else "; ".join(problems)


def prepare(
    conn: sqlite3.Connection, path: Path, check: Callable[[sqlite3.Connection], None]
) -> None:
    """Create or migrate the schema (refusing a newer one), then run ``check`` (the key
    check) in the same transaction, so two processes opening a new file agree."""
    with immediate(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise QueueError(
                f"{path}: queue schema {version} is newer than this netwatch understands "
                f"({SCHEMA_VERSION}); upgrade netwatch"
            )
        if version == 0:
            for statement in statements(SCHEMA):
                conn.execute(statement)
            version = 1
        if version < SCHEMA_VERSION:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        check(conn)


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` transaction: take the write lock up front, so a busy file
    waits in the busy handler instead of failing half-way through."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def statements(script: str) -> Iterator[str]:
    # executescript() would COMMIT the caller's transaction first, so split by hand;
    # complete_statement() knows a trigger's BEGIN ... END is one statement.
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
