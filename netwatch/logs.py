"""structlog set-up, called once by the CLI: JSON lines when stderr is not a terminal.

Repeated lines are rate-limited (``RepeatLimit``), for structlog events and for libraries'
stdlib logging alike: a fault that repeats at loop speed ("Too many open files" on every
accept) must not fill the disk. Past ``burst`` lines of one kind in ``window`` seconds the
rest are dropped, and the first line of that kind after the window says how many were.

The daemon's memory matters here too: structlog is imported without rich (see
``netwatch/__init__.py``), and the console format renders tracebacks with rich imported on
the first one, so a daemon that logs JSON lines never loads it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Hashable, MutableMapping
from typing import Any, Literal, TextIO

import structlog
from structlog.typing import ExcInfo

LogFormat = Literal["auto", "json", "console"]

REPEAT_BURST = 20
REPEAT_WINDOW = 10.0
_MAX_KINDS = 4096  # distinct kinds tracked at once (bounded memory whatever is logged)


class RepeatLimit:
    """At most ``burst`` lines of one kind per ``window`` seconds (see the module doc)."""

    def __init__(
        self,
        burst: int = REPEAT_BURST,
        window: float = REPEAT_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.window = window
        self._clock = clock
        self._kinds: dict[Hashable, list[float | int]] = {}  # kind -> [start, seen, dropped]

    def admit(self, kind: Hashable) -> int | None:
        """None: drop this line. Else the number of lines of this kind dropped before it."""
        now = self._clock()
        state = self._kinds.get(kind)
        if state is None or now - state[0] >= self.window:
            if state is None and len(self._kinds) >= _MAX_KINDS:
                self._kinds.clear()
            dropped = int(state[2]) if state is not None else 0
            self._kinds[kind] = [now, 1, 0]
            return dropped
        state[1] += 1
        if state[1] > self.burst:
            state[2] += 1
            return None
        return 0

    def processor(
        self, _logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """A structlog processor: the kind is the event name and level, and the target it
        is about: every link change of every target is logged, a flood of one line is not."""
        dropped = self.admit((event.get("event"), method, event.get("target")))
        if dropped is None:
            raise structlog.DropEvent
        if dropped:
            event["repeats_suppressed"] = dropped
        return event


class RepeatFilter(logging.Filter):
    """The same limit for stdlib logging records (kind: logger name and message template)."""

    def __init__(self, limit: RepeatLimit) -> None:
        super().__init__()
        self._limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        dropped = self._limit.admit((record.name, str(record.msg), record.levelno))
        if dropped is None:
            return False
        if dropped:
            record.msg = f"{record.msg} [{dropped} repeats suppressed]"
        return True


def configure_logging(level: str = "info", fmt: LogFormat = "auto") -> None:
    """Route structlog (and stdlib logging of libraries) to stderr."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    processors: list[structlog.types.Processor] = [
        RepeatLimit().processor,
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if as_json:
        processors.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        colors = sys.stderr.isatty()
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors, exception_formatter=RichTraceback(colors=colors)
        )
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)
    repeats = RepeatFilter(RepeatLimit())
    for handler in logging.getLogger().handlers:
        handler.addFilter(repeats)


class RichTraceback:
    """The console format's exception renderer: structlog's rich traceback (locals shown),
    with rich imported when the first exception is rendered, not when logging starts."""

    def __init__(self, *, colors: bool) -> None:
        self.colors = colors

    def __call__(self, sio: TextIO, exc_info: ExcInfo) -> None:
        from rich.console import Console  # noqa: PLC0415 - see the class doc
        from rich.traceback import Traceback  # noqa: PLC0415

        sio.write("\n")
        console = Console(file=sio, color_system="truecolor" if self.colors else None)
        console.print(Traceback.from_exception(*exc_info, show_locals=True))
