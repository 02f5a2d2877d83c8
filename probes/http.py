"""HTTP(S) probe: status, body match and blackbox-style phase timings.

Plain asyncio and httptools (``probes._http1``), no HTTP client library: aiohttp cost the
daemon about 12 MB of imports for what a probe needs. Every probe resolves the name
afresh and opens a fresh TCP (and TLS) connection, sends ``Connection: close`` and drops
the connection once the response is read. Redirects (301, 302, 303, 307, 308) are followed
as aiohttp did: up to 9, the 10th is "too many redirects"; 303 (except for HEAD) and
301/302 after a POST continue as GET; Authorization, Cookie and Proxy-Authorization are
dropped when the origin changes.

Request headers: ``Host`` (with the port when not the scheme's default), ``User-Agent:
netwatch-probe/0.1``, ``Accept: */*``, ``Accept-Encoding: identity`` (the body is never
decompressed, so a body regex sees what the server sent; ask for a compressed body with
a header and it is matched compressed), ``Connection: close``; the configured headers
replace or add to these. The body is counted; it is kept only when a body regex is set,
and then only its first MiB (``_http1.MAX_KEPT``) is matched, decoded with the response's
charset (utf-8 when none or unknown, undecodable bytes replaced).

Phases (seconds, last hop when redirects are followed):

- ``resolve``: the system resolver (``getaddrinfo``); 0 for an IP literal.
- ``connect``: TCP handshake (a non-blocking connect, timed to its completion).
- ``tls``: TLS handshake; 0 for plain http.
- ``processing``: request fully sent until the response headers are parsed.
- ``transfer``: response headers until the body is read.
"""

from __future__ import annotations

import asyncio
import functools
import re
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urljoin, urlsplit

from probes import (
    ERROR_BODY,
    ERROR_OTHER,
    ERROR_RESET,
    ERROR_STATUS,
    ProbeResult,
)
from probes._http1 import BadResponse, BodyCut, Exchange, NoResponse
from probes._util import Address, classify, connect, failure, literal_address, resolve, success

USER_AGENT = "netwatch-probe/0.1"
MAX_REDIRECTS = 10  # as aiohttp counted: the 10th redirect is an error
REDIRECTS = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Characters left as they are in a request target; others (spaces, non-ASCII) are escaped.
_TARGET_SAFE = "!#$%&'()*+,/:;=?@[]~"
_CROSS_ORIGIN_DROPPED = frozenset({"authorization", "cookie", "proxy-authorization"})

Method = Literal["GET", "HEAD", "POST"]


class InvalidURL(ValueError):
    """A URL (or a redirect's Location) the probe cannot request."""


class TooManyRedirects(Exception):
    """Redirected ``MAX_REDIRECTS`` times."""


@dataclass(frozen=True, slots=True)
class _Url:
    """One parsed http(s) URL: where to connect and what to ask for."""

    text: str
    tls: bool
    host: str  # bare (no brackets): what is resolved, and the TLS server name
    port: int
    host_header: str
    target: str  # the request target: path and query
    address: Address | None  # an IP literal's socket address, parsed once

    @property
    def origin(self) -> tuple[bool, str, int]:
        return self.tls, self.host.lower(), self.port


def _parse(url: str) -> _Url:
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
        if parts.scheme not in _DEFAULT_PORTS or not host:
            raise InvalidURL(url)
        default = _DEFAULT_PORTS[parts.scheme]
        name = f"[{host}]" if ":" in host else host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError):
        raise InvalidURL(url) from None
    port = port or default
    target = quote(parts.path or "/", safe=_TARGET_SAFE)
    if parts.query:
        target += "?" + quote(parts.query, safe=_TARGET_SAFE)
    return _Url(
        text=url,
        tls=parts.scheme == "https",
        host=host,
        port=port,
        host_header=name if port == default else f"{name}:{port}",
        target=target,
        address=literal_address(host, port),
    )


def _request_head(method: str, url: _Url, headers: Mapping[str, str]) -> bytes:
    fields = {
        "host": ("Host", url.host_header),
        "user-agent": ("User-Agent", USER_AGENT),
        "accept": ("Accept", "*/*"),
        "accept-encoding": ("Accept-Encoding", "identity"),
        "connection": ("Connection", "close"),
    }
    if method == "POST":
        fields["content-length"] = ("Content-Length", "0")
    for name, value in headers.items():
        fields[name.lower()] = (name, value)
    lines = [f"{method} {url.target} HTTP/1.1", *(f"{n}: {v}" for n, v in fields.values())]
    head = "\r\n".join(lines) + "\r\n\r\n"
    if head.count("\n") != len(lines) + 1 or head.count("\r") != len(lines) + 1:
        # A line break inside a name or value would smuggle another header in.
        raise ValueError("line break in a request header")
    return head.encode("utf-8")


@functools.cache
def _default_context() -> ssl.SSLContext:
    """The system's trust store, loaded once per process (and only by an https probe)."""
    return ssl.create_default_context()


@functools.cache
def _unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def close_shared_sessions() -> None:
    """Nothing to close: a probe shares no connection or session with another. Kept so
    that shutdown code written for the session-based probe still runs."""


