"""Probe implementations: leaf I/O with no dependency on the netwatch daemon.

Every probe is a small object built from keyword parameters, with one coroutine
``run(timeout)`` that never raises for a network failure: failure is a result.

    >>> probe = create("tcp", host="127.0.0.1", port=443)
    >>> result = await probe.run(timeout=2.0)

``ProbeResult.error`` is one of the ``ERROR_*`` classes below, so dashboards and
alerts can tell a refused port from a black-holed one.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

ERROR_TIMEOUT = "timeout"
ERROR_REFUSED = "refused"
ERROR_UNREACHABLE = "unreachable"
ERROR_RESET = "reset"
ERROR_DNS = "dns"
ERROR_TLS = "tls"
ERROR_STATUS = "status"
ERROR_BODY = "body"
ERROR_PERMISSION = "permission"
ERROR_MISMATCH = "mismatch"
ERROR_OTHER = "other"

ERROR_CLASSES = frozenset(
    {
        ERROR_TIMEOUT,
        ERROR_REFUSED,
        ERROR_UNREACHABLE,
        ERROR_RESET,
        ERROR_DNS,
        ERROR_TLS,
        ERROR_STATUS,
        ERROR_BODY,
        ERROR_PERMISSION,
        ERROR_MISMATCH,
        ERROR_OTHER,
    }
)

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The outcome of one probe round.

    ``latency`` is the headline round-trip in seconds (ICMP: the average reply),
    ``rtts`` every individual reply (ICMP) or ``(latency,)`` for single-shot probes,
    ``loss`` the ICMP loss ratio (0.0 for other successful probes, 1.0 for failed),
    ``phases`` HTTP phase timings in seconds (resolve, connect, tls, processing, transfer),
    ``details`` anything type-specific (status code, cert days left, addresses, jitter).
    """

    type: str
    target: str
    success: bool
    latency: float | None = None
    error: str | None = None
    message: str = ""
    rtts: tuple[float, ...] = ()
    loss: float | None = None
    phases: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    details: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view (seconds kept as floats)."""
        return {
            "type": self.type,
            "target": self.target,
            "success": self.success,
            "latency": self.latency,
            "error": self.error,
            "message": self.message,
            "rtts": list(self.rtts),
            "loss": self.loss,
            "phases": dict(self.phases),
            "details": dict(self.details),
        }


class Probe(Protocol):
    """One probe of one target; ``run`` returns within about ``timeout`` seconds."""

    type: str

    @property
    def target(self) -> str:
        """A short human label of what is probed (host:port, url, name)."""
        ...

    async def run(self, timeout: float) -> ProbeResult: ...


ProbeFactory = Callable[..., Probe]

# Probe type name -> "module:class". A module is imported when a probe of its type is first
# built, so a site that probes only TCP never loads icmplib, cryptography, the DNS probe or the
# HTTP probe's client code (each costs the daemon resident memory for as long as it runs).
_FACTORIES: Mapping[str, str] = MappingProxyType(
    {
        "icmp": "probes.icmp:IcmpProbe",
        "tcp": "probes.tcp:TcpProbe",
        "http": "probes.http:HttpProbe",
        "dns": "probes.dns:DnsProbe",
        "tls": "probes.tls:TlsProbe",
        "path": "probes.path:PathProbe",
    }
)

PROBE_TYPES = tuple(_FACTORIES)


def factory(probe_type: str) -> ProbeFactory:
    """The factory of one probe type, importing only its module; ``ValueError`` if unknown."""
    try:
        module, _, name = _FACTORIES[probe_type].partition(":")
    except KeyError:
        raise ValueError(
            f"unknown probe type {probe_type!r} (expected one of {', '.join(PROBE_TYPES)})"
        ) from None
    found: ProbeFactory = getattr(importlib.import_module(module), name)
    return found


def registry() -> dict[str, ProbeFactory]:
    """Probe type name -> factory taking the probe's keyword parameters (imports every
    probe module: the daemon builds its probes with ``create``, which imports one)."""
    return {probe_type: factory(probe_type) for probe_type in PROBE_TYPES}


def create(probe_type: str, **params: Any) -> Probe:
    """Build a probe by type name; ``ValueError`` for an unknown type or bad parameters."""
    return factory(probe_type)(**params)


async def close_shared_sessions() -> None:
    """Close what probes share across runs on the running loop (today nothing: the HTTP
    probe keeps no session); imports nothing when no HTTP probe module was loaded."""
    http = sys.modules.get("probes.http")
    if http is not None:
        await http.close_shared_sessions()
