"""Files a config refers to (CA bundles, client certificate, queue key, queue directory):
``check-config`` finds what ``run`` would trip on, with the same located lines, and a
missing file is exit 2 for every command."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme
import yaml
from helpers.cli import netwatch

from netwatch.proxy.crypto import generate_key_file


def write(path: Path, config: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def config_with(tmp_path: Path, *, ca: Path, cert: Path, key: Path, queue_key: Path) -> dict:  # type: ignore[type-arg]
    return {
        "site": {"id": "lab"},
        "targets": [
            {"name": "api", "type": "http", "url": "https://api.example/", "ca_file": str(ca)}
        ],
        "mqtt": {
            "url": "mqtts://127.0.0.1:8883",
            "ca_file": str(ca),
            "cert_file": str(cert),
            "key_file": str(key),
        },
        "proxy": {
            "upstream": "http://127.0.0.1:9",
            "ca_file": str(ca),
            "queue": {"path": str(tmp_path / "state" / "queue.db"), "key_file": str(queue_key)},
        },
    }


def test_present_files_pass(tmp_path: Path) -> None:
    authority = trustme.CA()
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "client.pem", tmp_path / "client.key"
    authority.cert_pem.write_to_path(str(ca))
    issued = authority.issue_cert("site.example")
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    queue_key = generate_key_file(tmp_path / "state" / "queue.key")
    config = write(
        tmp_path / "site.yaml",
        config_with(tmp_path, ca=ca, cert=cert, key=key, queue_key=queue_key),
    )
    done = netwatch("check-config", str(config))
    assert done.returncode == 0, done.stderr


def test_check_config_and_run_report_the_same_missing_files(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    t = tmp_path
    config = tmp_path / "site.yaml"
    config.write_text(
        f"""site: {{id: lab}}
targets:
  - name: api
    type: http
    url: https://api.example/
    ca_file: {t}/no-ca.pem
mqtt:
  url: mqtts://127.0.0.1:8883
  ca_file: {t}/no-ca.pem
  cert_file: {t}/no-cert.pem
  key_file: {t}/no-cert.key
proxy:
  upstream: http://127.0.0.1:9
  ca_file: {t}/no-ca.pem
  queue:
    path: {blocker}/queue.db
    key_file: {t}/no.key
""",
        encoding="utf-8",
    )
    missing = "No such file or directory"
    expected = [
        f"{config}:6: targets[0].ca_file: cannot load {t}/no-ca.pem: {missing}",
        f"{config}:9: mqtt.ca_file: cannot load {t}/no-ca.pem: {missing}",
        f"{config}:10: mqtt.cert_file: cannot load {t}/no-cert.pem with {t}/no-cert.key: {missing}",
        f"{config}:14: proxy.ca_file: cannot load {t}/no-ca.pem: {missing}",
        f"{config}:16: proxy.queue.path: {blocker} is not a directory: "
        f"the queue {blocker}/queue.db cannot be created",
        f"{config}:17: proxy.queue.key_file: {t}/no.key: key file not found "
        f"(create one with `netwatch queue keygen {t}/no.key`)",
    ]
    checked = netwatch("check-config", str(config))
    assert checked.returncode == 2
    assert checked.stderr.strip().splitlines() == expected
    for command in ("run", "proxy"):
        started = netwatch(command, "-c", str(config))
        assert started.returncode == 2, command
        assert started.stderr.strip().splitlines() == checked.stderr.strip().splitlines()


def test_a_key_of_the_wrong_size_is_named_with_its_line(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    config = tmp_path / "site.yaml"
    config.write_text(
        f"""site: {{id: lab}}
proxy:
  upstream: http://127.0.0.1:9
  queue:
    path: {tmp_path}/queue.db
    key_file: {short}
""",
        encoding="utf-8",
    )
    done = netwatch("check-config", str(config))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"{config}:6: proxy.queue.key_file: {short}: a queue key is exactly 32 raw bytes, "
        "this file has 16"
    ]


@pytest.mark.parametrize(
    "args",
    [
        ("check-config", "{missing}"),
        ("run", "-c", "{missing}"),
        ("proxy", "-c", "{missing}"),
        ("status", "-c", "{missing}"),
        ("queue", "list", "-c", "{missing}"),
        ("queue", "list", "--queue", "{missing}"),
        ("queue", "list", "--queue", "{queue}", "--key-file", "{missing}"),
    ],
)
def test_a_missing_file_is_exit_2_everywhere(tmp_path: Path, args: tuple[str, ...]) -> None:
    missing = tmp_path / "missing"
    done = netwatch(*(a.format(missing=missing, queue=tmp_path / "q.db") for a in args))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(missing) in lines[0]
    assert "Traceback" not in done.stderr


def test_skip_files_checks_the_file_alone(tmp_path: Path) -> None:
    config = tmp_path / "site.yaml"
    config.write_text(
        "site: {id: lab}\nproxy:\n  upstream: http://127.0.0.1:9\n"
        f"  queue: {{path: {tmp_path}/q.db, key_file: {tmp_path}/absent.key}}\n",
        encoding="utf-8",
    )
    assert netwatch("check-config", str(config)).returncode == 2
    skipped = netwatch("check-config", "--skip-files", str(config))
    assert skipped.returncode == 0, skipped.stderr
    assert skipped.stdout.strip() == f"{config}: ok (0 targets, proxy on 127.0.0.1:8080)"
