"""Pydantic validation errors -> located, readable config problems.

Pydantic's ``loc`` follows the schema, not the file: a discriminated union adds the tag
(``targets.1.tcp.port``) and some validators add internal segments. Walking ``loc`` against
the data actually read gives the key path as the operator wrote it, and so its line.
"""

from __future__ import annotations

import difflib
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from netwatch.config.yamlpos import Document, KeyPath, Problem

_MAPPING_TYPES = {"model_type", "model_attributes_type", "dict_type", "mapping_type"}
_LIST_TYPES = {"tuple_type", "list_type", "iterable_type"}
# The one discriminator of the schema: targets are told apart by their `type` key.
_TAG_KEY = "type"


def translate(exc: ValidationError, doc: Document, root: type[BaseModel]) -> list[Problem]:
    """One ``Problem`` per pydantic error, at the line of the key the operator wrote."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        path = _data_path(loc, doc.data)
        if err["type"] in {"union_tag_invalid", "union_tag_not_found"}:
            path = (*path, _TAG_KEY)
        problems.append(Problem(doc.line_of(path), path, _message(err, loc, root)))
    return problems


def _data_path(loc: tuple[str | int, ...], data: Any) -> KeyPath:
    path: list[str | int] = []
    node = data
    for index, seg in enumerate(loc):
        last = index == len(loc) - 1
        if isinstance(node, dict):
            if not last and node.get(_TAG_KEY) == seg:
                continue  # the discriminator value pydantic inserts; not in the file
            if seg in node:
                path.append(seg)
                node = node[seg]
                continue
        elif isinstance(node, list) and isinstance(seg, int) and 0 <= seg < len(node):
            path.append(seg)
            node = node[seg]
            continue
        if last:
            path.append(seg)  # a missing key: not in the data, but it is what to name
    return tuple(path)


# One early return per error kind reads as a lookup table; splitting it would hide that.
def _message(  # noqa: PLR0911
    err: ErrorDetails, loc: tuple[str | int, ...], root: type[BaseModel]
) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _fields_at(root, loc[:-1]), n=1)
        return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if kind in {"missing", "union_tag_not_found"}:
        return "missing required key"
    if kind == "value_error":
        # The message we raised, without pydantic's "Value error, " prefix.
        return str(ctx.get("error", err["msg"]))
    if kind == "union_tag_invalid":
        return f"unknown type {ctx.get('tag')!r} (use one of {ctx.get('expected_tags')})"
    if kind in _MAPPING_TYPES:
        return f"expected a mapping, got {_describe(err['input'])}"
    if kind in _LIST_TYPES:
        return f"expected a list, got {_describe(err['input'])}"
    if kind == "string_type":
        return f"expected text, got {_describe(err['input'])}"
    return err["msg"]


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return repr(value)


def _fields_at(root: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The keys allowed at ``loc`` (a pydantic loc, tags included), for "did you mean"."""
    current: Any = root
    for seg in loc:
        current = _step(_unwrap(current), seg)
        if current is None:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(tp: Any) -> Any:
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
            continue
        if get_origin(tp) in {Union, types.UnionType}:
            members = [m for m in get_args(tp) if m is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def _step(tp: Any, seg: str | int) -> Any:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        field = tp.model_fields.get(str(seg))
        return field.annotation if field is not None else None
    origin = get_origin(tp)
    if origin is tuple and isinstance(seg, int):
        return get_args(tp)[0]
    if origin in {Union, types.UnionType}:
        for member in get_args(tp):
            tag = getattr(member, "model_fields", {}).get(_TAG_KEY)
            if tag is not None and seg in get_args(tag.annotation):
                return member
    return None
