"""Helpers shared by the probes: address handling, a cheap TCP connect, error mapping.

The TCP connect here is the hot path of the tcp probe (benchmarked at hundreds of probes
per second), so it avoids asyncio streams and transports: one non-blocking socket, one
writer callback, closed as soon as the handshake is known.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import random
import socket
import ssl
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from probes import (
    ERROR_DNS,
    ERROR_OTHER,
    ERROR_REFUSED,
    ERROR_RESET,
    ERROR_TIMEOUT,
    ERROR_TLS,
    ERROR_UNREACHABLE,
    ProbeResult,
)

_NOTHING: Mapping[str, Any] = MappingProxyType({})

# Raw sockets see every ICMP reply on the host, so concurrent probes (and concurrent
# processes) must use distinct identifiers; a random start and a counter give that. One
# sequence for every raw ICMP socket of the process (echo probes and path traces alike), so
# that an echo probe never takes a trace's answer for its own.
ICMP_IDS = itertools.count(random.randrange(1, 0xFFFF))

Address = tuple[socket.AddressFamily, tuple[Any, ...]]

_ERRNO_CLASSES: Mapping[int, str] = {
    errno.ECONNREFUSED: ERROR_REFUSED,
    errno.ETIMEDOUT: ERROR_TIMEOUT,
    errno.EHOSTUNREACH: ERROR_UNREACHABLE,
    errno.ENETUNREACH: ERROR_UNREACHABLE,
    errno.ENETDOWN: ERROR_UNREACHABLE,
    errno.EHOSTDOWN: ERROR_UNREACHABLE,
    errno.EADDRNOTAVAIL: ERROR_UNREACHABLE,
    # A local firewall rejecting the packet shows up as EPERM/EACCES on connect.
    errno.EPERM: ERROR_UNREACHABLE,
    errno.EACCES: ERROR_UNREACHABLE,
    errno.ECONNRESET: ERROR_RESET,
    errno.ECONNABORTED: ERROR_RESET,
    errno.EPIPE: ERROR_RESET,
}


def host_label(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals bracketed, as in a URL."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def literal_address(host: str, port: int) -> Address | None:
    """The socket address of an IP literal, or None when ``host`` is a name to resolve.

    Probes compute this once at construction so a probe of an IP never pays for
    getaddrinfo (or a thread-pool hop) per run.
    """
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        socket.inet_pton(socket.AF_INET, bare)
    except OSError:
        pass
    else:
        return socket.AF_INET, (bare, port)
    if ":" not in bare:
        return None
    try:
        # AI_NUMERICHOST never touches the network; it handles scope ids (fe80::1%eth0).
        infos = socket.getaddrinfo(
            bare, port, socket.AF_INET6, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        return None
    return socket.AF_INET6, infos[0][4]


async def resolve(host: str, port: int) -> Address:
    """First address of ``host`` from the system resolver (``socket.gaierror`` on failure)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except UnicodeError:
        # The IDNA codec rejects malformed names (empty or over-long labels) before
        # any lookup; for the operator that is a name that does not resolve.
        raise socket.gaierror(socket.EAI_NONAME, f"invalid host name {host!r}") from None
    if not infos:
        raise socket.gaierror(socket.EAI_NONAME, f"no address for {host}")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _wake(fut: asyncio.Future[None]) -> None:
    # The selector may report the socket writable again before the awaiting task
    # runs and removes the writer, so the callback must tolerate a finished future.
    if not fut.done():
        fut.set_result(None)


async def readable(sock: socket.socket) -> None:
    """Until ``sock`` is readable (or has an error queued: EPOLLERR wakes a reader too). The
    reader is added for this one wait: libuv (uvloop) stops a poll handle after it reports
    an error, so a reader kept across waits would wake once and never again."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _wake, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def connect(address: Address) -> socket.socket:
    """Open a TCP connection; the caller owns (and must close) the returned socket.

    Raises ``OSError`` carrying the connect errno. Cancellation (a timeout) closes the
    socket, so a half-open connect never leaks a file descriptor.
    """
    family, sockaddr = address
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(sockaddr)
        if err == errno.EINPROGRESS:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            fd = sock.fileno()
            loop.add_writer(fd, _wake, fut)
            try:
                await fut
            finally:
                loop.remove_writer(fd)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except BaseException:
        sock.close()
        raise
    if err:
        sock.close()
        raise OSError(err, os.strerror(err))
    return sock


def classify(exc: BaseException) -> tuple[str, str]:  # noqa: PLR0911 - one return per error family
    """Map an exception from a network operation to (error class, one-line message)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ERROR_TLS, f"certificate verification failed: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        return ERROR_TLS, f"TLS error: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return ERROR_DNS, f"name resolution failed: {exc.strerror or exc}"
    if isinstance(exc, TimeoutError):
        return ERROR_TIMEOUT, "timed out"
    if isinstance(exc, OSError) and exc.errno is not None:
        kind = _ERRNO_CLASSES.get(exc.errno, ERROR_OTHER)
        return kind, exc.strerror or os.strerror(exc.errno)
    if isinstance(exc, ConnectionError | EOFError):
        return ERROR_RESET, f"connection closed: {exc!r}"
    return ERROR_OTHER, f"{type(exc).__name__}: {exc}"


def failure(
    probe_type: str,
    target: str,
    error: str,
    message: str,
    *,
    latency: float | None = None,
    phases: Mapping[str, float] | None = None,
    details: Mapping[str, Any] | None = None,
) -> ProbeResult:
    """A failed result with the conventions every probe shares (loss 1.0)."""
    return ProbeResult(
        type=probe_type,
        target=target,
        success=False,
        latency=latency,
        error=error,
        message=message,
        rtts=(),
        loss=1.0,
        phases=phases if phases is not None else _NOTHING,
        details=details if details is not None else _NOTHING,
    )


def success(
    probe_type: str,
    target: str,
    latency: float,
    *,
    message: str = "",
    phases: Mapping[str, float] | None = None,
    details: Mapping[str, Any] | None = None,
) -> ProbeResult:
    """A successful single-shot result: ``rtts == (latency,)`` and no loss."""
    return ProbeResult(
        type=probe_type,
        target=target,
        success=True,
        latency=latency,
        error=None,
        message=message,
        rtts=(latency,),
        loss=0.0,
        phases=phases if phases is not None else _NOTHING,
        details=details if details is not None else _NOTHING,
    )


_CAP_NET_RAW = 13


def has_net_raw() -> bool:
    """Whether this process may open raw sockets: ``CAP_NET_RAW`` in its effective set
    (root has it; a non-root service gets it from the unit's ``AmbientCapabilities``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_RAW & 1)
    except (OSError, ValueError, IndexError):
        pass
    return os.geteuid() == 0
