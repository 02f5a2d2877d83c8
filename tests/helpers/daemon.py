"""Run ``netwatch`` as a real process in tests and read what it serves."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class DaemonProcess:
    """A ``netwatch`` subprocess with its log file and metrics URL."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        metrics_url: str | None,
        *,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.args = args
        self.log_path = log_path
        self.metrics_url = metrics_url
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "netwatch", "--log-format", "json", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            preexec_fn=preexec_fn,  # noqa: PLW1509 - tests set resource limits only
        )

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    async def get(self, path: str) -> tuple[int, str]:
        assert self.metrics_url is not None
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(self.metrics_url + path) as resp,
        ):
            return resp.status, await resp.text()

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        _, text = await self.get("/metrics")
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    async def value(self, name: str, **labels: str) -> float | None:
        for (n, lbls), v in (await self.metrics()).items():
            if n == name and all(dict(lbls).get(k) == val for k, val in labels.items()):
                return v
        return None

    async def status(self) -> dict[str, Any]:
        _, text = await self.get("/api/v1/status")
        data: dict[str, Any] = json.loads(text)
        return data

    async def wait_healthy(self, timeout: float = 15.0) -> None:
        assert self.metrics_url is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode}:\n{self.log_path.read_text()}"
                )
            try:
                status, _ = await self.get("/healthz")
            except (OSError, aiohttp.ClientError):
                status = 0
            if status == 200:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"daemon not healthy in {timeout}s:\n{self.log_path.read_text()}")

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.05)
        raise AssertionError(f"daemon still running after {timeout}s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@asynccontextmanager
async def run_daemon(
    tmp_path: Path, config: dict[str, Any], *, command: str = "run", name: str = "netwatch"
) -> AsyncIterator[DaemonProcess]:
    """Write ``config``, start ``netwatch COMMAND -c``, wait for /healthz, kill at exit."""
    cfg = write_config(tmp_path / f"{name}.yaml", config)
    listen = config.get("metrics", {}).get("listen")
    url = f"http://{listen}" if listen and command == "run" else None
    daemon = DaemonProcess([command, "-c", str(cfg)], tmp_path / f"{name}.log", url)
    try:
        if url is not None:
            await daemon.wait_healthy()
        yield daemon
    finally:
        daemon.kill()


async def eventually(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll the coroutine function ``predicate()`` until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await predicate()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
