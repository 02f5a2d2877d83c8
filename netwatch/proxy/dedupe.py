"""How an entry in doubt is settled: the per-rule dedupe strategy and the lookup template.

An entry is *in doubt* when an attempt to send it may have reached the upstream without a
final answer (the request was written, then the connection reset or timed out, or the
proxy died mid-attempt). What happens next is the strategy of the replayable rule that
matches it (``proxy.replayable[].dedupe``, default ``proxy.dedupe``):

``idempotency-key``
    re-send it with its original key: the upstream de-duplicates.
``lookup``
    ask the upstream first, with a request built from a template over the stored request
    (``{body.a.b}``, ``{header.Name}``, ``{idempotency_key}``, each URL-encoded); an
    ``applied`` status settles it, an ``absent`` one re-sends it, anything else asks again
    later. A template the stored request cannot fill holds the entry for an operator.
``hold``
    keep it (and everything behind it on its order key) for an operator:
    ``netwatch queue resolve TICKET --applied | --resend``.

Pure: no I/O, no asyncio. ``config.py`` uses ``parse_template`` to refuse a bad template
when the file is checked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote

if TYPE_CHECKING:
    from netwatch.config.schema import Dedupe, Lookup, Replayable
    from netwatch.proxy.queue import Entry

Verdict = Literal["applied", "absent", "unknown"]
BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE"})

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_FIELD = re.compile(r"[A-Za-z0-9_-]+")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token


@dataclass(frozen=True, slots=True)
class Field:
    """One placeholder: ``source`` is body, header or idempotency_key."""

    source: Literal["body", "header", "idempotency_key"]
    path: tuple[str, ...] = ()  # body: the keys down the JSON object; header: (name,)

    def __str__(self) -> str:
        return "{" + ".".join((self.source, *self.path)) + "}"


Template = tuple[str | Field, ...]


class LookupImpossible(Exception):
    """The stored request lacks what the lookup template names."""


@lru_cache(maxsize=64)
def parse_template(url: str) -> Template:
    """Split a lookup URL into literal text and placeholders; ValueError names the bad one."""
    if not url.startswith("/"):
        raise ValueError(f"lookup url must be a path on the upstream starting with '/': {url!r}")
    parts: list[str | Field] = []
    at = 0
    for match in _PLACEHOLDER.finditer(url):
        parts.append(url[at : match.start()])
        parts.append(_field(match.group(1)))
        at = match.end()
    rest = url[at:]
    if "{" in rest or "}" in rest or any("{" in p or "}" in p for p in parts if isinstance(p, str)):
        raise ValueError(f"unbalanced brace in lookup url {url!r}")
    parts.append(rest)
    return tuple(p for p in parts if p != "")


def _field(text: str) -> Field:
    if text == "idempotency_key":
        return Field("idempotency_key")
    source, _, rest = text.partition(".")
    names = rest.split(".") if rest else []
    if source == "body" and names and all(_FIELD.fullmatch(n) for n in names):
        return Field("body", tuple(names))
    if source == "header" and len(names) == 1 and _HEADER.fullmatch(names[0]):
        return Field("header", (names[0],))
    raise ValueError(
        f"bad placeholder {{{text}}}: use {{body.field.sub}}, {{header.Name}}"
        " or {idempotency_key}"
    )


def body_fields(template: Template) -> list[Field]:
    return [p for p in template if isinstance(p, Field) and p.source == "body"]


def render(template: Template, entry: Entry) -> str:
    """The lookup path for ``entry``, each value URL-encoded; LookupImpossible if the
    stored request lacks a named field (or its body is not a JSON object)."""
    out: list[str] = []
    body: object = None
    parsed = False
    for part in template:
        if isinstance(part, str):
            out.append(part)
            continue
        if part.source == "idempotency_key":
            value: object = entry.idempotency_key
        elif part.source == "header":
            value = _header(entry.headers, part.path[0])
        else:
            if not parsed:
                body, parsed = _json(entry.body), True
            value = _dig(body, part)
        out.append(quote(_scalar(value, part), safe=""))
    return "".join(out)


def _header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    wanted = name.lower()
    return next((v for k, v in headers if k.lower() == wanted), None)


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        raise LookupImpossible("the stored body is not JSON") from None


def _dig(body: object, field: Field) -> object:
    value = body
    for name in field.path:
        if not isinstance(value, Mapping) or name not in value:
            raise LookupImpossible(f"the stored body has no {field}")
        value = value[name]
    return value


def _scalar(value: object, field: Field) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        what = "no" if value is None else "no usable"
        raise LookupImpossible(f"the stored request has {what} {field}")
    text = str(value)
    if text == "":
        raise LookupImpossible(f"the stored request has an empty {field}")
    return text


def verdict(lookup: Lookup, status: int) -> Verdict:
    if status in lookup.applied:
        return "applied"
    if status in lookup.absent:
        return "absent"
    return "unknown"


def rule_for(rules: tuple[Replayable, ...], method: str, path: str) -> Replayable | None:
    """The first replayable rule matching the request, or None."""
    for rule in rules:
        if method in rule.methods and fnmatchcase(path, rule.path):
            return rule
    return None


def strategy_for(rules: tuple[Replayable, ...], default: Dedupe, method: str, path: str) -> Dedupe:
    """The strategy of the first rule that matches (its own, or the default)."""
    rule = rule_for(rules, method, path)
    if rule is None or rule.dedupe is None:
        return default
    return rule.dedupe


def bodyless_problem(dedupe: Dedupe, methods: Iterable[str]) -> str | None:
    """Why a lookup cannot work for these methods (it reads a body they do not carry)."""
    if isinstance(dedupe, str):
        return None
    fields = body_fields(parse_template(dedupe.lookup.url))
    bodyless = sorted(set(methods) & BODYLESS_METHODS)
    if fields and bodyless:
        return (
            f"lookup url uses {fields[0]}, but {'/'.join(bodyless)} requests carry no body "
            "to read it from (use {header.Name} or {idempotency_key}, or a rule of its own)"
        )
    return None
