"""A throw-away network namespace joined to the root namespace by a veth pair.

    with NetNs.create() as ns:        # or pytest.skip(unavailable_reason())
        ns.host_addr, ns.ns_addr      # the two ends of a private /30 (10.213.x.y)
        proc = ns.popen([...])        # a process inside the namespace
        handle = ns.drop_tcp_port(p)  # nft: silently drop tcp dport p inside the namespace
        ns.delete_rule(handle)

The /30 lives only on this veth pair: no route to anywhere else is added, and the namespace
has no default route, so nothing a test does there can leave the machine. ``close`` kills
what was started inside, then deletes the namespace and the pair, even half-built.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from types import TracebackType
from typing import IO, Self

NFT_TABLE = "netwatch_test"
_SUBNET_BASE = ipaddress.ip_network("10.213.0.0/16")
_counter = itertools.count()


def _run(*argv: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _must(*argv: str) -> str:
    done = _run(*argv)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"network namespace tests need `{tool}` on PATH"
    name = f"nwprobe{os.getpid()}"
    done = _run("ip", "netns", "add", name)
    if done.returncode != 0:
        return f"`ip netns add` does not work here: {done.stderr.strip()}"
    _run("ip", "netns", "del", name)
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    out = _run("ip", "-4", "-o", "addr", "show").stdout
    return [
        ipaddress.ip_interface(m.group(1)).network
        for m in re.finditer(r"inet (\d+\.\d+\.\d+\.\d+/\d+)", out)
    ]


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of 10.213.0.0/16 that no interface of the root namespace uses (another test
    run may hold one); tried from a pid-dependent start, a bounded number of times."""
    used = _used_networks()
    subnets = list(_SUBNET_BASE.subnets(new_prefix=30))
    start = (os.getpid() * 7 + next(_counter) * 131) % len(subnets)
    for offset in range(256):
        candidate = subnets[(start + offset) % len(subnets)]
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise RuntimeError("no free /30 in 10.213.0.0/16")


class NetNs:
    """One namespace, its veth pair, and the processes started inside it."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{next(_counter)}"
        self.name = f"nwtest{tag}"
        self.host_if = f"nwh{tag}"[:15]
        self.ns_if = f"nwn{tag}"[:15]
        subnet = _free_subnet()
        host, peer = list(subnet.hosts())
        self.prefix = subnet.prefixlen
        self.host_addr = str(host)
        self.ns_addr = str(peer)
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self._made_ns = False
        self._made_link = False

    @classmethod
    def create(cls) -> NetNs:
        ns = cls()
        try:
            ns._build()
        except BaseException:
            ns.close()
            raise
        return ns

    def _build(self) -> None:
        _must("ip", "netns", "add", self.name)
        self._made_ns = True
        _must("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._made_link = True
        _must("ip", "link", "set", self.ns_if, "netns", self.name)
        _must("ip", "addr", "add", f"{self.host_addr}/{self.prefix}", "dev", self.host_if)
        _must("ip", "link", "set", self.host_if, "up")
        self.exec("ip", "addr", "add", f"{self.ns_addr}/{self.prefix}", "dev", self.ns_if)
        self.exec("ip", "link", "set", self.ns_if, "up")
        self.exec("ip", "link", "set", "lo", "up")
        self.exec("nft", "add", "table", "inet", NFT_TABLE)
        self.exec(
            "nft", "add", "chain", "inet", NFT_TABLE, "input",
            "{ type filter hook input priority 0; policy accept; }",
        )  # fmt: skip

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def exec(self, *argv: str) -> str:
        """Run a command inside the namespace; its stdout, or RuntimeError."""
        return _must("ip", "netns", "exec", self.name, *argv)

    def popen(self, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        """Start a long-lived process inside the namespace (``ip netns exec`` execs it, so
        the Popen's pid is the process itself); ``close`` kills it."""
        log = log_path.open("wb")
        self._logs.append(log)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.name, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._procs.append(proc)
        return proc

    def drop_tcp_port(self, port: int) -> int:
        """Silently drop TCP packets to ``port`` arriving in the namespace; the rule handle."""
        out = self.exec(
            "nft", "--echo", "--handle", "add", "rule", "inet", NFT_TABLE, "input",
            "tcp", "dport", str(port), "drop",
        )  # fmt: skip
        match = re.search(r"# handle (\d+)", out)
        if match is None:
            raise RuntimeError(f"nft did not echo a rule handle: {out!r}")
        return int(match.group(1))

    def delete_rule(self, handle: int) -> None:
        self.exec("nft", "delete", "rule", "inet", NFT_TABLE, "input", "handle", str(handle))

    def close(self) -> None:
        """Kill the processes started inside, delete the pair and the namespace. Never
        raises: it runs in ``finally`` blocks, after whatever went wrong."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        self._procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        if self._made_link:
            # Deleting either end deletes both; the host end is still in the root namespace.
            _run("ip", "link", "del", self.host_if)
            self._made_link = False
        if self._made_ns:
            _run("ip", "netns", "del", self.name)
            self._made_ns = False
