"""``netwatch queue ...`` on a real queue file, through click's CliRunner."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from netwatch.proxy.crypto import generate_key_file, load_key
from netwatch.proxy.queue import DurableQueue, NewEntry
from netwatch.proxy.queue_cmd import queue

T0 = 1_800_000_000.0
BODY = b'{"citizen": "NGUYEN VAN A", "id": "001099012345"}'


@dataclass(frozen=True)
class Filled:
    path: Path
    queued: str
    dead: str
    delivered: str


def fill(path: Path, key: bytes | None = None) -> Filled:
    async def main() -> Filled:
        async with DurableQueue.open(path, max_bytes=1 << 30, max_age=3600, key=key) as q:
            ids = []
            for n in range(3):
                entry, _ = await q.enqueue(
                    NewEntry("POST", f"/api/cards/{n}", "x=1",
                             (("Authorization", "Bearer SECRET"), ("X-Station", "s1")),
                             BODY, f"idem-{n}", "station-1"),
                    now=T0 + n,
                )  # fmt: skip
                ids.append(entry.id)
            await q.mark_dead(ids[1], reason="rejected", status=422, body=b"bad id", now=T0)
            await q.mark_delivered(ids[2], status=201, now=T0 + 5)
        return Filled(path, *ids)

    return asyncio.run(main())


def run(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(queue, list(args), input=stdin)


@pytest.fixture
def filled(tmp_path: Path) -> Filled:
    return fill(tmp_path / "queue.db")


def test_list_shows_every_entry_as_a_table(filled: Filled) -> None:
    result = run("list", "--queue", str(filled.path))
    assert result.exit_code == 0, result.output
    for ticket in (filled.queued, filled.dead, filled.delivered):
        assert ticket in result.output
    assert "3 entries shown" in result.output
    assert "NGUYEN" not in result.output


def test_list_filters_by_state_as_json(filled: Filled) -> None:
    result = run("list", "--queue", str(filled.path), "--state", "dead", "--json")
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(result.output)
    assert entry["ticket"] == filled.dead
    assert (entry["state"], entry["reason"], entry["upstream_status"]) == ("dead", "rejected", 422)
    assert entry["queued_at"] == "2027-01-15T08:00:01+00:00"


def test_show_gives_sizes_not_bodies_and_redacts_credentials(filled: Filled) -> None:
    result = run("show", filled.dead, "--queue", str(filled.path), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["body_bytes"] == len(BODY)
    assert "NGUYEN" not in result.output
    assert "SECRET" not in result.output
    assert ["X-Station", "s1"] in info["headers"]
    with_body = run("show", filled.dead, "--queue", str(filled.path), "--body")
    assert with_body.exit_code == 0, with_body.output
    assert "NGUYEN" in with_body.output
    assert "bad id" in with_body.output


def test_show_unknown_ticket_is_one_line_on_stderr_and_exit_1(filled: Filled) -> None:
    result = run("show", "nope", "--queue", str(filled.path))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"Error: no ticket nope in {filled.path}"]


def test_retry_puts_one_dead_letter_back(filled: Filled) -> None:
    result = run("retry", filled.dead, "--queue", str(filled.path))
    assert (result.exit_code, result.output) == (0, "requeued 1 entry\n")
    again = run("retry", filled.dead, "--queue", str(filled.path))
    assert again.exit_code == 1
    assert "is queued, not a dead letter" in again.stderr


def test_retry_all_dead(filled: Filled) -> None:
    result = run("retry", "--all-dead", "--queue", str(filled.path))
    assert (result.exit_code, result.output) == (0, "requeued 1 entry\n")
    listed = run("list", "--queue", str(filled.path), "--state", "dead", "--json")
    assert json.loads(listed.output) == []


def test_retry_needs_exactly_a_ticket_or_all_dead(filled: Filled) -> None:
    for args in ((), (filled.dead, "--all-dead")):
        result = run("retry", *args, "--queue", str(filled.path))
        assert result.exit_code == 2
        assert "give either a TICKET or --all-dead" in result.stderr


def test_purge_asks_first_and_a_no_keeps_everything(filled: Filled) -> None:
    refused = run("purge", "--dead", "--queue", str(filled.path), stdin="n\n")
    assert refused.exit_code == 1
    assert "Delete 1 dead letter for good?" in refused.output
    kept = run("list", "--queue", str(filled.path), "--state", "dead", "--json")
    assert len(json.loads(kept.output)) == 1
    done = run("purge", "--dead", "--yes", "--queue", str(filled.path))
    assert (done.exit_code, done.output) == (0, "purged 1 dead letter\n")
    assert run("purge", "--dead", "--yes", "--queue", str(filled.path)).output == (
        "no dead letters\n"
    )


def test_export_dead_writes_json_lines_with_base64_bodies(filled: Filled) -> None:
    refused = run("export", "--dead", "--queue", str(filled.path))
    assert refused.exit_code == 2  # a plaintext queue exports plaintext only when told so
    assert "add --decrypt" in refused.stderr
    result = run("export", "--dead", "--decrypt", "--queue", str(filled.path))
    assert result.exit_code == 0, result.output
    (line,) = result.output.splitlines()
    record = json.loads(line)
    assert record["ticket"] == filled.dead
    assert base64.b64decode(record["body_b64"]) == BODY
    assert base64.b64decode(record["upstream_body_b64"]) == b"bad id"
    assert record["idempotency_key"] == "idem-1"


def test_missing_queue_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    result = run("list", "--queue", str(missing))
    assert result.exit_code == 2  # a missing file is exit 2 everywhere, as for a config
    assert "no queue file there" in result.stderr
    assert not missing.exists()


def test_no_queue_named_is_a_usage_error() -> None:
    result = run("list")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: say which queue: --queue PATH, or -c CONFIG"


def test_config_gives_the_queue_path_and_key_file(tmp_path: Path) -> None:
    key_file = generate_key_file(tmp_path / "queue.key")
    filled = fill(tmp_path / "data" / "queue.db", key=load_key(key_file))
    config = tmp_path / "netwatch.yaml"
    config.write_text(
        "site: {id: hcm-01}\n"
        "proxy:\n"
        "  upstream: http://127.0.0.1:9000\n"
        f"  queue: {{path: {filled.path}, key_file: {key_file}}}\n"
    )
    result = run("show", filled.queued, "-c", str(config), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.output)["path"] == "/api/cards/0"
    no_key = run("list", "--queue", str(filled.path))
    assert no_key.exit_code == 1
    assert "this queue is encrypted" in no_key.stderr
    wrong = tmp_path / "wrong.key"
    generate_key_file(wrong)
    wrong_key = run("list", "--queue", str(filled.path), "--key-file", str(wrong))
    assert wrong_key.exit_code == 1
    assert "the key does not open this queue" in wrong_key.stderr


def test_bad_config_is_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "netwatch.yaml"
    config.write_text("site: {id: hcm-01}\n")
    result = run("list", "-c", str(config))
    assert result.exit_code == 2
    assert "no proxy section" in result.stderr


def test_keygen_writes_a_private_key_once(tmp_path: Path) -> None:
    path = tmp_path / "queue.key"
    result = run("keygen", str(path))
    assert result.exit_code == 0, result.output
    assert path.stat().st_mode & 0o777 == 0o600
    again = run("keygen", str(path))
    assert again.exit_code == 1
    assert "refusing to overwrite" in again.stderr


async def test_cli_works_while_the_daemon_has_the_queue_open(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    async with DurableQueue.open(path, max_bytes=1 << 30, max_age=3600) as daemon:
        entry, _ = await daemon.enqueue(NewEntry("POST", "/api", "", (), BODY, "i"), now=T0)
        await daemon.mark_dead(entry.id, reason="rejected", status=400, body=None, now=T0)
        result = await asyncio.to_thread(run, "retry", "--all-dead", "--queue", str(path))
        assert result.exit_code == 0, result.stderr
        back = await daemon.get(entry.id)
        assert back is not None
        assert back.state == "queued"
        assert [e.id for e in await daemon.ready(now=T0 + 1, limit=5)] == [entry.id]
