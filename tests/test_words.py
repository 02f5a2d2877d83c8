"""Counts read as English: "1 target", "2 targets", "1 entry", "0 entries"."""

from __future__ import annotations

from pathlib import Path

from helpers.cli import netwatch

from netwatch.words import plural


def test_plural_agrees_with_the_count() -> None:
    assert plural(1, "target") == "1 target"
    assert plural(0, "target") == "0 targets"
    assert plural(2, "dead letter") == "2 dead letters"
    assert plural(1, "entry", "entries") == "1 entry"
    assert plural(5, "entry", "entries") == "5 entries"


def test_check_config_says_1_target(tmp_path: Path) -> None:
    config = tmp_path / "one.yaml"
    config.write_text(
        "site: {id: lab}\ntargets:\n  - {name: gw, type: tcp, host: 127.0.0.1, port: 9}\n",
        encoding="utf-8",
    )
    done = netwatch("check-config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{config}: ok (1 target)"
