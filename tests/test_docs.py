"""The operator docs hold together: the README's first screen links the Vietnamese README and
the install guides, links stay inside the repository, the README's ACL is the shipped one, the
detection-time table agrees with the rule it explains, and the packaging files agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from netwatch.config.units import parse_duration

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "README.vi.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_first_screen_links_the_vietnamese_readme_and_the_install_guides() -> None:
    first_screen = "\n".join((ROOT / "README.md").read_text(encoding="utf-8").splitlines()[:25])
    for target in ("README.vi.md", "docs/install.md", "docs/install.vi.md"):
        assert f"]({target})" in first_screen, target
        assert (ROOT / target).is_file(), target


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository_and_exist(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = (doc.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name}: {target} points outside the repo"
        assert resolved.exists(), f"{doc.name}: {target} does not exist"
    assert "shared/CONTRACT" not in text


def test_readme_acl_is_the_shipped_acl() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("`config/mosquitto/acl`", 1)[1].split("```\n", 2)[1]
    shipped = (ROOT / "config" / "mosquitto" / "acl").read_text(encoding="utf-8")
    rules = [line for line in shipped.splitlines() if line.strip() and not line.startswith("#")]
    assert [line for line in block.splitlines() if line.strip()] == rules


def test_detection_table_follows_the_rule_it_explains() -> None:
    # Detection takes ((fail_after - 1) x interval, fail_after x interval], plus the
    # timeout when each failing round waits for it (a black-holed link).
    guide = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    section = guide.split("### How long detection takes", 1)[1].split("###", 1)[0]
    rows = re.findall(
        r"^\| (\S+)(?: \(default\))? \| (\d+)(?: \(default\))? \| (\S+) \| (.+?) \| (.+?) \|$",
        section,
        re.MULTILINE,
    )
    assert len(rows) >= 3, section
    for interval_text, fail_text, timeout_text, refused, black_holed in rows:
        interval, fail_after = parse_duration(interval_text), int(fail_text)
        timeout = parse_duration(timeout_text)
        low, high = (fail_after - 1) * interval, fail_after * interval
        assert refused == f"{low:g} to {high:g} s"
        assert black_holed == f"{low + timeout:g} to {high + timeout:g} s"
    vietnamese = (ROOT / "docs" / "install.vi.md").read_text(encoding="utf-8")
    assert vietnamese.count(" giây |") == 2 * len(rows)


def test_license_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = []
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied += line.split()[1:-1]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not any(source == i or source.startswith(i.rstrip("/") + "/") for i in ignored)
    assert {".git", ".venv", "tests"} <= ignored
