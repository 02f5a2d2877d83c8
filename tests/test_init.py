"""``netwatch init`` writes a first config that the loader accepts, and the queue key beside
the queue; the systemd unit passes ``systemd-analyze verify`` and is hardened."""

from __future__ import annotations

import configparser
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import netwatch
from helpers.systemd import UNIT, unit_for, verify_unit

from netwatch.config.schema import load_config

VENV = Path(sys.executable).parent.parent


def init_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "init",
        "--site",
        "q1-ben-nghe",
        "--name",
        "UBND phường Bến Nghé",
        "--upstream",
        "https://popdb.example:8443/api",
        "--district",
        "Quận 1",
        "--isp",
        "VNPT",
        "-c",
        str(tmp_path / "etc" / "netwatch.yaml"),
        "--queue",
        str(tmp_path / "state" / "queue.db"),
        *extra,
    ]


def test_init_writes_a_config_the_loader_accepts_and_a_private_key(tmp_path: Path) -> None:
    done = netwatch(*init_args(tmp_path))
    assert done.returncode == 0, done.stderr
    config_path = tmp_path / "etc" / "netwatch.yaml"
    config = load_config(config_path, env={})
    assert config.site.id == "q1-ben-nghe"
    assert config.site.name == "UBND phường Bến Nghé"
    assert (config.site.district, config.site.isp) == ("Quận 1", "VNPT")
    assert config.proxy is not None
    assert config.proxy.upstream == "https://popdb.example:8443/api"
    assert config.proxy.queue.path == str(tmp_path / "state" / "queue.db")
    assert config.proxy.queue.key_file == str(tmp_path / "state" / "queue.key")
    assert config.proxy.guard == ("popdb-tcp",)
    target = config.targets[0]
    assert (target.type, target.host, target.port) == ("tcp", "popdb.example", 8443)  # type: ignore[union-attr]

    key = tmp_path / "state" / "queue.key"
    assert len(key.read_bytes()) == 32
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o640
    # check-config, like `run`, finds every referenced file.
    checked = netwatch("check-config", str(config_path))
    assert checked.returncode == 0, checked.stderr


def test_init_refuses_to_overwrite_and_force_keeps_the_key(tmp_path: Path) -> None:
    assert netwatch(*init_args(tmp_path)).returncode == 0
    config_path = tmp_path / "etc" / "netwatch.yaml"
    key = tmp_path / "state" / "queue.key"
    first_config, first_key = config_path.read_text(), key.read_bytes()

    again = netwatch(*init_args(tmp_path))
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"netwatch: error: {config_path} already exists; use --force to overwrite it"
    ]
    assert config_path.read_text() == first_config

    forced = netwatch(*init_args(tmp_path, "--isp", "Viettel", "--force"))
    assert forced.returncode == 0, forced.stderr
    assert "kept" in forced.stdout
    assert load_config(config_path, env={}).site.isp == "Viettel"
    assert key.read_bytes() == first_key  # entries sealed with it stay readable


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--site", "a b", "site.id: 'a b' is not a valid name"),
        ("--upstream", "ftp://popdb", "--upstream: 'ftp://popdb' is not an http:// or https://"),
        ("--timezone", "Mars/Olympus", "site.timezone"),
    ],
)
def test_init_rejects_bad_flags_in_one_line(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    args = init_args(tmp_path)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    done = netwatch(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert message in lines[0]
    assert not (tmp_path / "etc" / "netwatch.yaml").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = tmp_path / "netwatch.service"
    unit.write_text(unit_for(VENV, tmp_path / "etc"), encoding="utf-8")
    verify_unit(unit)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_exposure_stays_low(tmp_path: Path) -> None:
    # systemd's own score of the sandbox, 0 (locked down) to 10 (none); the unit scores 1.7.
    # Dropping any one of ProtectSystem, NoNewPrivileges, CapabilityBoundingSet or User
    # takes it to 1.9 or more: --threshold is in tenths.
    unit = tmp_path / "netwatch.service"
    unit.write_text(unit_for(VENV, tmp_path / "etc"), encoding="utf-8")
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=18", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_a_misspelt_unit_key_fails_the_verification(tmp_path: Path) -> None:
    unit = tmp_path / "netwatch.service"
    unit.write_text(
        unit_for(VENV, tmp_path).replace("NoNewPrivileges", "NoNewPrivilege"), encoding="utf-8"
    )
    with pytest.raises(AssertionError, match="Unknown key"):
        verify_unit(unit)


def test_init_where_it_cannot_write_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    args = init_args(tmp_path)
    args[args.index("-c") + 1] = str(blocker / "netwatch.yaml")
    done = netwatch(*args)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"netwatch: error: {blocker}/netwatch.yaml: cannot write: {blocker} is not a directory"
    ]


def test_unit_is_hardened() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    service = parser["Service"]
    expected = {
        "User": "netwatch",
        "StateDirectory": "netwatch",
        "StateDirectoryMode": "0700",
        "AmbientCapabilities": "CAP_NET_RAW",
        "CapabilityBoundingSet": "CAP_NET_RAW",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
        "ExecReload": "/bin/kill -HUP $MAINPID",
        "ExecStart": "/opt/netwatch/bin/netwatch run -c /etc/netwatch/netwatch.yaml",
        "StandardOutput": "journal",
    }
    assert {key: service.get(key) for key in expected} == expected
