"""``netwatch queue ...``: inspect and repair the station queue, daemon running or not.

SQLite's WAL lets this process read and write the file the daemon has open; every write
here goes through the same group-committing writer as the daemon's. Bodies are personal
data: they are never printed unless asked for (``show --body``, ``export --decrypt``).

The key of an encrypted queue: ``--key-file``, else ``proxy.queue.key_file`` of ``-c``, else
the key beside the queue (``queue.db`` -> ``queue.key``) that the proxy created.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from netwatch.config.schema import load_config
from netwatch.errors import NetwatchError, UsageError
from netwatch.proxy.crypto import default_key_path, generate_key_file, load_key
from netwatch.proxy.queue import DurableQueue, Entry, EntryState
from netwatch.proxy.salvage import salvage as salvage_file
from netwatch.words import plural

_PREVIEW_BYTES = 64
_EXPORT_PAGE = 500
_NO_LIMIT = 2**62  # the CLI never enqueues, so max_bytes never refuses anything here
_DEFAULT_MAX_AGE = 72 * 3600.0
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})


class QueueCommandError(click.ClickException):
    """A runtime failure, as one ``Error: ...`` line on stderr; exit 1."""

    exit_code = 1


class QueueUsageError(QueueCommandError):
    """Bad input (usage, config, key file argument), as one line on stderr; exit 2."""

    exit_code = 2


def _click_error(exc: NetwatchError) -> QueueCommandError:
    cls = QueueUsageError if exc.exit_code == QueueUsageError.exit_code else QueueCommandError
    return cls(str(exc))


@dataclass(frozen=True, slots=True)
class _Target:
    path: Path
    key: bytes | None
    max_age: float
    auto_key: Path | None = None  # read if the queue turns out to be encrypted


def _target(queue_path: Path | None, config_path: Path | None, key_file: Path | None) -> _Target:
    max_age = _DEFAULT_MAX_AGE
    encrypt = True
    if config_path is not None:
        config = load_config(config_path)
        if config.proxy is None:
            raise UsageError(f"{config_path}: no proxy section, so no queue to open")
        settings = config.proxy.queue
        queue_path = queue_path or Path(settings.path)
        if key_file is None and settings.key_file is not None:
            key_file = Path(settings.key_file)
        max_age = settings.max_age
        encrypt = settings.encrypt
    if queue_path is None:
        raise UsageError("say which queue: --queue PATH, or -c CONFIG")
    if key_file is not None:
        return _Target(queue_path, load_key(key_file), max_age)
    return _Target(queue_path, None, max_age, default_key_path(queue_path) if encrypt else None)


def _queue_command(
    fn: Callable[..., Awaitable[None]],
) -> Callable[..., None]:
    """Add the common options; run ``fn(q, **options)`` on the opened queue; map errors."""

    @click.option("--queue", "queue_path", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path))
    @click.option(
        "--key-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Key of an encrypted queue (default: proxy.queue.key_file of -c CONFIG).",
    )
    @wraps(fn)
    def command(
        queue_path: Path | None, config_path: Path | None, key_file: Path | None, **kw: Any
    ) -> None:
        async def main() -> None:
            target = _target(queue_path, config_path, key_file)
            opened = DurableQueue.open(
                target.path,
                max_bytes=_NO_LIMIT,
                max_age=target.max_age,
                key=target.key,
                auto_key=target.auto_key,
                create=False,  # a mistyped path must not become a new, empty queue
            )
            async with opened as q:
                await fn(q, **kw)

        _run(main)

    return command


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    try:
        asyncio.run(main())
    except NetwatchError as exc:
        raise _click_error(exc) from None


@click.group("queue")
def queue() -> None:
    """Inspect and repair the station proxy's durable queue."""


