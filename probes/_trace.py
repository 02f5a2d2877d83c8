"""The two ways a path trace sends its probes and reads what comes back (``probes.path``).

``IcmpTransport``: echo requests with a TTL on a raw socket (root or CAP_NET_RAW), built and
sent by icmplib; answers are read and parsed here (icmplib's async receive drops the sender's
address). ``UdpTransport``: UDP datagrams whose ICMP errors come back on the socket's error
queue (Linux ``IP_RECVERR``, like tracepath), with no privilege.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from probes._util import ICMP_IDS, readable

# Linux values; Python 3.11's socket module does not name them.
_SOL_IP, _IP_RECVERR = 0, 11
_SOL_IPV6, _IPV6_RECVERR = 41, 25
_EE_ORIGIN_ICMP, _EE_ORIGIN_ICMP6 = 2, 3
_EE = struct.Struct("=IBBBBII")  # struct sock_extended_err
_STALE_ERRORS = frozenset(
    {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN}
)
_TIME_EXCEEDED = {4: 11, 6: 3}
_UNREACHABLE = {4: 3, 6: 1}
_PORT_UNREACHABLE = {4: 3, 6: 4}
_ECHO_REPLY = {4: 0, 6: 129}


class Answer(StrEnum):
    """What came back for one probe."""

    HOP = "hop"  # time exceeded: a router on the way
    REACHED = "reached"  # the destination itself (echo reply, port unreachable)
    UNREACHABLE = "unreachable"  # a router that cannot forward (no route, prohibited)


@dataclass(frozen=True, slots=True)
class Reply:
    sequence: int
    source: str
    answer: Answer
    at: float  # time.time() of arrival


class Transport(Protocol):
    """Sends one probe with a TTL; hands back whatever answers arrived."""

    def send(self, sequence: int, ttl: int) -> float: ...

    async def receive(self, timeout: float) -> list[Reply]: ...

    def close(self) -> None: ...


class IcmpTransport:
    """Echo requests on a raw socket (built and sent by icmplib); answers are read and
    parsed here, since icmplib's async receive drops the sender's address."""

    def __init__(self, address: str, version: int) -> None:
        import icmplib  # noqa: PLC0415 - loaded by the traces that use it, not by every daemon

        socket_class = icmplib.ICMPv6Socket if version == 6 else icmplib.ICMPv4Socket
        self._address = address
        self._version = version
        self._id = next(ICMP_IDS) % 0xFFFF + 1
        self._icmp = socket_class(None, True)
        self._icmp.blocking = False

    def send(self, sequence: int, ttl: int) -> float:
        import icmplib  # noqa: PLC0415 - imported by __init__ already: a dict look-up

        request = icmplib.ICMPRequest(self._address, id=self._id, sequence=sequence, ttl=ttl)
        try:
            self._icmp.send(request)
        except icmplib.ICMPSocketError as exc:
            # icmplib keeps only the text; the errno (EPERM from a firewall) is the context.
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise
        return request.time or time.time()

    async def receive(self, timeout: float) -> list[Reply]:
        sock = self._icmp.sock
        assert sock is not None
        try:
            async with asyncio.timeout(timeout):
                packet, source = await _recvfrom(sock, 2048)
        except TimeoutError:
            return []
        parsed = parse_icmp(packet, self._version)
        if parsed is None or parsed[0] != self._id:
            return []
        _, sequence, answer = parsed
        return [Reply(sequence, str(source[0]), answer, time.time())]

    def close(self) -> None:
        self._icmp.close()


async def _recvfrom(sock: socket.socket, size: int) -> tuple[bytes, Any]:
    """``recvfrom`` on a non-blocking socket once it is readable. ``loop.sock_recvfrom``
    would do, but uvloop does not implement it; a reader callback works on both loops."""
    while True:
        try:
            return sock.recvfrom(size)
        except (BlockingIOError, InterruptedError):
            pass
        await readable(sock)


def parse_icmp(packet: bytes, version: int) -> tuple[int, int, Answer] | None:
    """(id, sequence, answer) of an ICMP packet answering one of our echo requests: an
    echo reply, or an error quoting the request. IPv4 raw sockets include the IP header."""
    offset = (packet[0] & 0x0F) * 4 if version == 4 and packet else 0
    if len(packet) < offset + 8:
        return None
    kind = packet[offset]
    if kind == _ECHO_REPLY[version]:
        ident, sequence = struct.unpack_from("!HH", packet, offset + 4)
        return ident, sequence, Answer.REACHED
    if kind == _TIME_EXCEEDED[version]:
        answer = Answer.HOP
    elif kind == _UNREACHABLE[version]:
        answer = Answer.UNREACHABLE
    else:
        return None
    inner = offset + 8
    if version == 4:
        if len(packet) < inner + 1:
            return None
        inner += (packet[inner] & 0x0F) * 4
    else:
        inner += 40
    if len(packet) < inner + 8:
        return None
    ident, sequence = struct.unpack_from("!HH", packet, inner + 4)
    return ident, sequence, answer


class UdpTransport:
    """UDP datagrams whose ICMP errors come back on the error queue (``IP_RECVERR``)."""

    def __init__(self, address: str, version: int, port: int) -> None:
        family = socket.AF_INET6 if version == 6 else socket.AF_INET
        self._address = address
        self._version = version
        self._port = port
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.setblocking(False)
            if version == 6:
                self._sock.setsockopt(_SOL_IPV6, _IPV6_RECVERR, 1)
            else:
                self._sock.setsockopt(_SOL_IP, _IP_RECVERR, 1)
        except BaseException:
            self._sock.close()
            raise

    def send(self, sequence: int, ttl: int) -> float:
        if self._version == 6:
            self._sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
        else:
            self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        at = time.time()
        destination = (self._address, self._port + sequence)
        try:
            self._sock.sendto(b"netwatch-path", destination)
        except (ConnectionError, OSError) as exc:
            # An earlier probe's ICMP error may be reported on this send: that one is on the
            # error queue already, so send again; a real failure counts as a lost probe.
            if exc.errno not in _STALE_ERRORS:
                raise
            self._sock.sendto(b"netwatch-path", destination)
        return at

    async def receive(self, timeout: float) -> list[Reply]:
        out = self._drain()
        if out:
            return out
        # An error-queue entry wakes the loop as readable (EPOLLERR).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await readable(self._sock)
        return self._drain()

    def _drain(self) -> list[Reply]:
        out: list[Reply] = []
        while True:
            try:
                _, ancdata, _, name = self._sock.recvmsg(512, 512, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                break
            reply = self._parse(ancdata, name, time.time())
            if reply is not None:
                out.append(reply)
        with contextlib.suppress(BlockingIOError, OSError):
            self._sock.recv(512)  # a stray datagram (something answered on that port)
        return out

    def _parse(self, ancdata: list[tuple[int, int, bytes]], name: Any, at: float) -> Reply | None:
        sequence = int(name[1]) - self._port if name else -1
        for level, kind, data in ancdata:
            if (level, kind) not in ((_SOL_IP, _IP_RECVERR), (_SOL_IPV6, _IPV6_RECVERR)):
                continue
            if len(data) < _EE.size + 8:
                continue
            _, origin, ee_type, ee_code, _, _, _ = _EE.unpack_from(data)
            if origin not in (_EE_ORIGIN_ICMP, _EE_ORIGIN_ICMP6):
                continue
            source = _offender(data[_EE.size :])
            v = self._version
            if ee_type == _TIME_EXCEEDED[v]:
                answer = Answer.HOP
            elif ee_type == _UNREACHABLE[v] and ee_code == _PORT_UNREACHABLE[v]:
                answer = Answer.REACHED
            elif ee_type == _UNREACHABLE[v]:
                answer = Answer.UNREACHABLE
            else:
                continue
            return Reply(sequence, source, answer, at)
        return None

    def close(self) -> None:
        self._sock.close()


def _offender(raw: bytes) -> str:
    """The address in the ``sockaddr`` that follows ``sock_extended_err``."""
    family = int.from_bytes(raw[:2], "little")
    if family == socket.AF_INET6 and len(raw) >= 24:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24])
    return socket.inet_ntop(socket.AF_INET, raw[4:8])
