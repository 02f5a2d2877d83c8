"""The path probe: the hop arithmetic on its own, then real traces to loopback (ICMP on a
raw socket, UDP with IP_RECVERR, IPv4 and IPv6) and ``netwatch probe path`` as a process.

Multi-hop traces through routers, and loss starting at a hop, are in ``test_path_netns.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from typing import Any

import pytest

import probes
from probes import ERROR_PERMISSION
from probes._trace import parse_icmp
from probes.path import Answer, PathProbe, Reply, loss_from, summarize

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="raw ICMP sockets need root")
SETPRIV = shutil.which("setpriv")


def sent_rounds(rounds: int, ttls: range) -> dict[int, tuple[int, float]]:
    """What a trace sent: sequence -> (ttl, time), ``rounds`` x ``ttls``."""
    return {r * 100 + t: (t, 1000.0 + r) for r in range(rounds) for t in ttls}


def answer(seq: int, source: str, kind: Answer = Answer.HOP, rtt: float = 0.01) -> Reply:
    return Reply(seq, source, kind, 1000.0 + seq // 100 + rtt)


# --- the arithmetic ---------------------------------------------------------------------------


def test_a_reached_trace_lists_hops_up_to_the_destination() -> None:
    sent = sent_rounds(3, range(1, 6))
    replies = []
    for r in range(3):
        replies += [
            answer(r * 100 + 1, "10.0.0.1", rtt=0.001),
            answer(r * 100 + 2, "10.0.1.1", rtt=0.002),
            answer(r * 100 + 3, "10.0.2.2", Answer.REACHED, rtt=0.003),
            answer(r * 100 + 4, "10.0.2.2", Answer.REACHED, rtt=0.003),
        ]
    trace = summarize(sent, replies, max_hops=30)
    assert trace["reached"] is True
    assert [h["address"] for h in trace["hops"]] == ["10.0.0.1", "10.0.1.1", "10.0.2.2"]
    assert [h["loss"] for h in trace["hops"]] == [0.0, 0.0, 0.0]
    assert trace["hops"][2]["rtt_avg"] == pytest.approx(0.003)
    assert trace["last_hop"] == 3
    assert trace["loss_from"] is None


def test_a_cut_path_ends_with_its_first_silent_hop_where_loss_starts() -> None:
    sent = sent_rounds(3, range(1, 31))
    replies = [answer(r * 100 + t, f"10.0.{t}.1") for r in range(3) for t in (1, 2)]
    trace = summarize(sent, replies, max_hops=30)
    assert trace["reached"] is False
    assert [h["hop"] for h in trace["hops"]] == [1, 2, 3]
    silent = trace["hops"][2]
    assert (silent["address"], silent["addresses"], silent["sent"]) == (None, [], 3)
    assert (silent["received"], silent["loss"], silent["rtt_avg"]) == (0, 1.0, None)
    assert trace["last_hop"] == 2
    assert trace["loss_from"] == 3


def test_a_router_that_rate_limits_its_answers_is_not_where_loss_starts() -> None:
    sent = sent_rounds(4, range(1, 4))
    replies = [answer(r * 100 + 1, "10.0.0.1") for r in range(4)]
    replies += [answer(100 + 2, "10.0.1.1")]  # hop 2 answers 1 of 4: ICMP rate limit
    replies += [answer(r * 100 + 3, "10.0.2.2", Answer.REACHED) for r in range(4)]
    trace = summarize(sent, replies, max_hops=30)
    assert trace["hops"][1]["loss"] == pytest.approx(0.75)
    assert trace["loss_from"] is None


def test_loss_that_lasts_to_the_destination_starts_at_its_first_hop() -> None:
    sent = sent_rounds(4, range(1, 5))
    replies = [answer(r * 100 + 1, "10.0.0.1") for r in range(4)]
    replies += [answer(r * 100 + 2, "10.0.1.1") for r in (0, 1)]
    replies += [answer(r * 100 + 3, "10.0.2.1") for r in (0, 2)]
    replies += [answer(r * 100 + 4, "10.0.3.3", Answer.REACHED) for r in (1,)]
    trace = summarize(sent, replies, max_hops=30)
    assert [h["loss"] for h in trace["hops"]] == [0.0, 0.5, 0.5, 0.75]
    assert trace["loss_from"] == 2
    assert trace["last_hop"] == 4


def test_a_router_reporting_unreachable_ends_the_trace() -> None:
    sent = sent_rounds(2, range(1, 31))
    replies = [answer(r * 100 + 1, "10.0.0.1") for r in range(2)]
    replies += [answer(r * 100 + 2, "10.0.1.1", Answer.UNREACHABLE) for r in range(2)]
    trace = summarize(sent, replies, max_hops=30)
    assert trace["reached"] is False
    assert len(trace["hops"]) == 2
    assert trace["hops"][1]["unreachable"] is True
    assert trace["last_hop"] == 2


def test_duplicate_and_unknown_answers_are_ignored() -> None:
    sent = sent_rounds(1, range(1, 2))
    replies = [
        answer(1, "10.0.0.9", Answer.REACHED),
        answer(1, "10.0.0.9", Answer.REACHED),
        answer(77, "10.9.9.9", Answer.REACHED),
    ]
    trace = summarize(sent, replies, max_hops=30)
    assert trace["hops"][0]["received"] == 1
    assert trace["hops"][0]["addresses"] == ["10.0.0.9"]


def test_a_path_that_dies_breaks_at_its_first_silent_hop_whatever_rate_limits_before() -> None:
    sent = sent_rounds(4, range(1, 31))
    replies = [answer(r * 100 + 1, "10.0.0.1") for r in (0, 2)]  # rate-limited: 2 of 4
    replies += [answer(r * 100 + 2, "10.0.1.1") for r in (1, 3)]
    trace = summarize(sent, replies, max_hops=30)
    assert [h["loss"] for h in trace["hops"]] == [0.5, 0.5, 1.0]
    assert trace["loss_from"] == 3
    assert trace["last_hop"] == 2
    # Reached, the same partial losses are loss of the path from hop 1 on.
    assert loss_from(trace["hops"][:2], reached=True) == 1


def test_no_loss_at_the_end_means_no_loss_start() -> None:
    assert loss_from([{"hop": 1, "loss": 1.0}, {"hop": 2, "loss": 0.0}]) is None
    assert loss_from([{"hop": 1, "loss": 0.0}, {"hop": 2, "loss": 0.3}]) == 2
    assert loss_from([]) is None


def test_icmp_errors_are_matched_by_the_request_they_quote() -> None:
    ip = bytes([0x45]) + bytes(19)
    echo = struct.pack("!BBHHH", 8, 0, 0, 4242, 131)
    time_exceeded = ip + struct.pack("!BBHI", 11, 0, 0, 0) + ip + echo
    assert parse_icmp(time_exceeded, 4) == (4242, 131, Answer.HOP)
    reply = ip + struct.pack("!BBHHH", 0, 0, 0, 4242, 7)
    assert parse_icmp(reply, 4) == (4242, 7, Answer.REACHED)
    assert parse_icmp(ip + echo, 4) is None  # our own request, seen on loopback
    v6_unreach = (
        struct.pack("!BBHI", 1, 0, 0, 0) + bytes(40) + struct.pack("!BBHHH", 128, 0, 0, 9, 3)
    )
    assert parse_icmp(v6_unreach, 6) == (9, 3, Answer.UNREACHABLE)
    assert parse_icmp(b"\x45", 4) is None


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"host": ""}, "needs a host"),
        ({"host": "h", "rounds": 0}, "rounds must be 1-20"),
        ({"host": "h", "max_hops": 65}, "max_hops must be 1-64"),
        ({"host": "h", "protocol": "tcp"}, "protocol must be auto, icmp or udp"),
        ({"host": "h", "port": 80}, "port 80 out of range"),
    ],
)
def test_bad_parameters_are_refused(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        probes.create("path", **params)


# --- real traces to loopback ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [pytest.param("icmp", marks=needs_root), pytest.param("udp")])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_a_loopback_trace_reaches_the_host_in_one_hop(protocol: str, host: str) -> None:
    probe = PathProbe(host, rounds=3, spacing=0.05, protocol=protocol)  # type: ignore[arg-type]
    result = await probe.run(probe.budget(2.0))
    assert result.success, result.message
    assert result.type == "path"
    assert result.details["protocol"] == protocol
    assert result.details["reached"] is True
    [hop] = result.details["hops"]
    assert hop["hop"] == 1
    assert hop["address"] == host
    assert (hop["sent"], hop["received"], hop["loss"]) == (3, 3, 0.0)
    assert 0 < hop["rtt_min"] <= hop["rtt_avg"] <= hop["rtt_max"] < 1.0
    assert result.latency == hop["rtt_avg"]
    assert result.loss == 0.0
    assert result.details["last_hop"] == 1
    assert result.details["loss_from"] is None


async def test_an_unresolvable_host_is_a_dns_failure() -> None:
    probe = PathProbe("no-such-host.invalid", protocol="udp")
    result = await probe.run(2.0)
    assert not result.success
    assert result.error == "dns"


# --- the command ------------------------------------------------------------------------------


def netwatch(*args: str, as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "netwatch", *args]
    if as_nobody:
        assert SETPRIV is not None
        argv = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_probe_path_prints_a_hop_table() -> None:
    done = netwatch("probe", "path", "127.0.0.1", "--protocol", "udp")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "path 127.0.0.1 (127.0.0.1, udp, 3 rounds): reached"
    assert any(line.split("│")[1:4] == [" 1   ", " 127.0.0.1 ", " 0%   "] for line in lines), lines
    assert lines[-1] == "last responding hop 1; loss starts at hop - (none)"


def test_probe_path_json_carries_every_hop() -> None:
    done = netwatch("probe", "path", "::1", "--rounds", "2", "--protocol", "udp", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["success"] is True
    assert data["details"]["hops"][0]["address"] == "::1"
    assert data["details"]["hops"][0]["sent"] == 2


def test_probe_path_bad_rounds_is_a_usage_error() -> None:
    done = netwatch("probe", "path", "127.0.0.1", "--rounds", "0")
    assert done.returncode == 2
    assert done.stderr.strip() == "netwatch: error: path rounds must be 1-20, not 0"


@pytest.mark.skipif(not ROOT or SETPRIV is None, reason="needs root and setpriv to drop to nobody")
def test_without_privilege_icmp_fails_clearly_and_udp_still_traces() -> None:
    denied = netwatch("probe", "path", "127.0.0.1", "--protocol", "icmp", "--json", as_nobody=True)
    assert denied.returncode == 1
    data = json.loads(denied.stdout)
    assert data["error"] == ERROR_PERMISSION
    assert "CAP_NET_RAW" in data["message"]
    assert "Traceback" not in denied.stderr
    udp = netwatch("probe", "path", "127.0.0.1", "--json", as_nobody=True)  # auto: udp
    assert udp.returncode == 0, udp.stderr
    assert json.loads(udp.stdout)["details"]["protocol"] == "udp"