@queue.command("list")
@click.option("--state", type=click.Choice(["queued", "delivered", "dead"]))
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON array instead of a table.")
@_queue_command
async def list_entries(
    q: DurableQueue, state: EntryState | None, limit: int, as_json: bool
) -> None:
    """List entries in arrival order (no bodies)."""
    entries = await q.list(state=state, limit=limit)
    if as_json:
        click.echo(json.dumps([_summary(e) for e in entries], indent=2))
        return
    table = Table("ticket", "seq", "state", "method", "path", "order key", "queued at",
                  "attempts", "upstream", "reason", "size")  # fmt: skip
    for e in entries:
        reason = e.reason or ("unreadable (not set aside yet)" if e.unreadable else "")
        table.add_row(e.id, str(e.seq), e.state, e.method, e.path, e.order_key,
                      _iso(e.queued_at), str(e.attempts), _text(e.upstream_status),
                      reason, str(e.size))  # fmt: skip
    console = Console()
    if not console.is_terminal:
        console.width = 200  # a pipe gets whole lines, not a table squeezed to 80 columns
    console.print(table)
    console.print(f"{plural(len(entries), 'entry', 'entries')} shown")


@queue.command("show")
@click.argument("ticket")
@click.option("--json", "as_json", is_flag=True)
@click.option("--body", "with_body", is_flag=True, help="Also show the first bytes of bodies.")
@_queue_command
async def show(q: DurableQueue, ticket: str, as_json: bool, with_body: bool) -> None:
    """Show one entry; bodies only as sizes unless --body is given."""
    entry = await q.get(ticket)
    if entry is None:
        raise NetwatchError(f"no ticket {ticket} in {q.path}")
    info = _summary(entry)
    info["query"] = entry.query
    info["headers"] = [
        [k, "<redacted>" if k.lower() in _SECRET_HEADERS else v] for k, v in entry.headers
    ]
    info["upstream_body_bytes"] = len(entry.upstream_body or b"")
    if entry.unreadable:
        raw = await q.raw(entry.seq)
        info["stored_bytes"] = {name: len(blob or b"") for name, blob in raw.items()}
    if with_body:
        info["body_preview"] = _preview(entry.body)
        info["upstream_body_preview"] = _preview(entry.upstream_body or b"")
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    info["headers"] = "; ".join(f"{k}: {v}" for k, v in info["headers"])
    for name, value in info.items():
        click.echo(f"{name:>22}: {_text(value)}")


@queue.command("retry")
@click.argument("ticket", required=False)
@click.option("--all-dead", is_flag=True, help="Requeue every dead letter.")
@_queue_command
async def retry(q: DurableQueue, ticket: str | None, all_dead: bool) -> None:
    """Put a dead letter (or all of them) back in the queue."""
    if (ticket is None) == (not all_dead):
        raise UsageError("give either a TICKET or --all-dead")
    count = await q.retry_dead(ticket, now=_now())
    if ticket is not None and count == 0:
        entry = await q.get(ticket)
        if entry is None:
            raise NetwatchError(f"no ticket {ticket} in {q.path}")
        raise NetwatchError(f"ticket {ticket} is {entry.state}, not a dead letter")
    click.echo(f"requeued {plural(count, 'entry', 'entries')}")


