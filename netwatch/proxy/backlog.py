""" "Is anything waiting in the queue?", answered by the queue file, not by a counter.

A new write may be forwarded directly only while nothing waits: otherwise it could overtake
an older write on its order key. A count kept in memory drifts: another process
(``netwatch queue retry --all-dead``) puts dead letters back behind the proxy's back, and
a count adjusted by every enqueue and replay goes wrong with the first missed event. So
the answer is read from the file, and read cheaply:

* ``PRAGMA data_version`` on a connection of our own changes whenever any *other*
  connection commits: this process's writer, or another process. Asking is a look at the
  WAL index in shared memory (no disk read), cheap enough for every routing decision.
* Only when it changed are the waiting entries counted again, from the ``tally`` table
  (kept by triggers, O(1)), in the same read snapshot as the version.

"Waiting" is every state but ``delivered`` and ``dead``: an entry in any state the proxy
may still send (``queued``, or a state a later schema adds) holds back later writes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

# A routing decision must not stall the event loop behind a busy file; past this the
# caller treats the answer as unknown (and queues the write: safe, never an overtake).
WATCH_BUSY_TIMEOUT = 0.05
SETTLED_STATES = ("delivered", "dead")


class BacklogWatch:
    """A query-only connection to the queue file that counts waiting entries on change.

    Used from the event loop thread only; every call is short (see the module docstring).
    Raises ``sqlite3.Error`` when the file cannot be read."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(
            path, timeout=WATCH_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA query_only=ON")
        self._version: int | None = None
        self.waiting = 0

    def close(self) -> None:
        self._conn.close()

    def changed(self) -> bool:
        """True when someone committed to the file since the last ``refresh``."""
        version: int = self._conn.execute("PRAGMA data_version").fetchone()[0]
        return version != self._version

    def refresh(self, *, force: bool = False) -> int | None:
        """The waiting count if the file changed since the last look (or ``force``), else
        None (nothing changed: ``waiting`` still holds)."""
        if not force and not self.changed():
            return None
        conn = self._conn
        conn.execute("BEGIN")  # the version and the count from one snapshot
        try:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            rows = conn.execute("SELECT state, entries FROM tally").fetchall()
        finally:
            conn.execute("COMMIT")
        self._version = version
        self.waiting = sum(n for state, n in rows if state not in SETTLED_STATES)
        return self.waiting
