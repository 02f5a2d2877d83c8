"""``netwatch init``: a site's first config, and its queue key, from a few flags.

The config is written from a template, then parsed by the same loader as ``netwatch run``
before anything touches the disk: a file ``init`` writes always starts. The queue key is
made beside the queue path the config names (directory 0700, key 0600); an existing key is
never replaced, not even with ``--force``, since entries sealed with it would become
unreadable.
"""

from __future__ import annotations

import errno
import grp
import json
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from netwatch import __version__
from netwatch.config.schema import Config, parse_config
from netwatch.errors import ConfigError, NetwatchError, UsageError
from netwatch.proxy.crypto import generate_key_file

DEFAULT_CONFIG = Path("/etc/netwatch/netwatch.yaml")
DEFAULT_QUEUE = Path("/var/lib/netwatch/queue.db")
SERVICE_GROUP = "netwatch"


@dataclass(frozen=True, slots=True)
class SiteAnswers:
    """What the operator told ``netwatch init``."""

    site_id: str
    name: str
    upstream: str
    district: str = ""
    isp: str = ""
    timezone: str = "Asia/Ho_Chi_Minh"
    queue: Path = DEFAULT_QUEUE
    proxy_listen: str = "0.0.0.0:8080"
    metrics_listen: str = "127.0.0.1:9108"


@dataclass(frozen=True, slots=True)
class Written:
    config_path: Path
    key_path: Path
    key_created: bool
    config: Config


def _q(text: str) -> str:
    """A YAML scalar: JSON strings are valid YAML and escape everything that matters."""
    return json.dumps(text, ensure_ascii=False)


def render_config(answers: SiteAnswers) -> str:
    """The first config of a site, with comments an operator can follow."""
    parts = urlsplit(answers.upstream)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    key_path = answers.queue.parent / "queue.key"
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""\
# netwatch config of {answers.name or answers.site_id}, written by `netwatch init` \
(netwatch {__version__}, {stamp}).
# Check it after every edit:   netwatch check-config {{this file}}
# Apply an edit:               systemctl reload netwatch   (proxy and mqtt: restart)
# Every key is described in config/netwatch.example.yaml and docs/install.md.

site:
  id: {_q(answers.site_id)}
  name: {_q(answers.name)}
  district: {_q(answers.district)}
  isp: {_q(answers.isp)}
  timezone: {_q(answers.timezone)}

# Counter opening hours: outages inside them are labelled peak, and the replay runs at
# replay.peak_rate inside them.
peak_hours:
  - {{days: [mon-fri], start: "07:30", end: "11:30"}}
  - {{days: [mon-fri], start: "13:30", end: "17:00"}}

# A target is probed every `interval`. A link is declared down after `fail_after` failed
# rounds in a row: here 3 x 5s, so an outage is seen within 10-15 s (plus one timeout).
defaults: {{interval: 5s, timeout: 2s}}
link: {{fail_after: 3, recover_after: 3, degraded_latency: 800ms, degraded_loss: 0.2}}

targets:
  # The population database's own address: a TCP connect tells "reachable" from "not".
  - {{name: popdb-tcp, type: tcp, host: {_q(host)}, port: {port}}}
  # Add the office's gateway and the ISP's first hop to tell a LAN fault from an ISP one:
  # - {{name: lan-gw, type: icmp, host: 192.168.1.1}}
  # - {{name: isp-edge, type: icmp, host: 203.0.113.1}}

metrics:
  listen: {_q(answers.metrics_listen)}
  # Bearer token for /metrics and /api/v1/status, from /etc/netwatch/netwatch.env.
  token: "${{NETWATCH_METRICS_TOKEN:-}}"

proxy:
  # Stations send their requests here instead of to the database.
  listen: {_q(answers.proxy_listen)}
  upstream: {_q(answers.upstream)}
  guard: [popdb-tcp]
  # Bearer token for /_netwatch/status and /_netwatch/metrics (the staff page stays open).
  admin_token: "${{NETWATCH_ADMIN_TOKEN:-}}"
  queue:
    path: {_q(str(answers.queue))}
    key_file: {_q(str(key_path))}
    max_bytes: 1GiB
    max_age: 72h
  replay: {{rate: 50/s, peak_rate: 5/s}}
"""


def _check_answers(answers: SiteAnswers) -> None:
    parts = urlsplit(answers.upstream)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--upstream: {answers.upstream!r} is not an http:// or https:// URL")
    if not answers.queue.is_absolute():
        raise UsageError(f"--queue: {answers.queue} must be an absolute path")


def write_site(answers: SiteAnswers, config_path: Path, *, force: bool = False) -> Written:
    """Validate, then write the config and (when missing) the queue key."""
    _check_answers(answers)
    if config_path.exists() and not force:
        raise UsageError(f"{config_path} already exists; use --force to overwrite it")
    text = render_config(answers)
    try:
        # The same loader `run` uses, with the token variables unset.
        config = parse_config(text, str(config_path), env={})
    except ConfigError as exc:
        # A flag made the template invalid (e.g. a site id with spaces): name the flag's key.
        raise UsageError("; ".join(line.split(": ", 1)[-1] for line in exc.problems)) from None
    key_path = answers.queue.parent / "queue.key"
    try:
        _private_dir(answers.queue.parent)
    except OSError as exc:
        raise NetwatchError(f"{answers.queue.parent}: cannot create: {_reason(exc)}") from None
    key_created = not key_path.exists()
    if key_created:
        generate_key_file(key_path)
    try:
        _write_atomic(config_path, text)
    except OSError as exc:
        raise NetwatchError(f"{config_path}: cannot write: {_reason(exc)}") from None
    return Written(config_path, key_path, key_created, config)


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _make_dir(path: Path) -> None:
    # mkdir(exist_ok=True) on a file says "File exists": say what is wrong instead.
    blocker = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{blocker} is not a directory")
    path.mkdir(parents=True, exist_ok=True)


def _private_dir(path: Path) -> None:
    _make_dir(path)
    path.chmod(0o700)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: never half a config."""
    _make_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o640)
        _give_to_service_group(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _give_to_service_group(path: Path) -> None:
    # Installed as a service, the daemon runs as user netwatch: it must read its config
    # (0640 root:netwatch). Elsewhere (a test, a laptop) the file stays the caller's.
    if os.geteuid() != 0:
        return
    try:
        gid = grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return
    os.chown(path, 0, gid)
