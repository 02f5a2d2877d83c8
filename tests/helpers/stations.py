"""Simulated ID-card issuing stations and a restartable ``netwatch proxy`` process.

A ``Station`` posts numbered applications one at a time, as a counter does: each with its
own ``Idempotency-Key`` and ``Netwatch-Order-Key`` = the station id. It moves on only once
the proxy acknowledged the request (2xx, 202, or a direct 4xx for an invalid one). A
connection error, a timeout or a 5xx is *not* an acknowledgement: the station retries the
same request with the same key, a bounded number of times.

``ProxyProcess`` runs ``netwatch proxy -c FILE`` and can be SIGKILLed and started again on
the same config (hence the same port and queue file).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp

from .daemon import DaemonProcess, write_config

Outcome = Literal["forwarded", "queued", "rejected", "unacked"]
API_PATH = "/api/applications"


def proxy_config(
    *,
    listen: str,
    upstream: str,
    queue_path: Path,
    guard_url: str,
    rate: str = "500/s",
    connect_timeout: str = "300ms",
    request_timeout: str = "3s",
) -> dict[str, Any]:
    """A stand-alone proxy config whose guard is one fast http probe (200ms / 300ms, 2/2)."""
    return {
        "site": {"id": "chaos-lab"},
        "targets": [
            {
                "name": "popdb-api",
                "type": "http",
                "url": guard_url,
                "interval": "200ms",
                "timeout": "300ms",
            }
        ],
        "link": {"fail_after": 2, "recover_after": 2},
        "proxy": {
            "listen": listen,
            "upstream": upstream,
            "guard": ["popdb-api"],
            "queue": {"path": str(queue_path)},
            "replay": {
                "rate": rate,
                "peak_rate": rate,
                "backoff_initial": "100ms",
                "backoff_max": "1s",
            },
            "connect_timeout": connect_timeout,
            "request_timeout": request_timeout,
        },
    }


class ProxyProcess:
    """``netwatch proxy -c FILE`` that survives being killed: every ``start`` is a new
    incarnation with its own log file, on the same config, port and queue file."""

    def __init__(
        self,
        tmp_path: Path,
        config: dict[str, Any],
        name: str = "proxy",
        *,
        env: dict[str, str] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.name = name
        self.env = env
        self.preexec_fn = preexec_fn
        self.config_path = write_config(tmp_path / f"{name}.yaml", config)
        self.url = "http://" + config["proxy"]["listen"]
        self.incarnations = 0
        self.kills = 0
        self.daemon: DaemonProcess | None = None

    @property
    def log_paths(self) -> list[Path]:
        return [self.tmp_path / f"{self.name}-{n}.log" for n in range(1, self.incarnations + 1)]

    def start(self) -> None:
        if self.daemon is not None and self.daemon.proc.poll() is None:
            raise RuntimeError("the proxy is already running")
        self.incarnations += 1
        self.daemon = DaemonProcess(
            ["proxy", "-c", str(self.config_path)],
            self.log_paths[-1],
            metrics_url=None,
            env=self.env,
            preexec_fn=self.preexec_fn,
        )

    async def sigkill(self) -> None:
        """SIGKILL, wait for the process to be gone (bounded), close its log."""
        daemon = self.daemon
        if daemon is None or daemon.proc.poll() is not None:
            return
        daemon.signal(signal.SIGKILL)
        await daemon.wait_exit(10)
        daemon.kill()
        self.kills += 1

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()

    async def get_json(self, path: str, timeout: float = 3.0) -> tuple[int, Any]:
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.get(self.url + path) as resp,
        ):
            return resp.status, await resp.json(content_type=None)

    async def status(self) -> dict[str, Any] | None:
        try:
            code, body = await self.get_json("/_netwatch/status")
        except (OSError, aiohttp.ClientError, TimeoutError, ValueError):
            return None
        return body if code == 200 else None

    async def wait_ready(self, timeout: float = 20.0) -> None:
        """Until ``/_netwatch/healthz`` answers 200; fails at once if the process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.daemon is not None
            if self.daemon.proc.poll() is not None:
                raise AssertionError(
                    f"proxy exited with {self.daemon.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                code, _ = await self.get_json("/_netwatch/healthz", timeout=1.0)
            except (OSError, aiohttp.ClientError, TimeoutError, ValueError):
                code = 0
            if code == 200:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"proxy not ready in {timeout}s:\n{self.log_tail()}")

    def log_events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for path in self.log_paths:
            if not path.exists():
                continue
            for line in path.read_text(errors="replace").splitlines():
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_paths or not self.log_paths[-1].exists():
            return "(no log)"
        return "\n".join(self.log_paths[-1].read_text(errors="replace").splitlines()[-lines:])


