"""How the daemon runs Python's cyclic garbage collector, so that it does not stall probes.

A collection runs on the event loop's thread and stops everything while it walks its
generation. Measured in ``netwatch run`` with 1,000 TCP targets at 500 probes/s (see
bench/README.md, probe_cost.py): a full (generation 2) collection walked every object made
at start-up (config, pydantic models, aiohttp, one runtime per target) and took 75-80 ms of
CPU, about every two minutes: 35-40 probes started that late each time.

``frozen_heap`` collects once when start-up is done and freezes everything alive then
(``gc.freeze``): frozen objects are never walked again, so a full collection only walks what
was made since. Young collections are left as Python sets them: they walk the probes in
flight (coroutines, futures, timer handles), 2-4 ms each every second or so; a higher
threshold made them rarer but longer (5-11 ms at 10,000), as more of the walked objects were
still alive.

A reload replaces targets, their runtimes and parts of the config, and what it drops may be
frozen: ``refreeze`` (called after each reload) unfreezes, collects and freezes what is alive
now, so a daemon reloaded every day does not keep every old config until it stops.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Collect, then freeze what is alive, for the lifetime of the context (enter it once
    start-up is done); unfrozen on exit, so a stopped daemon's objects can be collected."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def refreeze() -> None:
    """After a reload: let what it dropped be collected, then freeze the new heap (a no-op
    when nothing is frozen, as outside ``frozen_heap``)."""
    if gc.get_freeze_count() == 0:
        return
    gc.unfreeze()
    gc.collect()
    gc.freeze()
