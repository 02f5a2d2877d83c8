"""A real, private Mosquitto broker for tests and benchmarks.

``async with run_mosquitto(tmp_path) as broker:`` writes a config into ``tmp_path``, starts
``/usr/sbin/mosquitto`` on a free loopback port and waits until it accepts connections. The
broker can be stopped and started again on the *same* port (``await broker.stop()``,
``await broker.start()``) to play a broker outage; it is killed when the block exits, and
(through ``setpriv --pdeathsig``) if the test process itself dies. Never the system broker on 1883.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
# Kill the broker when its parent dies, so a crashed test run leaves no broker behind.
SETPRIV = shutil.which("setpriv")
LAUNCH = [SETPRIV, "--pdeathsig", "KILL", "--"] if SETPRIV else []
HOST = "127.0.0.1"


@dataclass(frozen=True)
class BrokerTls:
    """Server certificate for an ``mqtts`` listener; ``client_ca`` also requires client certs."""

    cert_file: Path
    key_file: Path
    client_ca: Path | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Broker:
    """One mosquitto process (restartable on its port) and its generated config."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        tls: BrokerTls | None,
        passwords: Mapping[str, str] | None,
        persistence: bool,
    ) -> None:
        self.host = HOST
        self.port = port
        self.tls = tls
        self.workdir = workdir
        self.config_path = workdir / "mosquitto.conf"
        self.log_path = workdir / "mosquitto.log"
        self._proc: asyncio.subprocess.Process | None = None
        lines = [
            f"listener {port} {HOST}",
            f"allow_anonymous {'false' if passwords else 'true'}",
            # mosquitto started as root drops to user "mosquitto", who cannot read tmp_path.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {workdir}/",
        ]
        if tls is not None:
            lines += [f"certfile {tls.cert_file}", f"keyfile {tls.key_file}"]
            if tls.client_ca is not None:
                lines += [f"cafile {tls.client_ca}", "require_certificate true"]
        if passwords:
            lines.append(f"password_file {self._write_passwords(passwords)}")
        self.config_path.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def _write_passwords(self, passwords: Mapping[str, str]) -> Path:
        path = self.workdir / "passwords"
        path.write_text("")
        for user, password in passwords.items():
            subprocess.run(
                [MOSQUITTO_PASSWD, "-b", str(path), user, password],
                check=True,
                capture_output=True,
            )
        path.chmod(0o600)
        return path

    async def start(self, timeout: float = 10.0) -> None:
        """Start the broker and return once it accepts TCP connections."""
        assert not self.running, "broker already running"
        with self.log_path.open("ab") as log:
            # Started from the loop's thread: the parent-death signal follows this thread.
            self._proc = await asyncio.create_subprocess_exec(
                *LAUNCH, MOSQUITTO, "-c", str(self.config_path), stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.returncode is not None:
                raise RuntimeError(f"mosquitto exited at start-up:\n{self.log_tail()}")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto never accepted:\n{self.log_tail()}") from None
                await asyncio.sleep(0.02)
            else:
                writer.close()
                await writer.wait_closed()
                return

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM: persistence is saved), killing if it takes too long."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
        if proc is not None:
            await proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@asynccontextmanager
async def run_mosquitto(
    tmp_path: Path,
    port: int | None = None,
    tls: BrokerTls | None = None,
    passwords: Mapping[str, str] | None = None,
    *,
    persistence: bool = False,
) -> AsyncIterator[Broker]:
    """A started broker in ``tmp_path``; killed on exit whatever happens."""
    port = port or free_port()
    workdir = tmp_path / f"mosquitto-{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    broker = Broker(workdir, port, tls, passwords, persistence)
    try:
        await broker.start()
        yield broker
    finally:
        await broker.kill()
