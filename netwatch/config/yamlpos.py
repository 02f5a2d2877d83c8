"""YAML to plain data, remembering the file line of every key path.

PyYAML's constructors throw positions away, so this module composes the node graph and
builds the data itself, which also gives it the places to do what ``safe_load`` cannot:

- a key repeated in one mapping is a problem, not a silent override;
- ``${VAR}`` and ``${VAR:-default}`` in string values are expanded from the environment
  (``$${`` writes a literal ``${``), and an unset variable is a problem at its key;
- plain scalars such as ``7:30`` stay text: YAML 1.1 would read them as base-60 integers
  (450), which is never what a config means by a time of day or a duration.

A path is a tuple of mapping keys (``str``) and sequence indexes (``int``); ``()`` is the
document. ``lines[path]`` is the 1-based line of the key (or of the item, in a sequence).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

KeyPath = tuple[str | int, ...]

_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_BASE60_RE = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_ENV_RE = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_ENV_BODY_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$", re.DOTALL)
_SIMPLE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class YamlSyntaxError(ValueError):
    """The text is not YAML (or uses a tag a safe loader refuses)."""

    def __init__(self, line: int, problem: str) -> None:
        self.line = line
        self.problem = problem
        super().__init__(f"line {line}: {problem}")


@dataclass(frozen=True, slots=True)
class Problem:
    """A located problem found while reading the YAML, before any schema check."""

    line: int
    path: KeyPath
    message: str


@dataclass(slots=True)
class Document:
    """What ``load_yaml`` found: the data, where each key path is, and what was wrong."""

    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def line_of(self, path: KeyPath) -> int:
        """The line of ``path``, or of its nearest ancestor that is in the file."""
        for end in range(len(path), -1, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return 1


def format_path(path: KeyPath) -> str:
    """``("targets", 1, "port")`` -> ``targets[1].port``; odd keys are quoted."""
    out: list[str] = []
    for seg in path:
        if isinstance(seg, int):
            out.append(f"[{seg}]")
        elif _SIMPLE_KEY_RE.match(seg):
            out.append(f".{seg}" if out else seg)
        else:
            out.append(f"[{seg!r}]")
    return "".join(out) or "(top level)"


def load_yaml(text: str, env: Mapping[str, str]) -> Document:
    """Parse one YAML document; raise ``YamlSyntaxError`` if it is not YAML at all."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is None:
        return _load(text, env, yaml.SafeLoader)
    try:
        # libyaml composes about eight times faster than the pure-Python parser ...
        return _load(text, env, fast)
    except YamlSyntaxError:
        # ... but words its errors differently: report the pure-Python parser's message,
        # so that what users read (and tests pin) does not depend on how PyYAML was built.
        return _load(text, env, yaml.SafeLoader)


def _load(text: str, env: Mapping[str, str], loader_class: Any) -> Document:
    loader = loader_class(text)
    builder = _Builder(loader, env)
    try:
        root = loader.get_single_node()
        if root is not None:
            builder.doc.lines[()] = root.start_mark.line + 1
            builder.doc.data = builder.build(root, ())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "not valid YAML"
        raise YamlSyntaxError(mark.line + 1 if mark else 1, problem) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(1, str(exc)) from None
    finally:
        loader.dispose()
    return builder.doc


class _Builder:
    def __init__(self, loader: Any, env: Mapping[str, str]) -> None:
        self.loader = loader
        self.env = env
        self.doc = Document(data=None)
        # Nodes being built right now: an alias back to one of them is a cycle.
        self.active: set[int] = set()

    def build(self, node: Node, path: KeyPath) -> Any:
        if id(node) in self.active:
            self._problem(path, "an alias refers to its own parent (recursive YAML)")
            return None
        self.active.add(id(node))
        try:
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            if isinstance(node, SequenceNode):
                items = []
                for index, item in enumerate(node.value):
                    self.doc.lines[(*path, index)] = item.start_mark.line + 1
                    items.append(self.build(item, (*path, index)))
                return items
            return self._scalar(node, path)
        finally:
            self.active.discard(id(node))

    def _mapping(self, node: MappingNode, path: KeyPath) -> dict[str, Any]:
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, ScalarNode):
                continue
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in first_line:
                self.doc.problems.append(
                    Problem(line, (*path, key), f"duplicate key (first at line {first_line[key]})")
                )
            else:
                first_line[key] = line
        # flatten_mapping resolves `<<: *anchor` merges, placing merged pairs first so that
        # the mapping's own keys override them (the YAML merge-key semantics).
        self.loader.flatten_mapping(node)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                line = key_node.start_mark.line + 1
                self.doc.problems.append(Problem(line, path, "a key must be a plain word"))
                continue
            # The key as written: YAML 1.1 would turn keys like `on` or `no` into booleans.
            key = str(key_node.value)
            self.doc.lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = self.build(value_node, (*path, key))
        return out

    def _scalar(self, node: Node, path: KeyPath) -> Any:
        assert isinstance(node, ScalarNode)  # the composer only makes three node kinds
        if node.tag == _STR_TAG:
            return self._expand(str(node.value), path)
        # Plain style is None from PyYAML's parser and "" from libyaml's.
        if not node.style and _BASE60_RE.match(node.value):
            return str(node.value)
        return self.loader.construct_object(node, deep=True)

    def _expand(self, text: str, path: KeyPath) -> str:
        if "${" not in text:
            return text

        def replace(match: re.Match[str]) -> str:
            if match.group(1) is None:  # `$${` escapes a literal `${`
                return "${"
            body = _ENV_BODY_RE.match(match.group(1))
            if body is None:
                self._problem(path, f"bad reference {match.group(0)!r} (use ${{NAME}})")
                return match.group(0)
            name, default = body.group(1), body.group(2)
            value = self.env.get(name, "")
            if value:
                return value
            if default is not None:
                return default
            if name in self.env:
                return ""
            self._problem(path, f"environment variable {name} is not set")
            return match.group(0)

        return _ENV_RE.sub(replace, text)

    def _problem(self, path: KeyPath, message: str) -> None:
        self.doc.problems.append(Problem(self.doc.line_of(path), path, message))
