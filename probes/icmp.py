"""ICMP echo probe (icmplib), with an optional TCP fallback where ICMP is not permitted.

``icmplib.async_ping`` sends a request, waits for its reply (up to a per-packet timeout),
then sleeps ``interval`` before the next: its worst case is ``count * timeout`` and it
cannot honour one overall deadline without shrinking every reply wait. So this module
drives icmplib's public socket API (``ICMPv4Socket``/``ICMPv6Socket``, ``AsyncSocket``,
``ICMPRequest``) the way ping(8) does: requests leave every ``spacing`` seconds while
replies are collected concurrently, and everything stops at the deadline. Each request
thus gets all the time left until the deadline to be answered; one sent so late that its
reply cannot arrive in time counts as lost, so keep ``(count - 1) * spacing`` well under
the timeout (the defaults, 5 x 0.2 s in 2 s, leave 1.2 s for the last reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import socket
import struct
import time
from typing import Any, Literal

import icmplib

from probes import ERROR_DNS, ERROR_PERMISSION, ERROR_TIMEOUT, ERROR_UNREACHABLE, ProbeResult
from probes._util import ICMP_IDS, classify, failure, has_net_raw, resolve
from probes.tcp import TcpProbe

Privileged = Literal["auto", "yes", "no"]

_ECHO_REPLY = {4: 0, 6: 129}
_UNREACHABLE = {4: 3, 6: 1}

PERMISSION_HINT = (
    "ICMP sockets are not permitted for this process: give it CAP_NET_RAW as an ambient "
    "capability (systemd unit: AmbientCapabilities=CAP_NET_RAW, as deploy/netwatch.service "
    "does; a file capability on a Python script has no effect), or let its group use "
    "unprivileged ping (sysctl net.ipv4.ping_group_range), or set the target's "
    "privileged: no / fallback_tcp_port"
)


class IcmpProbe:
    """Send ``count`` echo requests ``spacing`` seconds apart and report RTTs and loss."""

    # One per target for the daemon's life: no instance dict.
    __slots__ = ("_fallback", "count", "fallback_tcp_port", "host", "privileged", "spacing")
    type = "icmp"

    def __init__(
        self,
        host: str,
        count: int = 5,
        spacing: float = 0.2,
        privileged: Privileged = "auto",
        fallback_tcp_port: int | None = None,
    ) -> None:
        if not host:
            raise ValueError("icmp probe needs a host")
        if count < 1:
            raise ValueError("icmp count must be at least 1")
        if spacing < 0:
            raise ValueError("icmp spacing must not be negative")
        if privileged not in ("auto", "yes", "no"):
            raise ValueError(f"privileged must be auto, yes or no, not {privileged!r}")
        self.host = host
        self.count = count
        self.spacing = spacing
        self.privileged = privileged
        self.fallback_tcp_port = fallback_tcp_port
        self._fallback = (
            TcpProbe(host=host, port=fallback_tcp_port) if fallback_tcp_port is not None else None
        )

    @property
    def target(self) -> str:
        return self.host

    def _use_raw_socket(self) -> bool:
        if self.privileged == "auto":
            return has_net_raw()
        return self.privileged == "yes"

    async def run(self, timeout: float) -> ProbeResult:
        deadline = time.perf_counter() + timeout
        try:
            async with asyncio.timeout(timeout):
                address = await self._resolve()
            return await self._ping(address, deadline)
        except icmplib.SocketPermissionError:
            return await self._permission_denied(deadline)
        except Exception as exc:  # every failure is a result, never an exception
            error, message = classify(exc)
            if isinstance(exc, icmplib.NameLookupError):
                error, message = ERROR_DNS, f"name resolution failed for {self.host}"
            return failure(self.type, self.host, error, message)

    async def _resolve(self) -> str:
        if not icmplib.is_hostname(self.host):
            return self.host
        _, sockaddr = await resolve(self.host, 0)
        return str(sockaddr[0])

    async def _permission_denied(self, deadline: float) -> ProbeResult:
        if self._fallback is None:
            return failure(self.type, self.host, ERROR_PERMISSION, PERMISSION_HINT)
        result = await self._fallback.run(max(deadline - time.perf_counter(), 0.001))
        return ProbeResult(
            type=self.type,
            target=self.host,
            success=result.success,
            latency=result.latency,
            error=result.error,
            message=result.message,
            rtts=result.rtts,
            loss=result.loss,
            details={**result.details, "fallback": "tcp", "port": self._fallback.port},
        )

    async def _ping(self, address: str, deadline: float) -> ProbeResult:
        version = 6 if icmplib.is_ipv6_address(address) else 4
        socket_class = icmplib.ICMPv6Socket if version == 6 else icmplib.ICMPv4Socket
        raw = self._use_raw_socket()
        ident = next(ICMP_IDS) % 0xFFFF + 1
        sent: dict[int, float] = {}
        rtts: dict[int, float] = {}
        unreachable = 0
        errors: list[str] = []
        next_send = time.perf_counter()
        icmp_socket = socket_class(None, raw)
        if raw and version == 4:
            _only_replies_to(icmp_socket, ident)
        with icmplib.AsyncSocket(icmp_socket) as sock:
            while True:
                _honour_swallowed_cancel()
                now = time.perf_counter()
                if len(sent) < self.count and now >= next_send and now < deadline:
                    request = icmplib.ICMPRequest(address, id=ident, sequence=len(sent))
                    try:
                        sock.send(request)
                    except icmplib.ICMPSocketError as exc:
                        errors.append(str(exc))
                    # icmplib stamps requests and replies with time.time(); keep that clock.
                    sent[request.sequence] = request.time or time.time()
                    next_send += self.spacing
                    continue
                if len(sent) == self.count and len(rtts) + unreachable >= len(sent):
                    break
                horizon = deadline if len(sent) == self.count else min(next_send, deadline)
                if horizon - now <= 0:
                    break
                try:
                    reply = await sock.receive(None, horizon - now)
                except icmplib.TimeoutExceeded:
                    continue
                except icmplib.ICMPSocketError as exc:
                    errors.append(str(exc))
                    break
                # Unprivileged (datagram) sockets get their id rewritten by the kernel,
                # which already delivers only this socket's replies.
                if (raw and reply.id != ident) or reply.sequence not in sent:
                    continue
                if reply.sequence in rtts:
                    continue
                if reply.type == _ECHO_REPLY[version]:
                    rtts[reply.sequence] = max(reply.time - sent[reply.sequence], 0.0)
                elif reply.type == _UNREACHABLE[version]:
                    unreachable += 1
        return self._result([rtts[s] for s in sorted(rtts)], len(sent), unreachable, errors)

    def _result(
        self, rtts: list[float], sent: int, unreachable: int, errors: list[str]
    ) -> ProbeResult:
        loss = 1.0 - len(rtts) / sent if sent else 1.0
        details: dict[str, Any] = {"sent": sent, "received": len(rtts)}
        if not rtts:
            if unreachable:
                error, message = ERROR_UNREACHABLE, f"destination unreachable ({unreachable}x)"
            else:
                error, message = ERROR_TIMEOUT, f"no reply to {sent} echo requests"
            if errors:
                message += f"; {errors[0]}"
            return failure(self.type, self.host, error, message, details=details)
        avg = sum(rtts) / len(rtts)
        # Jitter as icmplib and most ping tools define it: mean of successive differences.
        diffs = [abs(b - a) for a, b in itertools.pairwise(rtts)]
        details.update(
            min=min(rtts),
            avg=avg,
            max=max(rtts),
            jitter=sum(diffs) / len(diffs) if diffs else 0.0,
        )
        return ProbeResult(
            type=self.type,
            target=self.host,
            success=True,
            latency=avg,
            message=f"{len(rtts)}/{sent} replies",
            rtts=tuple(rtts),
            loss=loss,
            details=details,
        )


def _honour_swallowed_cancel() -> None:
    """Raise the cancellation that icmplib's ``asyncio.wait_for`` may have swallowed.

    On Python 3.11, ``wait_for`` returns the result when its inner read completes in the same
    turn as the cancellation (gh-86296); with many raw ICMP sockets, each of which sees every
    reply, that race is common, and a swallowed cancellation kept the daemon from stopping.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


SO_ATTACH_FILTER = 26


def _only_replies_to(icmp_socket: Any, ident: int) -> None:
    """Have the kernel drop, on this raw socket, ICMP messages meant for other probes.

    A raw ICMP socket receives every ICMP message of the host: with hundreds of probes in
    flight, each reply was copied to, and woke, every one of them (quadratic work, and
    scheduling lag at high probe rates). A classic BPF filter keeps only echo messages
    with this probe's identifier, and destination-unreachable ones (which quote the
    original datagram; rare). Best effort: without it the probe still works.
    """
    program = [
        (0xB1, 0, 0, 0),  # ldxb 4*([0]&0xf): X = IP header length
        (0x50, 0, 0, 0),  # ldb [x+0]: ICMP type
        (0x15, 2, 0, _UNREACHABLE[4]),  # jeq #3: accept
        (0x48, 0, 0, 4),  # ldh [x+4]: ICMP identifier
        (0x15, 0, 1, ident),  # jeq #ident: accept, else drop
        (0x06, 0, 0, 0xFFFF),  # ret #65535: accept
        (0x06, 0, 0, 0),  # ret #0: drop
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(code))
    raw = getattr(icmp_socket, "_sock", None)  # icmplib keeps its socket here
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
