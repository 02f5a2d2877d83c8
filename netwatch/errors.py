"""The one error root of netwatch, translated to exit codes only in ``cli.py``.

::

    NetwatchError                    exit 1 unless a subclass says otherwise
    ├── ConfigError                  exit 2: bad config file (carries one line per problem)
    ├── UsageError                   exit 2: bad command-line input
    ├── ProbeError                   a probe could not even be attempted (bad spec)
    ├── QueueError                   the durable station queue
    │   ├── QueueFullError           max_bytes reached: the proxy answers 507
    │   │   └── QueueDiskFullError   the disk is full: 507 too, and healthz says so
    │   ├── QueueDamagedError        SQLite found the file corrupt: no more writes to it
    │   ├── QueueForeignError        exit 2: the file is not a netwatch queue (left untouched)
    │   ├── QueueKeyError            wrong or missing encryption key: fail fast
    │   │   └── KeyFileMissingError  exit 2: the key file named is not there
    │   └── QueueFileMissingError    exit 2: the queue file named is not there
    ├── MissingFileError             exit 2: a file named by the config or the command line
    │                                is not there (the two above are also this)
    └── DaemonError                  a running daemon could not be reached or started

Leaves that describe I/O failures also subclass the matching stdlib error where one
exists, so ``except OSError`` keeps working for callers that do not know netwatch.
"""

from __future__ import annotations


class NetwatchError(Exception):
    """Root of every error netwatch raises on purpose."""

    exit_code = 1


class ConfigError(NetwatchError):
    """The configuration is invalid; ``problems`` holds one human line per problem."""

    exit_code = 2

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class UsageError(NetwatchError):
    """The command line asked for something that cannot be done."""

    exit_code = 2


class ProbeError(NetwatchError):
    """A probe could not be built or attempted (not a failed probe: that is a result)."""


class QueueError(NetwatchError):
    """The durable station queue failed."""


class QueueFullError(QueueError):
    """The queue reached ``max_bytes``; nothing already queued is touched."""


class QueueDiskFullError(QueueFullError):
    """A write could not commit because the disk (or its quota) is full."""


class QueueDamagedError(QueueError):
    """SQLite reports the queue file corrupt: it is kept as it is for salvage."""


class QueueForeignError(QueueError):
    """The file is not a netwatch queue; it was not touched."""

    exit_code = 2


class QueueKeyError(QueueError):
    """The queue's encryption key is missing, malformed or does not open the entries."""


class MissingFileError(NetwatchError, FileNotFoundError):
    """A file named by the config or on the command line is not there: exit 2, like a
    missing config file."""

    exit_code = 2


class KeyFileMissingError(QueueKeyError, MissingFileError):
    """The queue key file named is not there."""


class QueueFileMissingError(QueueError, MissingFileError):
    """The queue file named is not there (and the command does not create one)."""


class DaemonError(NetwatchError, ConnectionError):
    """A running daemon could not be reached, or the daemon could not start."""
