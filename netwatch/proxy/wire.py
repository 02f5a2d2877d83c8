"""The fast front's wire format: which request heads it takes, and its response bytes.

The fast front (``front.py``) takes only *plain* requests; everything else goes, bytes
untouched, to the aiohttp app, whose parser and answers stay the single judge of odd input.
A plain request head:

- is printable ASCII with CRLF line ends: no bare LF or CR, no other control byte (a tab
  included), no obsolete line folding, no space before a line end;
- parses under httptools (llhttp, strict: the request line, header names and values,
  duplicate or malformed Content-Length, Content-Length with Transfer-Encoding);
- is HTTP/1.1 or 1.0, a method in ``FAST_METHODS``, an origin-form target whose path has
  no percent-escape, no dot segment and no empty segment (the decoded path is the raw one,
  as the replayable rules see it), no fragment, outside ``/_netwatch``;
- carries no Transfer-Encoding, Expect, Upgrade, Content-Encoding or Sec-WebSocket-Key1,
  no header name twice, at most ``MAX_FAST_HEADERS`` headers, a Host header in HTTP/1.1,
  and a Content-Length of at most ``max_fast_body`` bytes, if any.

A head that is not plain is *handed over*; so is one still incomplete past ``MAX_HEAD``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus

import httptools
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict

from netwatch.httpdate import http_date

__all__ = ["FAST_METHODS", "MAX_HEAD", "Head", "json_answer", "parse_head", "response_head"]

FAST_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# aiohttp's own limit for a request line or one header line is 8190 bytes; a plain head
# (every line within that) never needs more than this to be judged.
MAX_HEAD = 8190
HEAD_END = b"\r\n\r\n"
# A plain head's bytes: printable ASCII, CR and LF (every other byte is deleted by nothing).
_PLAIN_BYTES = bytes(range(0x20, 0x7F)) + b"\r\n"
# The first line of a plain request, once it is complete.
_REQUEST_LINE = re.compile(rb"[A-Z]{3,7} /[!-~]* HTTP/1\.[01]\r\n")
# In a plain target's path: a percent-escape, a dot segment, an empty segment, a fragment.
_NOT_PLAIN_PATH = re.compile(r"%|/\.|//|#")
# Headers the fast front leaves to aiohttp: framing, protocol switches, and what aiohttp's
# parser acts on (it decodes a request body's Content-Encoding, refuses Sec-WebSocket-Key1).
_HANDED_OVER = frozenset(
    {"transfer-encoding", "expect", "upgrade", "content-encoding", "sec-websocket-key1"}
)
# aiohttp refuses more than 128 headers; a plain head stays well below.
MAX_FAST_HEADERS = 100


def not_plain(data: bytes | bytearray) -> bool:
    """True when the bytes of a head (complete or not) cannot be a plain request. Checked
    on incomplete heads too, so that garbage is handed over (and refused by aiohttp) at
    once, not after the header timeout. Built of C-speed bytes operations: this runs on
    every request."""
    if data.translate(None, _PLAIN_BYTES):
        return True  # a control byte, or not ASCII
    crlf = data.count(b"\r\n")
    if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        return True  # a bare CR or LF
    if b"\n " in data or b" \r" in data:  # (a tab is not plain at all)
        return True  # obsolete line folding; whitespace before a line end
    line_end = data.find(b"\n")
    return line_end >= 0 and _REQUEST_LINE.fullmatch(data, 0, line_end + 1) is None


class HeadScan:
    """``not_plain`` for a head still arriving, byte by byte if need be, in linear time:
    each call looks only at the bytes that came since the last (and the one before them),
    so a head trickled in one byte at a time costs no more than one sent at once."""

    __slots__ = ("_first_line", "scanned")

    def __init__(self) -> None:
        self.scanned = 0  # bytes of the buffer already found plain
        self._first_line = False

    def reset(self) -> None:
        self.scanned = 0
        self._first_line = False

    def plain(self, buf: bytearray) -> bool:
        """False as soon as the incomplete head in ``buf`` cannot be plain."""
        start = self.scanned
        new = buf[start:]
        if new.translate(None, _PLAIN_BYTES):
            return False
        window = buf[start - 1 :] if start else new  # with the byte before, if any
        pairs = window.count(b"\r\n")  # each ends in the new bytes
        if new.count(b"\n") != pairs:
            return False  # a bare LF
        pending = window[:1] == b"\r" if start else False  # a CR whose follower is new
        crs = new.count(b"\r") - new.endswith(b"\r") + pending
        if crs != pairs or b"\n " in window or b" \r" in window:
            return False  # a bare CR; obsolete line folding; a space before a line end
        self.scanned = len(buf)
        if not self._first_line and (line_end := buf.find(b"\n")) >= 0:
            self._first_line = True
            return _REQUEST_LINE.fullmatch(buf, 0, line_end + 1) is not None
        return True


class Head:
    """One plain request head."""

    __slots__ = (
        "_names",
        "_url",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "minor",
        "path",
        "raw_query",
    )

    def __init__(self) -> None:
        self._url = b""
        self._names: list[tuple[bytes, bytes]] = []
        self.method = ""
        self.path = ""
        self.raw_query = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None  # as announced; None: no header
        self.keep_alive = True
        self.minor = 1

    @property
    def body_size(self) -> int:
        return self.content_length or 0

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._names.append((name, value))


def parse_head(head: bytes, max_body: int) -> Head | None:
    """The head (``head`` ends with its blank line), or None when it is not plain."""
    if not_plain(head):
        return None
    parsed = Head()
    parser = httptools.HttpRequestParser(parsed)
    try:
        parser.feed_data(head)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return None
    method = parser.get_method().decode("ascii")
    version = parser.get_http_version()
    if method not in FAST_METHODS or version not in {"1.1", "1.0"}:
        return None
    target = parsed._url.decode("ascii")
    path, _, query = target.partition("?")
    if not path.startswith("/") or _NOT_PLAIN_PATH.search(target) or path.startswith("/_netwatch"):
        return None
    minor = 1 if version == "1.1" else 0
    if not _take_headers(parsed, max_body, needs_host=minor == 1):
        return None
    parsed.method = method
    parsed.path = path
    parsed.raw_query = query
    parsed.minor = minor
    # From the header itself: llhttp forgets it once a bodiless message is complete.
    connection = parsed.headers.get("Connection")
    if connection is None:
        parsed.keep_alive = minor == 1
    else:
        tokens = {
            token.strip().lower()
            for value in parsed.headers.getall("Connection")
            for token in value.split(",")
        }
        parsed.keep_alive = "close" not in tokens and (minor == 1 or "keep-alive" in tokens)
    return parsed


def _take_headers(parsed: Head, max_body: int, *, needs_host: bool) -> bool:
    """Move the raw header pairs into ``parsed.headers``; False when they are not plain:
    a name given twice (aiohttp refuses a repeated Host, Content-Type, User-Agent... and
    serves the rest as it always did), no Host in HTTP/1.1 (refused), too many headers."""
    if len(parsed._names) > MAX_FAST_HEADERS:
        return False
    length: int | None = None
    pairs = []
    seen = set()
    for raw_name, raw_value in parsed._names:
        name = raw_name.decode("ascii")
        value = raw_value.decode("ascii")
        lower = name.lower()
        if lower in _HANDED_OVER or lower in seen:
            return False
        seen.add(lower)
        if lower == "content-length":
            if not value.isdigit():
                return False
            length = int(value)
            if length > max_body:
                return False
        pairs.append((name, value))
    if needs_host and "host" not in seen:
        return False
    parsed._names = []
    parsed.headers = CIMultiDict(pairs)
    parsed.content_length = length
    return True


def _status_line(minor: int, status: int, reason: str) -> str:
    if not reason:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
    return f"HTTP/1.{minor} {status} {reason}\r\n"


def _connection(minor: int, keep_alive: bool) -> str:
    if not keep_alive:
        return "Connection: close\r\n" if minor else ""
    return "" if minor else "Connection: keep-alive\r\n"


def response_head(
    minor: int,
    status: int,
    reason: str,
    headers: Iterable[tuple[str, str]],
    *,
    keep_alive: bool,
    framing: str,
) -> bytes:
    """A relayed response's head: the upstream's headers (hop-by-hop ones already out),
    with ``framing`` (a Content-Length or Transfer-Encoding line, or "") in place of any
    the upstream sent, and Date and Server added only when missing, as aiohttp does."""
    lines = [_status_line(minor, status, reason)]
    seen_date = seen_server = False
    for name, value in headers:
        lower = name.lower()
        if lower == "content-length":
            continue
        if lower == "date":
            seen_date = True
        elif lower == "server":
            seen_server = True
        lines.append(f"{name}: {value}\r\n")
    lines.append(framing)
    if not seen_date:
        lines.append(f"Date: {http_date()}\r\n")
    if not seen_server:
        lines.append(f"Server: {SERVER_SOFTWARE}\r\n")
    lines.append(_connection(minor, keep_alive))
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def json_answer(
    minor: int,
    status: int,
    payload: Mapping[str, object],
    headers: Mapping[str, str] | None,
    *,
    keep_alive: bool,
) -> bytes:
    """The proxy's own JSON answer, header for header as aiohttp's ``json_response``."""
    body = json.dumps(payload).encode()
    lines = [_status_line(minor, status, "")]
    if headers:
        lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    lines.append(
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Date: {http_date()}\r\n"
        f"Server: {SERVER_SOFTWARE}\r\n"
    )
    lines.append(_connection(minor, keep_alive))
    lines.append("\r\n")
    return "".join(lines).encode() + body
