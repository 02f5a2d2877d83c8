"""Resident memory per imported module, for ``bench/memory.py`` (never on a real install).

``bench/memory.py`` puts this directory first on ``PYTHONPATH`` of one measuring run of
netwatch, so Python's ``site`` imports it at start-up. With ``NETWATCH_BENCH_IMPORT_RSS``
set to a file name it records, for every module loaded from a file (source or extension),
how much the process's resident set grew while the module was created and executed, minus
what the modules it imported in turn grew it by (its own share, as ``-X importtime`` gives
self time), and writes ``{"start": bytes, "modules": {name: bytes}}`` there at exit.
Built-in and frozen modules are counted in the module that imported them.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


class _Meter:
    """A meta path finder that finds nothing itself: it asks the others and wraps the
    loader of what they found (each such loader serves one module)."""

    def __init__(self) -> None:
        self.own: dict[str, int] = {}
        self._stack: list[list[int]] = []  # [rss at start, inclusive growth of children]

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or isinstance(loader, type) or not hasattr(loader, "exec_module"):
            return spec
        self._wrap(name, loader)
        return spec

    def _wrap(self, name: str, loader: Any) -> None:
        create, execute = loader.create_module, loader.exec_module
        stack = self._stack

        def create_module(spec: ModuleSpec) -> ModuleType | None:
            stack.append([_rss(), 0])
            try:
                return create(spec)  # type: ignore[no-any-return]
            except BaseException:
                stack.pop()
                raise

        def exec_module(module: ModuleType) -> None:
            try:
                execute(module)
            finally:
                start, children = stack.pop()
                grown = _rss() - start
                self.own[name] = self.own.get(name, 0) + grown - children
                if stack:
                    stack[-1][1] += grown

        loader.create_module = create_module
        loader.exec_module = exec_module


def _install(out: str) -> None:
    meter = _Meter()
    start = _rss()
    sys.meta_path.insert(0, meter)

    def dump() -> None:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"start": start, "end": _rss(), "modules": meter.own}, f)

    atexit.register(dump)


if os.environ.get("NETWATCH_BENCH_IMPORT_RSS"):
    _install(os.environ["NETWATCH_BENCH_IMPORT_RSS"])
