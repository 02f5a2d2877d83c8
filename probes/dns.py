"""DNS probe (aiodns / c-ares): resolution time, answers, and an optional expected answer.

Two modes, because they answer different questions:

- ``server`` given ("10.0.0.53", "10.0.0.53:5353", "[2001:db8::53]:53"): a DNS query sent
  straight to that server; it tests the server.
- no ``server``: the system resolver's view (hosts file, then resolv.conf servers), via
  c-ares getaddrinfo; it tests whether this host can resolve the name at all.

A channel is made per run and closed after it: pycares 5 starts an event thread per
channel, and a per-run channel needs no lifetime management by the daemon.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Iterable
from typing import Any, Literal

import aiodns
import pycares

from probes import ERROR_DNS, ERROR_MISMATCH, ERROR_REFUSED, ERROR_TIMEOUT, ProbeResult
from probes._util import classify, failure, success

Record = Literal["A", "AAAA"]

_FAMILY = {"A": socket.AF_INET, "AAAA": socket.AF_INET6}
_TYPE_CODE = {"A": pycares.QUERY_TYPE_A, "AAAA": pycares.QUERY_TYPE_AAAA}

_ARES_CLASSES = {
    pycares.errno.ARES_ETIMEOUT: ERROR_TIMEOUT,
    pycares.errno.ARES_ECONNREFUSED: ERROR_REFUSED,
}
_ARES_MESSAGES = {
    pycares.errno.ARES_ENOTFOUND: "NXDOMAIN: the name does not exist",
    pycares.errno.ARES_ENODATA: "the name exists but has no record of this type",
    pycares.errno.ARES_ESERVFAIL: "SERVFAIL from the server",
    pycares.errno.ARES_EREFUSED: "the server refused the query",
}


def _check_server(server: str) -> str:
    """Validate ``ip``, ``ip:port`` or ``[ipv6]:port``; c-ares takes the same syntax."""
    host, port = server, ""
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        port = rest.removeprefix(":")
    elif server.count(":") == 1:
        host, _, port = server.partition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"dns server must be an IP address (optionally :port), not {server!r}"
        ) from None
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"dns server port in {server!r} is not 1-65535")
    return server


def _normalize(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


class DnsProbe:
    """Resolve ``query`` for ``record``; ``expect`` addresses must all be in the answer."""

    type = "dns"

    def __init__(
        self,
        query: str,
        record: Record = "A",
        server: str | None = None,
        expect: Iterable[str] = (),
    ) -> None:
        if not query:
            raise ValueError("dns probe needs a query name")
        if record not in _FAMILY:
            raise ValueError(f"dns record must be A or AAAA, not {record!r}")
        self.query = query
        self.record = record
        self.server = _check_server(server) if server else None
        self.expect = tuple(expect)
        self._expect = frozenset(_normalize(a) for a in self.expect)
        self._label = f"{query} {record}" + (f" @{server}" if server else "")

    @property
    def target(self) -> str:
        return self._label

    async def run(self, timeout: float) -> ProbeResult:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                addresses, ttl = await self._resolve(timeout)
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            error = _ARES_CLASSES.get(code, ERROR_DNS)
            message = _ARES_MESSAGES.get(code) or (str(exc.args[1]) if len(exc.args) > 1 else "")
            return failure(self.type, self._label, error, message or "resolution failed")
        except Exception as exc:  # every failure is a result, never an exception
            error, message = classify(exc)
            return failure(self.type, self._label, error, message)
        latency = time.perf_counter() - started
        details: dict[str, Any] = {"addresses": addresses}
        if ttl is not None:
            details["ttl"] = ttl
        if not addresses:
            message = f"no {self.record} record in the answer"
            return failure(
                self.type, self._label, ERROR_DNS, message, latency=latency, details=details
            )
        missing = self._expect - {_normalize(a) for a in addresses}
        if missing:
            message = f"expected {', '.join(sorted(missing))}, got {', '.join(addresses)}"
            return failure(
                self.type, self._label, ERROR_MISMATCH, message, latency=latency, details=details
            )
        return success(self.type, self._label, latency, details=details)

    async def _resolve(self, timeout: float) -> tuple[list[str], int | None]:
        # Two tries in the budget, so one lost UDP datagram does not fail the probe.
        nameservers = [self.server] if self.server else None
        async with aiodns.DNSResolver(
            nameservers=nameservers, timeout=max(timeout / 2, 0.05), tries=2
        ) as resolver:
            if self.server is None:
                info = await resolver.getaddrinfo(self.query, family=_FAMILY[self.record])
                seen = dict.fromkeys(node.addr[0].decode() for node in info.nodes)
                return list(seen), None
            result = await resolver.query_dns(self.query, self.record)
            code = _TYPE_CODE[self.record]
            answers = [r for r in result.answer if r.type == code]
            addresses = [str(getattr(r.data, "addr", "")) for r in answers]
            ttl = min((r.ttl for r in answers), default=None)
            return addresses, ttl
