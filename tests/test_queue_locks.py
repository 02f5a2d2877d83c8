"""The queue never drops SQLite's own locks on its files.

Closing *any* descriptor of a file drops every POSIX (fcntl) lock the process holds on it,
SQLite's included. The writer once opened and closed the ``-shm`` file after each commit to
read the WAL's page count: from then on the proxy held no lock there, so the next process
to open the queue (``netwatch queue list`` by an operator) took the file for unused,
truncated it, and the proxy died of SIGBUS on its mapping of it (seen in
``test_indoubt.py``'s SIGKILL storm, exit by signal 7). Here another process asks for the
lock SQLite holds while a database is open (the "DMS" byte of the ``-shm`` file); it must
be refused for as long as the queue is open, however many commits have run.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

from test_queue import T0, new, opened

# SQLite's unix VFS: the dead-man-switch byte of the -shm file, shared by every connection
# while the database is open: (22 + SQLITE_SHM_NLOCK) * 4 + SQLITE_SHM_NLOCK = 128.
DMS_BYTE = 128

TRY_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, int(sys.argv[2]))
    except OSError:
        print("refused")
    else:
        print("granted")
    """
)


def other_process_lock(shm: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", TRY_LOCK, str(shm), str(DMS_BYTE)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


async def test_the_queue_keeps_its_shared_memory_lock_through_commits(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    shm = Path(f"{path}-shm")
    async with opened(path) as q:
        await q.enqueue(new(0), now=T0)
        assert other_process_lock(shm) == "refused"
        for n in range(1, 40):  # each commit is followed by a look at the WAL's size
            await q.enqueue(new(n), now=T0)
        assert other_process_lock(shm) == "refused"
    # Closed: nobody holds it any more (the probe itself is sound).
    if await asyncio.to_thread(shm.exists):
        assert other_process_lock(shm) == "granted"