@queue.command("purge")
@click.option("--dead", is_flag=True, help="Delete every dead letter.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_queue_command
async def purge(q: DurableQueue, dead: bool, yes: bool) -> None:
    """Delete dead letters for good (export them first)."""
    if not dead:
        raise UsageError("say what to purge: --dead")
    count = (await q.stats(now=_now())).dead
    if count == 0:
        click.echo("no dead letters")
        return
    if not yes:
        # A blocking prompt in the event loop is fine: nothing else runs in this process.
        click.confirm(
            f"Delete {plural(count, 'dead letter')} for good? "
            "(`netwatch queue export --dead` saves them)",
            abort=True,
        )
    click.echo(f"purged {plural(await q.purge_dead(), 'dead letter')}")


@queue.command("export")
@click.option("--dead", is_flag=True, help="Export every dead letter.")
@click.option(
    "--decrypt",
    is_flag=True,
    help="Write the entries' contents in plaintext (citizens' data: keep the output safe).",
)
@_queue_command
async def export(q: DurableQueue, dead: bool, decrypt: bool) -> None:
    """Dead letters as JSON lines on stdout.

    With --decrypt: path, query, headers in plaintext, bodies base64. Without: an encrypted
    queue's fields as stored (``stored_b64``: sealed, they open only with the queue's key);
    a plaintext queue is refused, since its export would be plaintext anyway. Entries that
    cannot be read back always come out as stored."""
    if not dead:
        raise UsageError("say what to export: --dead")
    if not decrypt and not q.encrypted:
        raise UsageError(
            "this queue is not encrypted, so its export is plaintext: add --decrypt to say so"
        )
    after = 0
    while page := await q.list(state="dead", limit=_EXPORT_PAGE, after_seq=after):
        for e in page:
            click.echo(
                json.dumps(await _export_record(q, e, decrypt=decrypt), separators=(",", ":"))
            )
        after = page[-1].seq


async def _export_record(q: DurableQueue, e: Entry, *, decrypt: bool) -> dict[str, Any]:
    record = _summary(e)
    if decrypt and e.unreadable is None:
        record.update(
            query=e.query,
            headers=[list(h) for h in e.headers],
            body_b64=base64.b64encode(e.body).decode(),
            upstream_body_b64=base64.b64encode(e.upstream_body or b"").decode(),
        )
        return record
    if not decrypt:
        record["path"] = None  # sealed with the rest
    record["sealed"] = q.encrypted
    record["stored_b64"] = {
        name: None if blob is None else base64.b64encode(blob).decode()
        for name, blob in (await q.raw(e.seq)).items()
    }
    return record


@queue.command("salvage")
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Only if SRC's own record of its encryption is unreadable: the key it was sealed with.",
)
def salvage(src: Path, dst: Path, key_file: Path | None) -> None:
    """Copy every entry that can still be read from a damaged queue file SRC, in arrival
    order, into a new file DST (SRC is only read). Exit 0: all copied; 1: some entries
    could not be read (listed); 2: bad usage (DST exists, SRC missing or not a queue)."""
    try:
        report = salvage_file(src, dst, key=load_key(key_file) if key_file else None)
    except NetwatchError as exc:
        raise _click_error(exc) from None
    counts = ", ".join(f"{n} {state}" for state, n in sorted(report.copied.items()))
    total = sum(report.copied.values())
    click.echo(f"copied {total} entries from {src} to {dst}, in arrival order ({counts or 'none'})")
    for first, last in report.lost:
        span = f"seq {first} and after" if last is None else f"seq {first}-{last}"
        click.echo(f"could not read: {span} (damaged pages)")
    if report.rejected:
        click.echo(
            f"read but not valid entries, left out: seq {', '.join(map(str, report.rejected))}"
        )
    if report.meta_lost:
        click.echo(
            "the queue's encryption record could not be read: DST is "
            + ("sealed under --key-file" if key_file else "marked plaintext (give --key-file)")
        )
    if report.key_copied is not None:
        click.echo(f"copied the queue key beside it: {report.key_copied}")
    click.echo(f"next: stop netwatch, put {dst} (and its key) in place of {src}, start netwatch")
    if not report.complete:
        raise QueueCommandError("some entries could not be salvaged (see above)")


@queue.command("keygen")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path) -> None:
    """Write a new random queue key to PATH (mode 0600; never overwrites)."""
    try:
        generate_key_file(path)
    except NetwatchError as exc:
        raise _click_error(exc) from None
    click.echo(f"wrote a new key to {path}; point proxy.queue.key_file at it")


def _summary(e: Entry) -> dict[str, Any]:
    return {
        "ticket": e.id,
        "seq": e.seq,
        "state": e.state,
        "method": e.method,
        "path": e.path,
        "order_key": e.order_key,
        "idempotency_key": e.idempotency_key,
        "queued_at": _iso(e.queued_at),
        "attempts": e.attempts,
        "next_attempt_at": _iso(e.next_attempt_at),
        "upstream_status": e.upstream_status,
        "reason": e.reason,
        "delivered_at": _iso(e.delivered_at),
        "size": e.size,
        "body_bytes": len(e.body),
        "unreadable": e.unreadable,
    }


def _preview(data: bytes) -> str:
    head = data[:_PREVIEW_BYTES].decode("utf-8", "backslashreplace")
    return head + ("..." if len(data) > _PREVIEW_BYTES else "")


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat()


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _now() -> float:
    return datetime.now(UTC).timestamp()
