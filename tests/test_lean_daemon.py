"""The long-running commands carry only what they use: a real ``netwatch run`` on a TCP-only
or HTTP-only config (and a real ``netwatch proxy``) must not load the CLI's tables, the demo,
the other probe types' libraries or the optional parts it was not configured for (an HTTP
probe needs no aiohttp).

Each case runs the console script's entry point (``netwatch.cli:main``) in a child process
that writes ``sorted(sys.modules)`` when it exits, after it has probed its target, answered
a scrape and been stopped with SIGTERM like any service."""

from __future__ import annotations

import contextlib
import io
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import structlog
import yaml
from click.testing import CliRunner

from netwatch.cli import cli
from netwatch.logs import configure_logging

# What the entry point runs, plus the dump at exit (the file name is the first argument).
HARNESS = """
import atexit, sys
out = sys.argv.pop(1)
def dump():
    with open(out, "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
atexit.register(dump)
from netwatch.cli import main
main(sys.argv[1:])
"""

TOKEN = "lean-token"

# Never in either command: console rendering, other commands, unconfigured probe types.
NEVER = (
    "rich",
    "pygments",
    "greenlet",
    "netwatch.demo",
    "netwatch.oneshot",
    "netwatch.pathcmd",
    "netwatch.siteinit",
    "netwatch.proxy.queue_cmd",
    "icmplib",
    "probes.icmp",
    "probes.dns",
    "probes.tls",
    "probes.http",
    "stamina",
    "tenacity",
    "aiomqtt",
    "netwatch.mqtt",
    "netwatch.alerting.notify",
)
# ... and not in a site daemon without a proxy section (nor HTTP targets nor webhooks): its
# endpoint is netwatch.monitor.httpd, so aiohttp and its dependencies stay out.
NOT_IN_RUN = (
    "aiohttp",
    "aiodns",
    "aiohappyeyeballs",
    "aiosignal",
    "attr",
    "attrs",
    "frozenlist",
    "multidict",
    "propcache",
    "yarl",
    "netwatch.monitor.api",
    "netwatch.proxy.station",
    "netwatch.proxy.staff_page",
    "netwatch.proxy.queue",
    "sqlite3",
    "cryptography",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port that completes handshakes (the kernel's backlog answers the probes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield int(s.getsockname()[1])


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_listener() -> Iterator[int]:
    """An HTTP server (a thread of the test process) that answers every GET with 200."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def config(role: str, port: int, tmp_path: Path, kind: str) -> tuple[dict[str, object], str]:
    """The config and the URL that shows the target was probed (its link went up)."""
    target: dict[str, object] = {"name": "gw", "type": "tcp", "host": "127.0.0.1", "port": port}
    if kind == "http":
        target = {"name": "gw", "type": "http", "url": f"http://127.0.0.1:{port}/health"}
    doc: dict[str, object] = {
        "site": {"id": "lean"},
        "defaults": {"interval": "300ms", "timeout": "1s"},
        "link": {"recover_after": 1},
        "targets": [target],
    }
    if role == "run":
        listen = f"127.0.0.1:{free_port()}"
        doc["metrics"] = {"listen": listen, "token": TOKEN}  # the bearer check loads no aiohttp
        return doc, f"http://{listen}/metrics"
    listen = f"127.0.0.1:{free_port()}"
    doc["proxy"] = {
        "listen": listen,
        "upstream": f"http://127.0.0.1:{port}",
        "guard": ["gw"],
        "queue": {"path": str(tmp_path / "queue.db")},
    }
    return doc, f"http://{listen}/_netwatch/metrics"


def loaded_modules(role: str, port: int, tmp_path: Path, kind: str = "tcp") -> set[str]:
    doc, url = config(role, port, tmp_path, kind)
    cfg = tmp_path / "netwatch.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    out = tmp_path / "modules.txt"
    log = (tmp_path / "netwatch.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", HARNESS, str(out), role, "-c", str(cfg)],
        stdout=log,
        stderr=log,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "netwatch.log").read_text()
            assert time.monotonic() < deadline, "the target was never probed"
            scrape = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
            with contextlib.suppress(OSError), urllib.request.urlopen(scrape, timeout=5) as resp:
                if 'netwatch_link_up{site="lean",target="gw"' in resp.read().decode():
                    break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, (tmp_path / "netwatch.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    return set(out.read_text().split())


def offenders(modules: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == b or m.startswith(f"{b}.") for b in banned))


def test_run_on_a_tcp_only_site_loads_nothing_it_does_not_use(
    listener: int, tmp_path: Path
) -> None:
    modules = loaded_modules("run", listener, tmp_path)
    assert "probes.tcp" in modules  # the harness really ran the daemon
    assert offenders(modules, NEVER + NOT_IN_RUN) == []


def test_run_on_an_http_only_site_loads_no_aiohttp(http_listener: int, tmp_path: Path) -> None:
    modules = loaded_modules("run", http_listener, tmp_path, kind="http")
    assert "probes.http" in modules  # the harness really ran the daemon's HTTP probe
    banned = tuple(m for m in NEVER + NOT_IN_RUN if m != "probes.http")
    assert offenders(modules, banned) == []


def test_proxy_loads_no_console_tools_nor_other_probe_types(listener: int, tmp_path: Path) -> None:
    modules = loaded_modules("proxy", listener, tmp_path)
    assert "netwatch.proxy.station" in modules
    assert offenders(modules, NEVER) == []


def test_queue_commands_are_found_though_imported_on_demand() -> None:
    listed = CliRunner().invoke(cli, ["--help"])
    assert "queue" in listed.output
    shown = CliRunner().invoke(cli, ["queue", "--help"])
    assert shown.exit_code == 0, shown.output
    assert "list" in shown.output


def test_console_format_renders_a_traceback_with_rich_on_demand() -> None:
    err = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stderr, sys.stderr = sys.stderr, err
    try:
        configure_logging("info", "console")
        try:
            1 / 0  # noqa: B018 - the exception to render
        except ZeroDivisionError:
            structlog.get_logger("test").exception("failed")
    finally:
        sys.stderr = stderr
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level
    text = err.getvalue()
    assert "failed" in text
    assert "Traceback" in text
    assert "ZeroDivisionError" in text
