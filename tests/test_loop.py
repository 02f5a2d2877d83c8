"""The event loop choice (netwatch.loop): uvloop when installed, the standard loop on demand."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from netwatch import loop
from netwatch.errors import UsageError

uvloop = pytest.importorskip("uvloop")


def test_auto_picks_uvloop_when_installed() -> None:
    name, factory = loop.loop_factory("auto")
    assert name == "uvloop"
    made = factory()
    try:
        assert isinstance(made, uvloop.Loop)
    finally:
        made.close()


def test_asyncio_choice_gives_the_standard_loop() -> None:
    name, factory = loop.loop_factory("asyncio")
    made = factory()
    try:
        assert name == "asyncio"
        assert not isinstance(made, uvloop.Loop)
    finally:
        made.close()


def test_unknown_choice_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(loop.ENV, "tokio")
    with pytest.raises(UsageError, match="NETWATCH_LOOP='tokio'"):
        loop.loop_factory()


@pytest.mark.parametrize("choice", ["uvloop", "asyncio"])
def test_run_uses_the_chosen_loop(choice: str) -> None:
    async def kind() -> str:
        return loop.current()

    assert loop.run(kind(), choice=choice) == choice


def test_run_closes_the_coroutine_when_the_choice_is_bad() -> None:
    async def never() -> None:  # pragma: no cover - must not run
        raise AssertionError

    coro = never()
    with pytest.raises(UsageError):
        loop.run(coro, choice="bogus")
    assert coro.cr_frame is None  # closed: no "never awaited" warning


def test_bad_loop_variable_is_a_clear_cli_error(tmp_path: Path) -> None:
    config = tmp_path / "site.yaml"
    config.write_text(
        "site: {id: s1, name: S1, timezone: UTC}\n"
        "metrics: {listen: '127.0.0.1:0'}\n"
        "targets: [{name: gw, type: tcp, host: 127.0.0.1, port: 9}]\n"
    )
    env = {**os.environ, loop.ENV: "tokio"}
    done = subprocess.run(
        [sys.executable, "-m", "netwatch", "run", "-c", str(config)],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "NETWATCH_LOOP='tokio'" in done.stderr
    assert "Traceback" not in done.stderr


async def test_the_suite_runs_on_the_loop_netwatch_picks() -> None:
    expected = loop.loop_factory()[0]
    assert loop.current() == expected
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop) == (expected == "uvloop")
