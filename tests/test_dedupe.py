"""The dedupe strategies' pure parts: the lookup template, its config checks, the verdicts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from netwatch.config.schema import Lookup, parse_config
from netwatch.errors import ConfigError
from netwatch.proxy.dedupe import LookupImpossible, parse_template, render, strategy_for, verdict
from netwatch.proxy.queue import Entry


def entry(body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> Entry:
    return Entry(
        id="t", seq=1, order_key="", method="POST", path="/api/applications", query="",
        headers=headers, body=body, idempotency_key="k/1 2", queued_at=0.0, state="queued",
        attempts=0, next_attempt_at=0.0, upstream_status=None, upstream_body=None,
        reason=None, delivered_at=None, size=0,
    )  # fmt: skip


def test_placeholders_are_filled_from_the_stored_request_and_url_encoded() -> None:
    template = parse_template(
        "/api/applications/{body.application.no}?by={header.X-Station}&key={idempotency_key}"
    )
    stored = entry(b'{"application": {"no": "HS/7 \xc3\xa1"}}', (("x-station", "q1&2"),))
    assert render(template, stored) == "/api/applications/HS%2F7%20%C3%A1?by=q1%262&key=k%2F1%202"
    assert render(parse_template("/a/{body.n}"), entry(b'{"n": 42}')) == "/a/42"


@pytest.mark.parametrize(
    ("body", "headers", "url", "why"),
    [
        (b'{"other": 1}', (), "/a/{body.application_no}", "no {body.application_no}"),
        (b"not json", (), "/a/{body.n}", "not JSON"),
        (b'{"n": {"deep": 1}}', (), "/a/{body.n}", "no usable {body.n}"),
        (b'{"n": null}', (), "/a/{body.n}", "has no {body.n}"),
        (b'{"n": ""}', (), "/a/{body.n}", "empty {body.n}"),
        (b"{}", (), "/a/{header.X-No}", "no {header.X-No}"),
    ],
)
def test_a_request_that_cannot_fill_the_template_is_impossible_to_look_up(
    body: bytes, headers: tuple[tuple[str, str], ...], url: str, why: str
) -> None:
    with pytest.raises(LookupImpossible, match=why.replace("{", r"\{").replace("}", r"\}")):
        render(parse_template(url), entry(body, headers))


@pytest.mark.parametrize(
    "url", ["/a/{body}", "/a/{body.}", "/a/{head.X}", "/a/{header.A.B}", "/a/{x", "a/{body.n}"]
)
def test_malformed_templates_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"placeholder|brace|starting with"):
        parse_template(url)


def test_verdicts() -> None:
    lookup = Lookup(url="/a/{idempotency_key}", applied=(200, 204), absent=(404, 410))
    assert [verdict(lookup, s) for s in (200, 204, 404, 410, 500, 403)] == [
        "applied", "applied", "absent", "absent", "unknown", "unknown",
    ]  # fmt: skip


CONFIG = """
site: {id: s}
proxy:
  upstream: "http://127.0.0.1:9"
  dedupe: hold
  replayable:
    - {methods: [POST], path: "/api/applications*",
       dedupe: {lookup: {url: "/api/applications/{body.application_no}"}}}
    - {methods: [PUT, DELETE], path: "/api/*"}
"""


def test_each_rule_has_its_strategy_and_the_default_fills_the_rest() -> None:
    proxy = parse_config(CONFIG).proxy
    assert proxy is not None
    first = strategy_for(proxy.replayable, proxy.dedupe, "POST", "/api/applications")
    assert not isinstance(first, str)
    assert first.lookup.absent == (404,)
    assert strategy_for(proxy.replayable, proxy.dedupe, "DELETE", "/api/x") == "hold"
    assert parse_config(CONFIG.replace("  dedupe: hold\n", "")).proxy.dedupe == "idempotency-key"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "line", "message"),
    [
        (("{body.application_no}", "{body.application no}"), 8, "bad placeholder"),
        (("[POST], path", "[POST, DELETE], path"), 7, "DELETE requests carry no body"),
        (("dedupe: hold", "dedupe: {lookup: {url: '/x/{body.n}'}}"), 3, "default of replayable[1]"),
        (("dedupe: hold", "dedupe: maybe"), 5, "expected idempotency-key, hold or"),
    ],
)
def test_check_config_names_a_lookup_that_cannot_work(
    tmp_path: Path, change: tuple[str, str], line: int, message: str
) -> None:
    text = CONFIG.replace(*change)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(text)
    path = tmp_path / "netwatch.yaml"
    path.write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", "netwatch", "check-config", str(path)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert f"{path}:{line}: proxy" in done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
