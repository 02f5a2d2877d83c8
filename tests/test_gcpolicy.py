"""The garbage collector's policy: start-up objects are frozen once start-up is done (a
full collection never walks them again), garbage is collected first rather than frozen,
and the freeze is undone when the daemon stops."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import aiohttp
from helpers.daemon import eventually, free_tcp_port, write_config

from netwatch.config.schema import load_config
from netwatch.daemon import Daemon
from netwatch.gcpolicy import frozen_heap, refreeze


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def tracked(obj: object) -> bool:
    """Whether a collection would walk ``obj`` (frozen objects are in no generation)."""
    return any(o is obj for o in gc.get_objects())


def test_frozen_heap_collects_freezes_and_restores() -> None:
    frozen_before = gc.get_freeze_count()
    cycle = Node()
    cycle.other = Node()
    cycle.other.other = cycle
    garbage = weakref.ref(cycle)
    del cycle
    alive = Node()
    with frozen_heap():
        assert garbage() is None, "garbage must be collected, not frozen for good"
        assert gc.get_freeze_count() > frozen_before
        assert not tracked(alive)
        made_after = Node()
        assert tracked(made_after)
    assert gc.get_freeze_count() == 0
    assert tracked(alive)


def test_refreeze_collects_frozen_garbage_a_reload_dropped() -> None:
    with frozen_heap():
        cycle = Node()
        cycle.other = Node()
        cycle.other.other = cycle
        old = weakref.ref(cycle)
        refreeze()  # the cycle is alive: frozen with the rest
        assert not tracked(cycle)
        del cycle  # a reload drops it: frozen garbage, never collected while frozen
        gc.collect()
        assert old() is not None
        refreeze()
        assert old() is None
        kept = Node()
        refreeze()
        assert not tracked(kept)
    refreeze()  # outside frozen_heap: nothing is frozen, nothing is done
    assert gc.get_freeze_count() == 0


async def test_daemon_freezes_its_start_up_objects_until_it_stops(
    tmp_path: Path, tcp_upstream: int
) -> None:
    port = free_tcp_port()
    config = {
        "site": {"id": "gc-site"},
        "defaults": {"interval": "200ms", "timeout": "150ms"},
        "targets": [{"name": "gw", "type": "tcp", "host": "127.0.0.1", "port": tcp_upstream}],
        "metrics": {"listen": f"127.0.0.1:{port}"},
    }
    daemon = Daemon(load_config(write_config(tmp_path / "netwatch.yaml", config)))
    task = asyncio.get_running_loop().create_task(daemon.run())

    async def probed() -> bool:
        runtime = daemon.monitor.targets.get("gw")
        return runtime is not None and runtime.rounds > 0

    async def served() -> bool:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as response,
        ):
            return response.status == 200

    try:
        await eventually(probed, 10, "a first probe round")
        await eventually(served, 10, "/healthz")
        assert gc.get_freeze_count() > 0
        # The target's runtime was made at start-up: frozen, never walked again.
        assert not tracked(daemon.monitor.targets["gw"])
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)
    assert gc.get_freeze_count() == 0