@dataclass(slots=True)
class Sent:
    """One application as the station saw it, after all its tries."""

    station: str
    seq: int
    key: str
    invalid: bool
    outcome: Outcome = "unacked"
    status: int | None = None
    ticket: str | None = None
    tries: int = 0

    @property
    def acknowledged(self) -> bool:
        return self.outcome != "unacked"


@dataclass(slots=True)
class Station:
    """One counter posting applications through the proxy, one at a time."""

    name: str
    proxy_url: str
    rng: random.Random
    invalid_every: int = 13
    think: tuple[float, float] = (0.01, 0.04)
    max_tries: int = 60
    request_timeout: float = 8.0
    sent: list[Sent] = field(default_factory=list)
    attempts: int = 0  # HTTP requests sent, tries included
    errors: Counter[str] = field(default_factory=Counter)  # why tries were not acknowledged
    unexpected: list[tuple[str, int, str]] = field(default_factory=list)  # (key, status, body)

    async def run(self, stop: asyncio.Event, *, max_requests: int = 5000) -> None:
        """Post applications until ``stop`` is set (the one in progress still completes)."""
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for seq in range(1, max_requests + 1):
                if stop.is_set():
                    return
                await self.send(session, seq)
                await asyncio.sleep(self.rng.uniform(*self.think))

    async def send(self, session: aiohttp.ClientSession, seq: int) -> Sent:
        invalid = seq % self.invalid_every == 0
        item = Sent(self.name, seq, f"{self.name}-{seq:05d}", invalid)
        self.sent.append(item)
        body: dict[str, Any] = {"station": self.name, "seq": seq, "citizen_id": f"{seq:012d}"}
        if invalid:
            body["invalid"] = True
        headers = {"Idempotency-Key": item.key, "Netwatch-Order-Key": self.name}
        for _ in range(self.max_tries):
            item.tries += 1
            self.attempts += 1
            try:
                async with session.post(
                    self.proxy_url + API_PATH, json=body, headers=headers
                ) as resp:
                    text = await resp.text()
                    status = resp.status
                    ticket = resp.headers.get("Netwatch-Ticket")
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.errors[type(exc).__name__] += 1
                await asyncio.sleep(self.rng.uniform(0.05, 0.2))
                continue
            if self._settle(item, status, ticket, text):
                return item
            await asyncio.sleep(self.rng.uniform(0.05, 0.2))
        return item

    def _settle(self, item: Sent, status: int, ticket: str | None, text: str) -> bool:
        """Record an answer; True when it acknowledges the request."""
        item.status = status
        if status == 202 and ticket:
            item.outcome, item.ticket = "queued", ticket
            return True
        if 200 <= status < 300:
            item.outcome = "forwarded"
            return True
        if status == 422 and item.invalid:
            item.outcome = "rejected"
            return True
        if status >= 500:
            # Not acknowledged (e.g. 503 queue_unavailable): retry. Counted, since for a
            # replayable write the contract leaves no room for a 5xx.
            self.errors[f"http {status}"] += 1
            self.unexpected.append((item.key, status, text[:200]))
            return False
        # Any other answer is a contract breach; keep it for the assertions, stop retrying.
        self.unexpected.append((item.key, status, text[:200]))
        item.outcome = "rejected"
        return True
