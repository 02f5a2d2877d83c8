"""Probes against real loopback servers: every success path and every failure class."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import socket
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
    scripted_http_server,
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


# The http probe's own HTTP/1.1 client: framing, redirects and failures a server can cause.

OK_HEAD = b"HTTP/1.1 200 OK\r\n"
EMPTY_OK = OK_HEAD + b"Content-Length: 0\r\n\r\n"


def redirect(status: int, location: str) -> bytes:
    return b"HTTP/1.1 %d Redirect\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % (
        status,
        location.encode(),
    )


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


async def test_http_reads_a_chunked_body_and_decodes_its_charset() -> None:
    body = "café ok".encode("latin-1")
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:3], body[3:]))
    answer = (
        OK_HEAD
        + b"Content-Type: text/plain; charset=latin-1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked
        + b"0\r\n\r\n"
    )
    async with scripted_http_server({"/": answer}, hold=frozenset({"/"})) as server:
        result = await HttpProbe(f"{server.url}/", body_regex="café ok$").run(timeout=2.0)
    assert result.success, result
    assert result.details == {"status": 200, "bytes": len(body)}


async def test_http_reads_a_body_delimited_by_the_close() -> None:
    answer = OK_HEAD + b"Connection: close\r\n\r\n" + b"x" * 100_000 + b"until close"
    async with scripted_http_server({"/": answer}) as server:
        result = await HttpProbe(f"{server.url}/", body_regex="until close$").run(timeout=2.0)
    assert result.success, result
    assert result.details["bytes"] == 100_000 + len("until close")
    assert result.phases["transfer"] > 0


async def test_http_head_and_204_answers_end_with_their_head() -> None:
    # The server keeps the connections open: only the head can end these answers.
    answers = {
        "/head": OK_HEAD + b"Content-Length: 50\r\n\r\n",
        "/empty": b"HTTP/1.1 204 No Content\r\n\r\n",
    }
    async with scripted_http_server(answers, hold=frozenset(answers)) as server:
        head = await HttpProbe(f"{server.url}/head", method="HEAD").run(timeout=2.0)
        empty = await HttpProbe(f"{server.url}/empty", expect_status=(204,)).run(timeout=2.0)
    assert head.success, head
    assert head.details == {"status": 200, "bytes": 0}
    assert empty.success, empty


async def test_http_keeps_only_the_first_mib_for_the_regex() -> None:
    size = 2 * 1024 * 1024
    answer = OK_HEAD + b"Content-Length: %d\r\n\r\nstart" % size + b"x" * (size - 8) + b"end"
    async with scripted_http_server({"/": answer}) as server:
        start = await HttpProbe(f"{server.url}/", body_regex="^start").run(timeout=5.0)
        end = await HttpProbe(f"{server.url}/", body_regex="end$").run(timeout=5.0)
    assert start.success, start
    assert start.details["bytes"] == size
    assert_failed(end, probes.ERROR_BODY)


async def test_http_follows_relative_and_absolute_redirects() -> None:
    answers = {
        "/a": redirect(302, "b?x=1"),
        "/b?x=1": redirect(301, "{base}/c"),
        "/c": OK_HEAD + b"Content-Length: 4\r\n\r\nlast",
    }
    async with scripted_http_server(answers) as server:
        result = await HttpProbe(f"{server.url}/a", body_regex="^last$").run(timeout=2.0)
    assert result.success, result
    assert result.details == {"status": 200, "bytes": 4}
    assert [r.split("\r\n", 1)[0] for r in server.requests] == [
        "GET /a HTTP/1.1",
        "GET /b?x=1 HTTP/1.1",
        "GET /c HTTP/1.1",
    ]


async def test_http_post_becomes_get_after_303_but_not_after_307() -> None:
    answers = {
        "/see-other": redirect(303, "/done"),
        "/temporary": redirect(307, "/done"),
        "/done": EMPTY_OK,
    }
    async with scripted_http_server(answers) as server:
        for path in ("/see-other", "/temporary"):
            result = await HttpProbe(f"{server.url}{path}", method="POST").run(timeout=2.0)
            assert result.success, result
    assert [r.split(" ", 2)[:2] for r in server.requests] == [
        ["POST", "/see-other"],
        ["GET", "/done"],
        ["POST", "/temporary"],
        ["POST", "/done"],
    ]


async def test_http_drops_credentials_on_a_redirect_to_another_origin() -> None:
    auth = {"Authorization": "Bearer secret", "X-Kept": "1"}
    async with (
        scripted_http_server({"/": EMPTY_OK}) as other,
        scripted_http_server({"/": redirect(302, f"{other.url}/")}) as first,
    ):
        result = await HttpProbe(f"{first.url}/", headers=auth).run(timeout=2.0)
    assert result.success, result
    assert "Authorization: Bearer secret" in first.requests[0]
    assert "Authorization" not in other.requests[0]
    assert "X-Kept: 1" in other.requests[0]


async def test_http_redirect_loop_is_too_many_redirects() -> None:
    async with scripted_http_server({"/loop": redirect(302, "/loop")}) as server:
        result = await HttpProbe(f"{server.url}/loop").run(timeout=2.0)
    assert_failed(result, probes.ERROR_OTHER)
    assert result.message == "too many redirects"
    assert len(server.requests) == 10  # as aiohttp counted: the 10th redirect is the error


async def test_http_body_cut_short_is_a_reset() -> None:
    answers = {
        "/length": OK_HEAD + b"Content-Length: 100\r\n\r\nonly ten..",
        "/chunks": OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    }
    async with scripted_http_server(answers) as server:
        for path in answers:
            result = await HttpProbe(f"{server.url}{path}").run(timeout=2.0)
            assert_failed(result, probes.ERROR_RESET)
            assert result.message.startswith("response body cut short"), result


async def test_http_close_without_an_answer_is_a_reset() -> None:
    async with scripted_http_server({"/": b""}) as server:
        result = await HttpProbe(f"{server.url}/").run(timeout=2.0)
    assert_failed(result, probes.ERROR_RESET)
    assert result.message == "server closed the connection without a response"


async def test_http_garbage_answer_is_an_error_not_a_success() -> None:
    async with scripted_http_server({"/": b"SSH-2.0-OpenSSH_9.6\r\n\r\n"}) as server:
        result = await HttpProbe(f"{server.url}/").run(timeout=2.0)
    assert_failed(result, probes.ERROR_OTHER)
    assert "malformed response" in result.message


async def test_http_request_headers_and_their_override() -> None:
    async with scripted_http_server({"/": EMPTY_OK}) as server:
        assert (await HttpProbe(f"{server.url}/").run(timeout=2.0)).success
        custom = {"user-agent": "custom/1", "X-Extra": "yes"}
        assert (await HttpProbe(f"{server.url}/", headers=custom).run(timeout=2.0)).success
    default, overridden = (r.lower() for r in server.requests)
    port = server.url.rsplit(":", 1)[1]
    assert f"host: 127.0.0.1:{port}\r\n" in default
    assert "user-agent: netwatch-probe/0.1\r\n" in default
    assert "accept-encoding: identity\r\n" in default
    assert overridden.count("user-agent:") == 1
    assert "user-agent: custom/1\r\n" in overridden
    assert "x-extra: yes\r\n" in overridden


async def test_http_invalid_url_is_a_result() -> None:
    result = await HttpProbe("http://:80/").run(timeout=1.0)
    assert_failed(result, probes.ERROR_OTHER)
    assert result.message.startswith("invalid URL")


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_http_ipv6_literal() -> None:
    answer = OK_HEAD + b"Content-Length: 2\r\n\r\nok"
    async with scripted_http_server({"/": answer}, host="::1") as server:
        result = await HttpProbe(f"{server.url}/").run(timeout=2.0)
    assert result.success, result
    assert result.phases["resolve"] == 0.0
    port = server.url.rsplit(":", 1)[1]
    assert f"Host: [::1]:{port}\r\n" in server.requests[0]


async def test_https_with_another_ca_is_a_certificate_failure(
    https_url: str, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    result = await HttpProbe(f"{https_url}/ok", ca_file=str(other)).run(timeout=2.0)
    assert_failed(result, probes.ERROR_TLS)
    assert result.message.startswith("certificate verification failed"), result


async def test_https_by_name_checks_the_name_and_reads_the_body(
    https_url: str, ca_file: str
) -> None:
    url = https_url.replace("127.0.0.1", "localhost") + "/ok"
    result = await HttpProbe(url, ca_file=ca_file, body_regex="target ok").run(timeout=2.0)
    assert result.success, result
    assert result.phases["resolve"] > 0
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
