"""Which asyncio event loop the long-running commands run on.

uvloop (libuv underneath) when it imports, the standard loop otherwise. ``NETWATCH_LOOP``
chooses: ``auto`` (the default: uvloop if installed, else asyncio), ``uvloop`` (required:
an error if it is missing) or ``asyncio`` (the standard loop, e.g. to rule uvloop out when
chasing a fault). Both loops are tested: the suite runs on the default one, and
``make test-asyncio`` runs it again on the standard loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from netwatch.errors import UsageError

T = TypeVar("T")
LoopName = Literal["uvloop", "asyncio"]
ENV = "NETWATCH_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")


def loop_factory(
    choice: str | None = None,
) -> tuple[LoopName, Callable[[], asyncio.AbstractEventLoop]]:
    """The loop to use and a factory for it, from ``choice`` or ``$NETWATCH_LOOP``."""
    wanted = (choice if choice is not None else os.environ.get(ENV, "auto")).strip().lower()
    if wanted not in CHOICES:
        raise UsageError(f"{ENV}={wanted!r}: expected one of {', '.join(CHOICES)}")
    if wanted == "asyncio":
        return "asyncio", asyncio.new_event_loop
    try:
        import uvloop  # noqa: PLC0415 - optional: the standard loop when missing
    except ImportError as exc:
        if wanted == "uvloop":
            raise UsageError(f"{ENV}=uvloop but uvloop is not installed ({exc})") from exc
        return "asyncio", asyncio.new_event_loop
    return "uvloop", uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T], *, choice: str | None = None) -> T:
    """``asyncio.run`` on the chosen loop."""
    try:
        _, factory = loop_factory(choice)
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(main)
    finally:
        main.close()  # a no-op once run; closes it when the runner could not start


def current() -> LoopName:
    """The running loop's kind (for logs and the build-info metric)."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
