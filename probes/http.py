"""HTTP(S) probe: status, body match and blackbox-style phase timings.

Every probe opens a fresh connection (so connect and TLS are measured each time), but
through one ``aiohttp.ClientSession`` per event loop: building a session and connector
per probe costs more CPU than the probe itself at benchmark rates. Call
``close_shared_sessions()`` before the loop ends.

Phases (seconds, last hop when redirects are followed):

- ``resolve``: DNS (aiohttp's resolvehost trace events); 0 for an IP literal.
- ``connect``: TCP handshake. aiohttp reports only "connection created", which spans
  TCP and TLS together, so the socket it connects is our own subclass that notes the
  moment the kernel reports the connect complete (the ``SO_ERROR`` check asyncio makes
  after a non-blocking connect). This is exact to within one event-loop turn.
- ``tls``: connection created minus connect end; 0 for plain http.
- ``processing``: request fully sent until the response headers are parsed.
- ``transfer``: response headers until the body is read.
"""

from __future__ import annotations

import asyncio
import contextvars
import re
import socket
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from aiohappyeyeballs import AddrInfoType

from probes import (
    ERROR_BODY,
    ERROR_OTHER,
    ERROR_RESET,
    ERROR_STATUS,
    ProbeResult,
)
from probes._util import classify, failure, success

USER_AGENT = "netwatch-probe/0.1"

Method = Literal["GET", "HEAD", "POST"]


@dataclass(slots=True)
class _Timings:
    """Timestamps (perf_counter) of one request, filled by trace hooks and the socket."""

    start: float = 0.0
    dns_start: float = 0.0
    dns_end: float = 0.0
    create_start: float = 0.0
    create_end: float = 0.0
    connect_end: float = 0.0
    sent: float = 0.0
    headers: float = 0.0
    body: float = 0.0

    def phases(self, tls: bool) -> dict[str, float]:
        resolve = self.dns_end - self.dns_start if self.dns_end else 0.0
        connect_start = self.dns_end or self.create_start
        connect_end = self.connect_end or self.create_end
        return {
            "resolve": resolve,
            "connect": max(connect_end - connect_start, 0.0),
            "tls": max(self.create_end - connect_end, 0.0) if tls else 0.0,
            "processing": max(self.headers - (self.sent or self.create_end), 0.0),
            "transfer": max(self.body - self.headers, 0.0),
        }


# The socket factory runs inside aiohttp's connect, in the probing task, so a context
# variable hands it the timings of the request that is connecting.
_CURRENT: contextvars.ContextVar[_Timings | None] = contextvars.ContextVar(
    "netwatch_http_timings", default=None
)


class _TimedSocket(socket.socket):
    """A socket that records when its non-blocking connect completed."""

    __slots__ = ("_timings",)

    def __init__(self, family: int, type: int, proto: int, timings: _Timings) -> None:
        super().__init__(family, type, proto)
        self._timings = timings

    def connect(self, address: Any) -> None:
        super().connect(address)
        # Reached only when the connect completed at once (no EINPROGRESS).
        self._timings.connect_end = time.perf_counter()

    # typeshed overloads getsockopt by arity; one pass-through covers both.
    def getsockopt(self, *args: Any) -> Any:
        value = super().getsockopt(*args)
        if args[:2] == (socket.SOL_SOCKET, socket.SO_ERROR) and value == 0:
            self._timings.connect_end = time.perf_counter()
        return value


def _socket_factory(addr_info: AddrInfoType) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    timings = _CURRENT.get()
    if timings is None:
        return socket.socket(family, type_, proto)
    return _TimedSocket(family, type_, proto, timings)


def _hook(field: str) -> Any:
    async def record(session: aiohttp.ClientSession, ctx: Any, params: Any) -> None:
        timings = ctx.trace_request_ctx
        if isinstance(timings, _Timings):
            setattr(timings, field, time.perf_counter())

    return record


def _trace_config() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_dns_resolvehost_start.append(_hook("dns_start"))
    trace.on_dns_resolvehost_end.append(_hook("dns_end"))
    trace.on_connection_create_start.append(_hook("create_start"))
    trace.on_connection_create_end.append(_hook("create_end"))
    trace.on_request_headers_sent.append(_hook("sent"))
    trace.on_request_chunk_sent.append(_hook("sent"))
    trace.on_request_end.append(_hook("headers"))
    return trace


_SESSIONS: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


def _shared_session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = _SESSIONS.get(loop)
    if session is None or session.closed:
        for stale in [lp for lp in _SESSIONS if lp.is_closed()]:
            del _SESSIONS[stale]
        connector = aiohttp.TCPConnector(
            force_close=True,  # a fresh TCP (and TLS) connection per probe
            use_dns_cache=False,  # and a fresh name resolution
            limit=0,  # probes are already bounded by the scheduler's concurrency
            socket_factory=_socket_factory,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            trace_configs=[_trace_config()],
            timeout=aiohttp.ClientTimeout(total=None),  # run() owns the deadline
            cookie_jar=aiohttp.DummyCookieJar(),  # probes of unrelated targets share nothing
            headers={"User-Agent": USER_AGENT},
        )
        _SESSIONS[loop] = session
    return session


async def close_shared_sessions() -> None:
    """Close the shared session of the running loop (call on shutdown and in tests)."""
    session = _SESSIONS.pop(asyncio.get_running_loop(), None)
    if session is not None:
        await session.close()


def _classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, aiohttp.ClientConnectorError):
        # Wraps the OSError / gaierror / ssl error of the connect, which say what broke.
        return classify(exc.os_error)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return ERROR_RESET, "server closed the connection without a response"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return ERROR_RESET, f"response body cut short: {exc}"
    if isinstance(exc, aiohttp.TooManyRedirects):
        return ERROR_OTHER, "too many redirects"
    if isinstance(exc, aiohttp.InvalidURL):
        return ERROR_OTHER, f"invalid URL: {exc}"
    return classify(exc)


def _decode(body: bytes, charset: str | None) -> str:
    try:
        return body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        return body.decode("utf-8", errors="replace")


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
        self._tls = url.startswith("https://")
        self._ssl: ssl.SSLContext | bool = True
        if not verify_tls:
            self._ssl = False
        elif ca_file is not None:
            self._ssl = ssl.create_default_context(cafile=ca_file)

    @property
    def target(self) -> str:
        return self.url

    async def run(self, timeout: float) -> ProbeResult:
        timings = _Timings(start=time.perf_counter())
        token = _CURRENT.set(timings)
        try:
            async with asyncio.timeout(timeout):
                status, size, text = await self._request(timings)
        except Exception as exc:  # every failure is a result, never an exception
            error, message = _classify(exc)
            return failure(self.type, self.url, error, message)
        finally:
            _CURRENT.reset(token)
        latency = timings.body - timings.start
        phases = timings.phases(self._tls)
        details: dict[str, Any] = {"status": status, "bytes": size}
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
        if self._pattern is not None and not self._pattern.search(text):
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

    async def _request(self, timings: _Timings) -> tuple[int, int, str]:
        session = _shared_session()
        async with session.request(
            self.method,
            self.url,
            headers=self.headers,
            ssl=self._ssl,
            trace_request_ctx=timings,
        ) as response:
            # Only keep the body when it will be matched; otherwise just count it.
            keep = self._pattern is not None
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_chunked(65536):
                size += len(chunk)
                if keep:
                    chunks.append(chunk)
            timings.body = time.perf_counter()
            text = ""
            if keep:
                text = _decode(b"".join(chunks), response.charset)
            return response.status, size, text
