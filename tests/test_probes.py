"""Probes against real loopback servers: every success path and every failure class."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from helpers.probe_servers import (
    closed_port,
    dns_server,
    full_backlog,
    http_server,
    resetting_server,
    server_context,
    silent_dns_server,
    silent_server,
    timed,
)

import probes
from netwatch.config import schema as cfg
from netwatch.monitor.runner import build_probe
from probes import ProbeResult
from probes._util import classify
from probes.dns import DnsProbe
from probes.http import HttpProbe, close_shared_sessions
from probes.icmp import IcmpProbe
from probes.tcp import TcpProbe
from probes.tls import TlsProbe

# A name the IDNA codec rejects (label over 63 octets): fails without any DNS traffic.
BAD_NAME = "x" * 70 + ".example"
# Time a probe may take beyond its timeout (event-loop turns, socket teardown).
SLACK = 0.3
PHASES = {"resolve", "connect", "tls", "processing", "transfer"}


def assert_failed(result: ProbeResult, error: str) -> None:
    assert not result.success, result
    assert result.error == error, result
    assert result.message
    assert result.loss == 1.0


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
async def http_url() -> AsyncIterator[str]:
    async with http_server() as url:
        yield url
    await close_shared_sessions()


@pytest.fixture
async def https_url(ca: trustme.CA) -> AsyncIterator[str]:
    async with http_server(server_context(ca)) as url:
        yield url
    await close_shared_sessions()


@pytest.fixture
async def http_sessions() -> AsyncIterator[None]:
    yield
    await close_shared_sessions()


# --- construction from config -------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        cfg.IcmpTarget(name="i", type="icmp", host="127.0.0.1", fallback_tcp_port=80),
        cfg.TcpTarget(name="t", type="tcp", host="127.0.0.1", port=80),
        cfg.HttpTarget(name="h", type="http", url="http://127.0.0.1/", headers={"X-A": "1"}),
        cfg.DnsTarget(name="d", type="dns", query="localhost", server="127.0.0.1:53"),
        cfg.TlsTarget(name="s", type="tls", host="localhost", verify=False),
        cfg.PathTarget(name="p", type="path", host="127.0.0.1", role="core", protocol="udp"),
    ],
)
def test_every_probe_is_built_from_its_config_fields(target: cfg.AnyTarget) -> None:
    probe = build_probe(target)
    assert probe.type == target.type
    assert probe.target


def test_errno_maps_to_error_class() -> None:
    assert classify(OSError(errno.ECONNREFUSED, "x"))[0] == probes.ERROR_REFUSED
    assert classify(OSError(errno.EHOSTUNREACH, "x"))[0] == probes.ERROR_UNREACHABLE
    assert classify(OSError(errno.ENETUNREACH, "x"))[0] == probes.ERROR_UNREACHABLE
    assert classify(OSError(errno.ECONNRESET, "x"))[0] == probes.ERROR_RESET
    assert classify(TimeoutError())[0] == probes.ERROR_TIMEOUT
    assert classify(RuntimeError("boom")) == (probes.ERROR_OTHER, "RuntimeError: boom")


# --- tcp ----------------------------------------------------------------------------------


async def test_tcp_connect_reports_connect_time() -> None:
    with silent_server() as port:
        result = await TcpProbe("127.0.0.1", port).run(timeout=1.0)
    assert result.success, result
    assert result.target == f"127.0.0.1:{port}"
    assert result.latency is not None
    assert 0 < result.latency < 1.0
    assert result.rtts == (result.latency,)
    assert result.loss == 0.0


async def test_tcp_resolves_names_and_reports_resolve_time() -> None:
    with silent_server() as port:
        result = await TcpProbe("localhost", port).run(timeout=1.0)
    # localhost may resolve to ::1 first, where nothing listens: either outcome is honest.
    assert result.success or result.error == probes.ERROR_REFUSED, result
    if result.success:
        assert result.details["resolve"] >= 0


async def test_tcp_closed_port_is_refused() -> None:
    with closed_port() as port:
        result = await TcpProbe("127.0.0.1", port).run(timeout=1.0)
    assert_failed(result, probes.ERROR_REFUSED)


async def test_tcp_dropped_syn_times_out_within_timeout() -> None:
    with full_backlog() as port:
        result, elapsed = await timed(TcpProbe("127.0.0.1", port).run(timeout=0.5))
    assert_failed(result, probes.ERROR_TIMEOUT)
    assert 0.45 < elapsed < 0.5 + SLACK


async def test_tcp_unresolvable_name_is_dns_error() -> None:
    result = await TcpProbe(BAD_NAME, 80).run(timeout=1.0)
    assert_failed(result, probes.ERROR_DNS)


async def test_tcp_ipv6_literal() -> None:
    with closed_port() as port:  # nothing listens on ::1 at this port either
        result = await TcpProbe("::1", port).run(timeout=1.0)
    assert result.target == f"[::1]:{port}"
    assert_failed(result, probes.ERROR_REFUSED)


# --- icmp ---------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP sockets need root")


@needs_root
async def test_icmp_privileged_ping_of_loopback() -> None:
    result = await IcmpProbe("127.0.0.1", count=3, spacing=0.05, privileged="yes").run(2.0)
    assert result.success, result
    assert len(result.rtts) == 3
    assert result.loss == 0.0
    details = result.details
    assert details["min"] <= details["avg"] <= details["max"] < 1.0
    assert details["jitter"] >= 0
    assert result.latency == pytest.approx(details["avg"])


@needs_root
async def test_icmp_auto_is_privileged_for_root() -> None:
    result = await IcmpProbe("::1", count=2, spacing=0.01).run(2.0)
    assert result.success, result
    assert len(result.rtts) == 2


@needs_root
async def test_icmp_stops_at_the_deadline_with_partial_results() -> None:
    probe = IcmpProbe("127.0.0.1", count=100, spacing=0.1, privileged="yes")
    result, elapsed = await timed(probe.run(timeout=0.5))
    assert elapsed < 0.5 + SLACK
    assert result.success, result
    assert 3 <= result.details["sent"] < 100
    assert result.loss == pytest.approx(1 - len(result.rtts) / result.details["sent"])


async def test_icmp_without_permission_explains_how_to_fix() -> None:
    # ping_group_range is closed on this host, so unprivileged ICMP is refused even to root.
    result = await IcmpProbe("127.0.0.1", privileged="no").run(1.0)
    assert_failed(result, probes.ERROR_PERMISSION)
    assert "CAP_NET_RAW" in result.message
    assert "fallback_tcp_port" in result.message


async def test_icmp_without_permission_falls_back_to_tcp() -> None:
    with silent_server() as port:
        probe = IcmpProbe("127.0.0.1", privileged="no", fallback_tcp_port=port)
        result = await probe.run(1.0)
    assert result.success, result
    assert result.type == "icmp"
    assert result.details["fallback"] == "tcp"
    assert result.loss == 0.0


async def test_icmp_fallback_reports_tcp_failure_class() -> None:
    with closed_port() as port:
        result = await IcmpProbe("127.0.0.1", privileged="no", fallback_tcp_port=port).run(1.0)
    assert_failed(result, probes.ERROR_REFUSED)
    assert result.details["fallback"] == "tcp"


async def test_icmp_unresolvable_name_is_dns_error() -> None:
    assert_failed(await IcmpProbe(BAD_NAME).run(1.0), probes.ERROR_DNS)


# --- http ---------------------------------------------------------------------------------


async def test_http_success_reports_status_bytes_and_phases(http_url: str) -> None:
    result = await HttpProbe(f"{http_url}/ok").run(timeout=2.0)
    assert result.success, result
    assert result.details == {"status": 200, "bytes": len("netwatch probe target ok\n")}
    assert set(result.phases) == PHASES
    assert result.phases["tls"] == 0.0
    assert result.phases["resolve"] == 0.0  # an IP literal is not resolved
    assert result.phases["connect"] > 0
    assert result.phases["processing"] > 0
    assert result.latency is not None
    assert sum(result.phases.values()) <= result.latency


async def test_http_resolves_names(http_url: str) -> None:
    url = http_url.replace("127.0.0.1", "localhost") + "/ok"
    result = await HttpProbe(url).run(timeout=2.0)
    assert result.success, result
    assert result.phases["resolve"] > 0


async def test_http_unexpected_status(http_url: str) -> None:
    result = await HttpProbe(f"{http_url}/missing").run(timeout=2.0)
    assert_failed(result, probes.ERROR_STATUS)
    assert result.details["status"] == 404
    assert "404" in result.message
    ok = await HttpProbe(f"{http_url}/missing", expect_status=(404,)).run(timeout=2.0)
    assert ok.success, ok


async def test_http_body_regex(http_url: str) -> None:
    match = await HttpProbe(f"{http_url}/ok", body_regex=r"target\s+ok").run(2.0)
    assert match.success, match
    miss = await HttpProbe(f"{http_url}/ok", body_regex=r"^error").run(2.0)
    assert_failed(miss, probes.ERROR_BODY)
    assert miss.details["status"] == 200


async def test_http_post_and_redirect(http_url: str) -> None:
    assert (await HttpProbe(f"{http_url}/ok", method="POST").run(2.0)).success
    result = await HttpProbe(f"{http_url}/redirect").run(2.0)
    assert result.success, result


@pytest.mark.usefixtures("http_sessions")
async def test_http_closed_port_is_refused() -> None:
    with closed_port() as port:
        result = await HttpProbe(f"http://127.0.0.1:{port}/").run(timeout=1.0)
    assert_failed(result, probes.ERROR_REFUSED)


@pytest.mark.usefixtures("http_sessions")
async def test_http_server_that_never_answers_times_out() -> None:
    with silent_server() as port:
        result, elapsed = await timed(HttpProbe(f"http://127.0.0.1:{port}/").run(timeout=0.5))
    assert_failed(result, probes.ERROR_TIMEOUT)
    assert elapsed < 0.5 + SLACK


@pytest.mark.usefixtures("http_sessions")
async def test_http_connection_reset_before_response() -> None:
    async with resetting_server() as port:
        result = await HttpProbe(f"http://127.0.0.1:{port}/").run(timeout=1.0)
    assert_failed(result, probes.ERROR_RESET)


async def test_https_phases_separate_connect_and_tls(https_url: str, ca_file: str) -> None:
    result = await HttpProbe(f"{https_url}/ok", ca_file=ca_file).run(timeout=2.0)
    assert result.success, result
    assert result.phases["connect"] > 0
    assert result.phases["tls"] > 0
    # A loopback TCP handshake is far cheaper than a TLS handshake: proves the split.
    assert result.phases["connect"] < result.phases["tls"]


async def test_https_untrusted_certificate_is_tls_error(https_url: str) -> None:
    result = await HttpProbe(f"{https_url}/ok").run(timeout=2.0)
    assert_failed(result, probes.ERROR_TLS)
    assert "certificate" in result.message


async def test_https_without_verification(https_url: str) -> None:
    result = await HttpProbe(f"{https_url}/ok", verify_tls=False).run(timeout=2.0)
    assert result.success, result
    assert result.phases["tls"] > 0


# --- dns ----------------------------------------------------------------------------------

ZONE = {"popdb.example": ["192.0.2.10", "192.0.2.11"]}


async def test_dns_answer_from_server() -> None:
    async with dns_server(ZONE) as server:
        result = await DnsProbe("popdb.example", server=server).run(timeout=2.0)
    assert result.success, result
    assert result.details["addresses"] == ["192.0.2.10", "192.0.2.11"]
    assert result.details["ttl"] == 60
    assert result.latency is not None
    assert result.latency > 0


async def test_dns_expected_answer() -> None:
    async with dns_server(ZONE) as server:
        ok = await DnsProbe("popdb.example", server=server, expect=("192.0.2.11",)).run(2.0)
        bad = await DnsProbe("popdb.example", server=server, expect=("192.0.2.99",)).run(2.0)
    assert ok.success, ok
    assert_failed(bad, probes.ERROR_MISMATCH)
    assert "192.0.2.99" in bad.message


async def test_dns_nxdomain() -> None:
    async with dns_server(ZONE) as server:
        result = await DnsProbe("missing.example", server=server).run(timeout=2.0)
    assert_failed(result, probes.ERROR_DNS)
    assert "NXDOMAIN" in result.message


async def test_dns_no_record_of_the_type() -> None:
    async with dns_server(ZONE) as server:
        result = await DnsProbe("popdb.example", record="AAAA", server=server).run(2.0)
    assert_failed(result, probes.ERROR_DNS)


async def test_dns_silent_server_times_out_within_timeout() -> None:
    with silent_dns_server() as server:
        result, elapsed = await timed(DnsProbe("popdb.example", server=server).run(0.5))
    assert_failed(result, probes.ERROR_TIMEOUT)
    assert elapsed < 0.5 + SLACK


async def test_dns_system_resolver_resolves_localhost() -> None:
    result = await DnsProbe("localhost").run(timeout=2.0)
    assert result.success, result
    assert "127.0.0.1" in result.details["addresses"]


def test_dns_server_must_be_an_address() -> None:
    with pytest.raises(ValueError, match="IP address"):
        DnsProbe("x.example", server="dns.example")
    assert DnsProbe("x.example", server="[::1]:5353").server == "[::1]:5353"


# --- tls ----------------------------------------------------------------------------------


async def test_tls_verified_handshake_reports_certificate(https_url: str, ca_file: str) -> None:
    port = int(https_url.rsplit(":", 1)[1])
    result = await TlsProbe("127.0.0.1", port, ca_file=ca_file).run(timeout=2.0)
    assert result.success, result
    assert result.phases["connect"] > 0
    assert result.phases["tls"] > 0
    details = result.details
    assert details["days_to_expiry"] > 300  # trustme certificates last for centuries
    assert "trustme" in details["issuer"]
    assert details["subject"]
    assert details["version"].startswith("TLS")


async def test_tls_untrusted_certificate_is_tls_error(https_url: str) -> None:
    port = int(https_url.rsplit(":", 1)[1])
    result = await TlsProbe("127.0.0.1", port).run(timeout=2.0)
    assert_failed(result, probes.ERROR_TLS)


async def test_tls_wrong_name_is_tls_error(https_url: str, ca_file: str) -> None:
    port = int(https_url.rsplit(":", 1)[1])
    probe = TlsProbe("127.0.0.1", port, server_name="popdb.example", ca_file=ca_file)
    assert_failed(await probe.run(timeout=2.0), probes.ERROR_TLS)


@pytest.mark.usefixtures("http_sessions")
async def test_tls_days_to_expiry(ca: trustme.CA) -> None:
    not_after = dt.datetime.now(dt.UTC) + dt.timedelta(days=10)
    async with http_server(server_context(ca, not_after=not_after)) as url:
        port = int(url.rsplit(":", 1)[1])
        result = await TlsProbe("127.0.0.1", port, verify=False).run(timeout=2.0)
    assert result.success, result
    assert result.details["days_to_expiry"] == pytest.approx(10, abs=0.01)


async def test_tls_server_that_never_answers_times_out() -> None:
    with silent_server() as port:
        result, elapsed = await timed(TlsProbe("127.0.0.1", port).run(timeout=0.5))
    assert_failed(result, probes.ERROR_TIMEOUT)
    assert elapsed < 0.5 + SLACK


async def test_tls_closed_port_is_refused() -> None:
    with closed_port() as port:
        assert_failed(await TlsProbe("127.0.0.1", port).run(1.0), probes.ERROR_REFUSED)


async def test_dns_closed_port_is_refused() -> None:
    with silent_dns_server() as server:
        pass  # closed again: the kernel answers queries to it with port unreachable
    result = await DnsProbe("popdb.example", server=server).run(timeout=2.0)
    assert_failed(result, probes.ERROR_REFUSED)


@pytest.mark.skipif(os.geteuid() != 0, reason="raw ICMP sockets need root")
def test_a_raw_icmp_socket_only_gets_its_own_probes_messages() -> None:
    """Each probe's raw socket is filtered on its echo identifier, so with many probes in
    flight a reply wakes only the probe it answers."""
    import struct

    import icmplib

    from probes.icmp import _only_replies_to

    mine, other = icmplib.ICMPv4Socket(None, True), icmplib.ICMPv4Socket(None, True)
    try:
        _only_replies_to(mine, 4242)
        other.send(icmplib.ICMPRequest("127.0.0.1", id=1111, sequence=1))
        mine.send(icmplib.ICMPRequest("127.0.0.1", id=4242, sequence=1))

        def received(sock: icmplib.ICMPv4Socket) -> set[int]:
            ids: set[int] = set()
            sock._sock.settimeout(0.5)
            with contextlib.suppress(TimeoutError):
                while True:
                    packet = sock._sock.recv(2048)
                    header = (packet[0] & 0xF) * 4
                    ids.add(struct.unpack("!H", packet[header + 4 : header + 6])[0])
            return ids

        assert received(mine) == {4242}
        assert {1111, 4242} <= received(other)  # an unfiltered raw socket sees them all
    finally:
        mine.close()
        other.close()
