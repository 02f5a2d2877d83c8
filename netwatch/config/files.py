"""The files a config refers to: CA bundles, client certificates, the queue key and the
queue's directory. ``check-config`` and ``run`` / ``proxy`` (at start) check them with this
one function, so both print the same line for the same problem and exit 2:

    site.yaml:41: proxy.queue.key_file: /var/lib/netwatch/queue.key: key file not found (...)
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path

from netwatch.config.schema import Config
from netwatch.config.yamlpos import KeyPath, format_path, load_yaml
from netwatch.errors import ConfigError, QueueKeyError


def _ca_problem(path: str) -> str | None:
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        return f"cannot load {path}: {_reason(exc)}"
    return None


def _cert_problem(cert: str, key: str | None) -> str | None:
    context = ssl.create_default_context()
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        return f"cannot load {cert}{f' with {key}' if key else ''}: {_reason(exc)}"
    return None


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return str(exc)


def _key_problem(path: str) -> str | None:
    from netwatch.proxy.crypto import load_key  # noqa: PLC0415 - only with a queue key

    try:
        load_key(path)
    except QueueKeyError as exc:
        return str(exc)
    return None


def _queue_problem(path: str) -> str | None:
    """The queue file must be readable and writable, or creatable where it is named."""
    queue = Path(path)
    if queue.exists():
        if queue.is_dir():
            return f"{queue} is a directory, not a queue file"
        if not os.access(queue, os.R_OK | os.W_OK):
            return f"{queue}: the queue file cannot be read and written by this user"
        return None
    parent = queue.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory: the queue {queue} cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent}: not writable by this user: the queue {queue} cannot be created"
    return None


def _problems(config: Config) -> Iterator[tuple[KeyPath, str]]:
    for index, target in enumerate(config.targets):
        ca_file = getattr(target, "ca_file", None)
        if ca_file:
            problem = _ca_problem(ca_file)
            if problem:
                yield ("targets", index, "ca_file"), problem
    mqtt = config.mqtt
    if mqtt is not None:
        if mqtt.ca_file and (problem := _ca_problem(mqtt.ca_file)):
            yield ("mqtt", "ca_file"), problem
        if mqtt.cert_file and (problem := _cert_problem(mqtt.cert_file, mqtt.key_file)):
            yield ("mqtt", "cert_file"), problem
    proxy = config.proxy
    if proxy is not None:
        if proxy.ca_file and (problem := _ca_problem(proxy.ca_file)):
            yield ("proxy", "ca_file"), problem
        if proxy.queue.key_file and (problem := _key_problem(proxy.queue.key_file)):
            yield ("proxy", "queue", "key_file"), problem
        if problem := _queue_problem(proxy.queue.path):
            yield ("proxy", "queue", "path"), problem


def check_files(config: Config, path: str | Path) -> None:
    """Raise one ``ConfigError`` (exit 2) with a located line per unusable file."""
    problems = list(_problems(config))
    if not problems:
        return
    try:
        doc = load_yaml(Path(path).read_text(encoding="utf-8"), os.environ)
    except (OSError, UnicodeDecodeError, ValueError):
        doc = None
    located = []
    for key_path, message in problems:
        line = doc.line_of(key_path) if doc is not None else 0
        where = f"{path}:{line}" if doc is not None else str(path)
        located.append((line, f"{where}: {format_path(key_path)}: {message}"))
    located.sort(key=lambda item: item[0])  # in file order, like the schema's problems
    raise ConfigError([text for _, text in located])
