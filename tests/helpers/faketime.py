"""A wall clock a test can step under a real process: libfaketime (Debian ``faketime``).

The process runs with libfaketime preloaded, its wall clock read from a file the test
rewrites (``FAKETIME_NO_CACHE=1``) and its monotonic clock left alone
(``FAKETIME_DONT_FAKE_MONOTONIC=1``): exactly what an NTP step or an operator's ``date -s``
does to a running machine. The test itself keeps the real clock.
"""

from __future__ import annotations

import glob
from pathlib import Path


def libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    assert found, "libfaketime is missing: apt-get install faketime (Makefile APT_PACKAGES)"
    return found[0]


class WallClock:
    """The wall clock of the processes started with ``env``; ``step_to`` moves it."""

    def __init__(self, directory: Path) -> None:
        self.offset_file = directory / "faketime"
        self.offset_file.write_text("+0\n")
        self.env = {
            "LD_PRELOAD": libfaketime(),
            "FAKETIME_TIMESTAMP_FILE": str(self.offset_file),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def step_to(self, offset_s: int) -> None:
        """Set the offset from real time in seconds, e.g. ``-3600`` or ``7200``."""
        self.offset_file.write_text(f"{offset_s:+d}\n")
