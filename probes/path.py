"""Path probe: an mtr-style trace to a host, per hop address, RTT and loss over a few rounds.

Every round sends one probe per TTL (1, 2, ... up to ``max_hops``, or up to the destination
once a reply has shown how far it is), ``_SEND_GAP`` seconds apart so that the destination
is rarely probed more than a few times past its distance (hosts rate-limit the ICMP errors
a UDP trace relies on). Rounds start ``spacing`` seconds apart; every probe may be answered
until the overall deadline. Two transports (``probes._trace``), picked by ``protocol``:

``icmp``
    ICMP echo requests with a growing TTL on a raw socket (icmplib); routers answer "time
    exceeded", the destination answers the echo. Needs root or CAP_NET_RAW: an unprivileged
    ping socket never receives the routers' errors.
``udp``
    UDP datagrams to ports ``port + sequence`` with ``IP_RECVERR``, like tracepath: the
    routers' "time exceeded" and the destination's "port unreachable" come back on the
    socket's error queue, with the address of the sender. Needs no privilege (Linux).
``auto``
    ``icmp`` when the process may open raw sockets (root, or CAP_NET_RAW as the installed
    systemd unit grants it), else ``udp``.

The result's ``details`` carry ``probes_sent`` (packets of the whole trace), the hops
(``hop``, ``address``, ``addresses``, ``sent``, ``received``, ``loss``, ``rtt_avg`` /
``rtt_min`` / ``rtt_max`` in seconds, ``unreachable``), ``reached``, ``last_hop`` (the last
hop that answered) and ``loss_from`` (the hop where loss starts: the first hop from which
every hop up to the end of the trace lost probes, None when the end of the trace lost none;
for a trace that died in silence, the first silent hop. Loss at a middle hop that later hops
do not share is a router that rate-limits its answers, not a loss of the path). The result
succeeds when the destination answered; its latency and loss are the destination's.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from probes import ERROR_DNS, ERROR_PERMISSION, ERROR_TIMEOUT, ERROR_UNREACHABLE, ProbeResult
from probes._trace import Answer, IcmpTransport, Reply, Transport, UdpTransport
from probes._util import classify, failure, has_net_raw, literal_address, resolve

Protocol_ = Literal["auto", "icmp", "udp"]

MAX_HOPS_LIMIT = 64
MAX_ROUNDS = 20
# Gap between two probes of one round, so that a round sent to an unknown distance stops
# soon after the destination has answered.
_SEND_GAP = 0.01
_SEQ_BASE = MAX_HOPS_LIMIT + 1  # sequence = round * _SEQ_BASE + ttl

PERMISSION_HINT = (
    "path traces need raw ICMP sockets (CAP_NET_RAW) or, for protocol udp, Linux "
    "IP_RECVERR: give the process CAP_NET_RAW as an ambient capability (systemd unit: "
    "AmbientCapabilities=CAP_NET_RAW, as deploy/netwatch.service does; a file capability on "
    "a Python script has no effect), or use protocol udp "
    "(`protocol: udp` on the target, `--protocol udp` on the command line)"
)


@dataclass(slots=True)
class _Hop:
    sent: int = 0
    rtts: list[float] = field(default_factory=list)
    sources: Counter[str] = field(default_factory=Counter)
    unreachable: bool = False
    reached: bool = False


def summarize(
    sent: Mapping[int, tuple[int, float]], replies: Iterable[Reply], max_hops: int
) -> dict[str, Any]:
    """Hop statistics from what was sent (sequence -> (ttl, time)) and what came back.

    Pure: the whole trace logic that is not sockets lives here, and is tested on its own.
    """
    hops: dict[int, _Hop] = {}
    for ttl, _ in sent.values():
        hops.setdefault(ttl, _Hop()).sent += 1
    answered: set[int] = set()
    for reply in replies:
        if reply.sequence not in sent or reply.sequence in answered:
            continue
        answered.add(reply.sequence)
        ttl, at = sent[reply.sequence]
        hop = hops[ttl]
        hop.rtts.append(max(reply.at - at, 0.0))
        hop.sources[reply.source] += 1
        hop.reached |= reply.answer is Answer.REACHED
        hop.unreachable |= reply.answer is Answer.UNREACHABLE
    reached_at = min((t for t, h in hops.items() if h.reached), default=None)
    blocked_at = min((t for t, h in hops.items() if h.unreachable), default=None)
    responding = [t for t, h in hops.items() if h.rtts]
    last_hop = max(responding, default=0)
    if reached_at is not None:
        end = reached_at
    elif blocked_at is not None:
        end = blocked_at
    else:
        # The first silent hop after the last answer is where the trace dies: listed.
        end = min(last_hop + 1, max_hops)
    if reached_at is not None or blocked_at is not None:
        last_hop = min(last_hop, end)
    rows = [_row(t, hops.get(t, _Hop())) for t in range(1, end + 1)]
    return {
        "reached": reached_at is not None,
        "probes_sent": len(sent),
        "hops": rows,
        "last_hop": last_hop,
        "loss_from": loss_from(rows, reached=reached_at is not None),
    }


def _row(ttl: int, hop: _Hop) -> dict[str, Any]:
    received = len(hop.rtts)
    ranked = [a for a, _ in hop.sources.most_common()]
    return {
        "hop": ttl,
        "address": ranked[0] if ranked else None,
        "addresses": ranked,
        "sent": hop.sent,
        "received": received,
        "loss": 1.0 - received / hop.sent if hop.sent else 1.0,
        "rtt_avg": sum(hop.rtts) / received if received else None,
        "rtt_min": min(hop.rtts) if received else None,
        "rtt_max": max(hop.rtts) if received else None,
        "unreachable": hop.unreachable,
    }


def loss_from(rows: Sequence[Mapping[str, Any]], *, reached: bool = True) -> int | None:
    """The hop where loss starts: the first of the hops that lost probes all the way to the
    end of the trace (None: the end lost none). When the trace died in silence, the first of
    the silent hops: routers before them that answer only some probes are rate-limiting
    their ICMP errors (common, and harmless), the path breaks where the silence begins."""
    floor = 1.0 if not reached and rows and rows[-1]["loss"] >= 1.0 else 0.0
    start = None
    for row in reversed(rows):
        if row["loss"] <= 0.0 or row["loss"] < floor:
            break
        start = row["hop"]
    return start


def path_view(details: Mapping[str, Any]) -> dict[str, Any]:
    """The trace part of a path result, as a status view (RTTs in ms)."""
    return {
        "reached": details.get("reached", False),
        "last_hop": details.get("last_hop", 0),
        "loss_from": details.get("loss_from"),
        "protocol": details.get("protocol"),
        "hops": [
            {
                "hop": h["hop"],
                "address": h["address"],
                "addresses": h["addresses"],
                "loss": h["loss"],
                "rtt_ms": None if h["rtt_avg"] is None else round(h["rtt_avg"] * 1000, 3),
            }
            for h in details.get("hops", [])
        ],
    }


def trace_budget(timeout: float, rounds: int, spacing: float, max_hops: int) -> float:
    """How long a whole trace may take: the last round starts ``(rounds - 1) * spacing``
    in, sends for up to ``max_hops * _SEND_GAP``, then waits ``timeout`` for answers."""
    return timeout + (rounds - 1) * spacing + max_hops * _SEND_GAP


class PathProbe:
    """Trace the path to ``host``: ``rounds`` probes per hop, up to ``max_hops`` hops."""

    type = "path"

    def __init__(
        self,
        host: str,
        *,
        rounds: int = 3,
        max_hops: int = 30,
        spacing: float = 0.5,
        protocol: Protocol_ = "auto",
        port: int = 33434,
    ) -> None:
        if not host:
            raise ValueError("path probe needs a host")
        if not 1 <= rounds <= MAX_ROUNDS:
            raise ValueError(f"path rounds must be 1-{MAX_ROUNDS}, not {rounds}")
        if not 1 <= max_hops <= MAX_HOPS_LIMIT:
            raise ValueError(f"path max_hops must be 1-{MAX_HOPS_LIMIT}, not {max_hops}")
        if spacing < 0:
            raise ValueError("path spacing must not be negative")
        if protocol not in ("auto", "icmp", "udp"):
            raise ValueError(f"path protocol must be auto, icmp or udp, not {protocol!r}")
        if not 1024 <= port <= 65535 - rounds * _SEQ_BASE:
            raise ValueError(f"path port {port} out of range 1024-{65535 - rounds * _SEQ_BASE}")
        self.host = host
        self.rounds = rounds
        self.max_hops = max_hops
        self.spacing = spacing
        self.protocol = protocol
        self.port = port

    @property
    def target(self) -> str:
        return self.host

    def budget(self, timeout: float) -> float:
        """The ``run`` timeout that gives the last probe ``timeout`` to be answered."""
        return trace_budget(timeout, self.rounds, self.spacing, self.max_hops)

    def _protocol(self) -> Literal["icmp", "udp"]:
        if self.protocol == "auto":
            return "icmp" if has_net_raw() else "udp"
        return self.protocol

    async def run(self, timeout: float) -> ProbeResult:
        # Here, not at the top: the daemon imports this module for ``trace_budget`` and
        # ``path_view`` whatever its targets, and only a path target needs icmplib.
        import icmplib  # noqa: PLC0415

        deadline = time.perf_counter() + timeout
        protocol = self._protocol()
        try:
            async with asyncio.timeout(timeout):
                address = await self._resolve()
            version = 6 if ":" in address else 4
            transport = self._open(protocol, address, version)
        except (icmplib.SocketPermissionError, PermissionError):
            return failure(self.type, self.host, ERROR_PERMISSION, PERMISSION_HINT)
        except OSError as exc:
            if exc.errno in (errno.ENOPROTOOPT, errno.EPROTONOSUPPORT, errno.EPERM):
                return failure(self.type, self.host, ERROR_PERMISSION, PERMISSION_HINT)
            error, message = classify(exc)
            return failure(self.type, self.host, error, message)
        except Exception as exc:  # every failure is a result, never an exception
            error, message = classify(exc)
            if isinstance(exc, icmplib.NameLookupError):
                error, message = ERROR_DNS, f"name resolution failed for {self.host}"
            return failure(self.type, self.host, error, message)
        try:
            sent, replies, send_errors = await self._trace(transport, deadline)
        except (icmplib.ICMPSocketError, OSError) as exc:
            return failure(self.type, self.host, ERROR_UNREACHABLE, f"trace failed: {exc}")
        finally:
            transport.close()
        trace = summarize(sent, replies, self.max_hops)
        return self._result(address, protocol, trace, send_errors if not replies else [])

    async def _resolve(self) -> str:
        # Not icmplib.is_ipv6_address: it takes anything with a colon ("host:80") for IPv6.
        literal = literal_address(self.host, 0)
        _, sockaddr = literal if literal is not None else await resolve(self.host, 0)
        address = str(sockaddr[0])
        if ":" in address:
            # An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is an IPv4 path: its ICMP errors
            # come back as IPv4 ones, which an IPv6 socket's error queue does not parse.
            mapped = ipaddress.IPv6Address(address.split("%", 1)[0]).ipv4_mapped
            if mapped is not None:
                return str(mapped)
        return address

    def _open(self, protocol: str, address: str, version: int) -> Transport:
        if protocol == "icmp":
            return IcmpTransport(address, version)
        return UdpTransport(address, version, self.port)

    async def _trace(
        self, transport: Transport, deadline: float
    ) -> tuple[dict[int, tuple[int, float]], list[Reply], list[BaseException]]:
        sent: dict[int, tuple[int, float]] = {}
        replies: list[Reply] = []
        answered: set[int] = set()
        send_errors: list[BaseException] = []
        import icmplib  # noqa: PLC0415 - see run()

        start = time.perf_counter()
        # (round, ttl) to send, in order; a round's TTLs past a known destination are skipped.
        queue = [(r, ttl) for r in range(self.rounds) for ttl in range(1, self.max_hops + 1)]
        position = 0
        next_send = start
        reached: int | None = None
        while True:
            now = time.perf_counter()
            while position < len(queue) and now < deadline:
                round_no, ttl = queue[position]
                if reached is not None and ttl > reached:
                    position += 1  # past the destination: nothing more to learn there
                    continue
                next_send = max(next_send, start + round_no * self.spacing)
                if now < next_send:
                    break
                sequence = round_no * _SEQ_BASE + ttl
                try:
                    sent[sequence] = (ttl, transport.send(sequence, ttl))
                except (OSError, icmplib.ICMPSocketError) as exc:
                    # Refused locally (a firewall's EPERM, no route): lost, like silence.
                    sent[sequence] = (ttl, time.time())
                    send_errors.append(exc)
                position += 1
                next_send = now + _SEND_GAP
            if position >= len(queue) and len(replies) >= len(sent):
                break
            horizon = deadline if position >= len(queue) else min(next_send, deadline)
            if horizon - now <= 0 and now >= deadline:
                break
            for reply in await transport.receive(max(horizon - now, 0.0)):
                if reply.sequence in sent and reply.sequence not in answered:
                    answered.add(reply.sequence)
                    replies.append(reply)
                    if reply.answer is Answer.REACHED:
                        ttl = sent[reply.sequence][0]
                        reached = ttl if reached is None else min(reached, ttl)
        return sent, replies, send_errors

    def _result(
        self,
        address: str,
        protocol: str,
        trace: dict[str, Any],
        send_errors: list[BaseException],
    ) -> ProbeResult:
        hops: list[dict[str, Any]] = trace["hops"]
        details = {"address": address, "protocol": protocol, "rounds": self.rounds, **trace}
        if send_errors:  # nothing answered, and the kernel refused to send
            error, message = classify(send_errors[0])
            return failure(self.type, self.host, error, f"cannot send: {message}", details=details)
        last = hops[-1] if hops else None
        if not trace["reached"] or last is None or not last["received"]:
            where = trace["last_hop"]
            if last is not None and last["unreachable"]:
                error = ERROR_UNREACHABLE
                message = f"hop {last['hop']} ({last['address']}) reports the host unreachable"
            elif last is not None and last["received"] and where == self.max_hops:
                # Not the network: the path goes on past the trace's end.
                error = ERROR_TIMEOUT
                message = (
                    f"not reached within max_hops {self.max_hops}: hop {where} answered, "
                    "the host is farther (raise max_hops)"
                )
            else:
                error = ERROR_TIMEOUT
                message = (
                    f"not reached; last answer from hop {where}"
                    if where
                    else "not reached; no hop answered"
                )
            return failure(self.type, self.host, error, message, details=details)
        return ProbeResult(
            type=self.type,
            target=self.host,
            success=True,
            latency=last["rtt_avg"],
            message=f"reached in {last['hop']} hop{'s' if last['hop'] != 1 else ''}",
            rtts=(last["rtt_avg"],),
            loss=last["loss"],
            details=details,
        )
