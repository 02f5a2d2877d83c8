"""A chain of throw-away network namespaces: a client, routers, a destination.

    with closing(NetChain.create(routers=2)) as chain:  # or pytest.skip(unavailable_reason())
        chain.client, chain.destination        # namespace names
        chain.hops                             # addresses a trace from the client sees
        chain.run(chain.client, [...])         # a command inside a namespace
        chain.drop_at(1)                       # nft: router 1 drops the client's traffic

Topology (every /30 lives only inside these namespaces; nothing touches the root namespace,
so parallel runs cannot clash and nothing can leave the machine)::

    client 10.77.1.2 -- 10.77.1.1 r1 10.77.2.1 -- 10.77.2.2 r2 10.77.3.1 -- 10.77.3.2 dest

Routers forward (``net.ipv4.ip_forward=1`` in their namespace) and answer expired TTLs, so a
trace from the client sees one hop per router, then the destination.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from pathlib import Path

from helpers.netns import unavailable_reason

__all__ = ["NetChain", "unavailable_reason"]

_counter = itertools.count()
NFT_TABLE = "netwatch_path_test"


def _must(*argv: str, timeout: float = 30.0) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class NetChain:
    """Namespaces client, r1 .. rN, dest joined by veth pairs, with routes both ways."""

    def __init__(self, routers: int) -> None:
        tag = f"{os.getpid() % 100000}x{next(_counter)}"
        self.nodes = [f"nwpc{tag}", *(f"nwpr{i}{tag}" for i in range(1, routers + 1))]
        self.nodes.append(f"nwpd{tag}")
        self.client = self.nodes[0]
        self.destination = self.nodes[-1]
        self.routers = self.nodes[1:-1]
        # Link k joins nodes[k] (.2 end, or .1 for the first) and nodes[k+1].
        self.links = [f"10.77.{k + 1}" for k in range(len(self.nodes) - 1)]
        self._made: list[str] = []

    @property
    def hops(self) -> list[str]:
        """The address of each hop as seen from the client: the routers' near sides, then
        the destination."""
        return [f"{net}.1" if k == 0 else f"{net}.2" for k, net in enumerate(self.links)]

    @property
    def destination_address(self) -> str:
        return f"{self.links[-1]}.2"

    @classmethod
    def create(cls, routers: int = 2) -> NetChain:
        chain = cls(routers)
        try:
            chain._build()
        except BaseException:
            chain.close()
            raise
        return chain

    def _addr(self, link: int, node: int) -> str:
        """Address of ``nodes[node]`` on link ``link`` (the left node is .1 on the first
        link only so the client is .2 there, like a host behind its gateway)."""
        left = node == link
        if link == 0:
            return f"{self.links[0]}.{2 if left else 1}"
        return f"{self.links[link]}.{1 if left else 2}"

    def _build(self) -> None:
        for node in self.nodes:
            _must("ip", "netns", "add", node)
            self._made.append(node)
            self.run(node, ["ip", "link", "set", "lo", "up"])
        for link in range(len(self.links)):
            left, right = self.nodes[link], self.nodes[link + 1]
            a, b = f"l{link}", f"r{link}"
            _must(
                "ip", "link", "add", a, "netns", left, "type", "veth", "peer", "name", b,
                "netns", right,
            )  # fmt: skip
            for node, dev in ((link, a), (link + 1, b)):
                name = self.nodes[node]
                self.run(name, ["ip", "addr", "add", f"{self._addr(link, node)}/30", "dev", dev])
                self.run(name, ["ip", "link", "set", dev, "up"])
        for router in self.routers:
            self.run(router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        last = len(self.links) - 1
        self.run(self.client, ["ip", "route", "add", "default", "via", self._addr(0, 1)])
        self.run(self.destination, ["ip", "route", "add", "default", "via", self._addr(last, last)])
        for index, router in enumerate(self.routers, start=1):
            # Towards the destination via the next node, towards the client via the previous.
            for link in range(len(self.links)):
                if link in (index - 1, index):
                    continue
                via = (
                    self._addr(index, index + 1)
                    if link > index
                    else self._addr(index - 1, index - 1)
                )
                self.run(router, ["ip", "route", "add", f"{self.links[link]}.0/30", "via", via])

    def run(self, node: str, argv: list[str], timeout: float = 30.0) -> str:
        """A command inside namespace ``node``; its stdout, or RuntimeError."""
        return _must("ip", "netns", "exec", node, *argv, timeout=timeout)

    def exec(
        self, node: str, argv: list[str], timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """A command inside ``node`` whatever its exit code (the caller checks)."""
        return subprocess.run(
            ["ip", "netns", "exec", node, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen(self, node: str, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        """A long-lived process inside ``node`` (killed with the namespace by ``close``)."""
        log = log_path.open("wb")
        try:
            return subprocess.Popen(
                ["ip", "netns", "exec", node, *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            log.close()

    def drop_at(self, router: int) -> None:
        """Router ``router`` (1-based) silently drops everything from the client before
        routing it: no forward, no "time exceeded". Loss starts at that hop."""
        node = self.routers[router - 1]
        self.run(node, ["nft", "add", "table", "inet", NFT_TABLE])
        self.run(
            node,
            [
                "nft", "add", "chain", "inet", NFT_TABLE, "pre",
                "{ type filter hook prerouting priority -300; policy accept; }",
            ],
        )  # fmt: skip
        self.run(
            node,
            [
                "nft",
                "add",
                "rule",
                "inet",
                NFT_TABLE,
                "pre",
                "ip",
                "saddr",
                self._addr(0, 0),
                "drop",
            ],
        )

    def undrop_at(self, router: int) -> None:
        self.run(self.routers[router - 1], ["nft", "delete", "table", "inet", NFT_TABLE])

    def close(self) -> None:
        """Kill whatever runs inside and delete every namespace (and so its veths).
        Never raises: it runs after whatever went wrong."""
        for node in reversed(self._made):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                pids = subprocess.run(
                    ["ip", "netns", "pids", node],
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout.split()
                for pid in pids:
                    with contextlib.suppress(OSError, ValueError):
                        os.kill(int(pid), 9)
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run(
                    ["ip", "netns", "del", node], check=False, capture_output=True, timeout=10
                )
        self._made.clear()