def _classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, NoResponse):
        return ERROR_RESET, "server closed the connection without a response"
    if isinstance(exc, BodyCut):
        return ERROR_RESET, f"response body cut short: {exc}"
    if isinstance(exc, BadResponse):
        return ERROR_OTHER, str(exc)
    if isinstance(exc, TooManyRedirects):
        return ERROR_OTHER, "too many redirects"
    if isinstance(exc, InvalidURL):
        return ERROR_OTHER, f"invalid URL: {exc}"
    return classify(exc)


def _decode(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


@dataclass(slots=True)
class _Hop:
    """One request of a probe (the last one's timings are the probe's phases)."""

    exchange: Exchange
    resolve: float = 0.0
    connect: float = 0.0
    tls: float = 0.0
    sent: float = 0.0

    def phases(self) -> dict[str, float]:
        exchange = self.exchange
        return {
            "resolve": self.resolve,
            "connect": self.connect,
            "tls": self.tls,
            "processing": max(exchange.headers_at - self.sent, 0.0),
            "transfer": max(exchange.body_at - exchange.headers_at, 0.0),
        }


class HttpProbe:
    """Request ``url`` over a fresh connection and check the status and (optionally) body."""

    type = "http"

    def __init__(
        self,
        url: str,
        *,
        method: Method = "GET",
        expect_status: Iterable[int] = (200,),
        body_regex: str | None = None,
        verify_tls: bool = True,
        headers: Mapping[str, str] | None = None,
        ca_file: str | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"http probe url must start with http:// or https://, not {url!r}")
        self.url = url
        self.method = method
        self.expect_status = frozenset(expect_status)
        self.body_regex = body_regex
        self.verify_tls = verify_tls
        self.headers = dict(headers or {})
        self._pattern = re.compile(body_regex) if body_regex is not None else None
        try:  # parsed once (an IP literal's address with it); a bad URL fails each run
            self._parsed: _Url | None = _parse(url)
        except InvalidURL:
            self._parsed = None
        # Built once: loading a CA file costs milliseconds.
        self._ca_context = (
            ssl.create_default_context(cafile=ca_file)
            if verify_tls and ca_file is not None
            else None
        )

    @property
    def target(self) -> str:
        return self.url

    async def run(self, timeout: float) -> ProbeResult:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                hop = await self._follow()
        except Exception as exc:  # every failure is a result, never an exception
            error, message = _classify(exc)
            return failure(self.type, self.url, error, message)
        response = hop.exchange
        latency = response.body_at - start
        phases = hop.phases()
        status = response.status
        details: dict[str, Any] = {"status": status, "bytes": response.size}
        if status not in self.expect_status:
            expected = ", ".join(str(s) for s in sorted(self.expect_status))
            message = f"status {status}, expected {expected}"
            return failure(
                self.type,
                self.url,
                ERROR_STATUS,
                message,
                latency=latency,
                phases=phases,
                details=details,
            )
        if self._pattern is not None:
            text = _decode(response.kept(), response.charset)
            if not self._pattern.search(text):
                message = f"body does not match {self.body_regex!r}"
                return failure(
                    self.type,
                    self.url,
                    ERROR_BODY,
                    message,
                    latency=latency,
                    phases=phases,
                    details=details,
                )
        return success(self.type, self.url, latency, phases=phases, details=details)

    async def _follow(self) -> _Hop:
        """Request the URL, following redirects; the last hop, its body read."""
        url = self._parsed or _parse(self.url)
        method: str = self.method
        headers = self.headers
        redirects = 0
        while True:
            hop = await self._exchange(method, url, headers)
            response = hop.exchange
            try:
                await response.head()
                status, location = response.status, response.location
                if status in REDIRECTS:
                    redirects += 1
                    if redirects >= MAX_REDIRECTS:
                        raise TooManyRedirects
                if status not in REDIRECTS or location is None:
                    await response.body()
                    return hop
            finally:
                response.close()
            if (status == 303 and method != "HEAD") or (status in {301, 302} and method == "POST"):
                method = "GET"
            following = _parse(urljoin(url.text, location).partition("#")[0])
            if following.origin != url.origin:
                headers = {
                    name: value
                    for name, value in headers.items()
                    if name.lower() not in _CROSS_ORIGIN_DROPPED
                }
            url = following

    async def _exchange(self, method: str, url: _Url, headers: Mapping[str, str]) -> _Hop:
        """Connect (resolving the name first) and send the request."""
        head = _request_head(method, url, headers)
        hop = _Hop(Exchange(head_only=method == "HEAD", keep_body=self._pattern is not None))
        address = url.address
        if address is None:
            started = time.perf_counter()
            address = await resolve(url.host, url.port)
            hop.resolve = time.perf_counter() - started
        started = time.perf_counter()
        sock = await connect(address)
        connected = time.perf_counter()
        hop.connect = connected - started
        context = self._context() if url.tls else None
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(
                lambda: hop.exchange,
                sock=sock,
                ssl=context,
                server_hostname=url.host if context is not None else None,
            )
        except BaseException:
            sock.close()
            raise
        if context is not None:
            hop.tls = time.perf_counter() - connected
        transport.write(head)
        hop.sent = time.perf_counter()
        return hop

    def _context(self) -> ssl.SSLContext:
        if not self.verify_tls:
            return _unverified_context()
        return self._ca_context or _default_context()
