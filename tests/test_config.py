"""Config loading: every problem is one `FILE:LINE: KEY.PATH: message` line, all at once."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import typing
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from netwatch.config.schema import (
    Config,
    DnsTarget,
    HttpTarget,
    IcmpTarget,
    PathTarget,
    TcpTarget,
    TlsTarget,
    load_config,
    parse_config,
)
from netwatch.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "netwatch.example.yaml"
MINIMAL = REPO / "config" / "netwatch.minimal.yaml"

Problems = Callable[..., list[str]]


@pytest.fixture
def problems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Problems:
    """Write the text to ./site.yaml and return the problem lines load_config reports."""
    monkeypatch.chdir(tmp_path)

    def check(text: str, env: Mapping[str, str] | None = None) -> list[str]:
        Path("site.yaml").write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            load_config("site.yaml", env=env or {})
        return info.value.problems

    return check


def load(text: str, env: Mapping[str, str] | None = None) -> Config:
    return parse_config(textwrap.dedent(text), "site.yaml", env=env or {})


# --- valid files --------------------------------------------------------------------------


def test_example_config_is_valid_and_has_every_target_type() -> None:
    config = load_config(EXAMPLE, env={})
    types = {type(t) for t in config.targets}
    assert types == {IcmpTarget, TcpTarget, HttpTarget, DnsTarget, TlsTarget, PathTarget}
    assert config.mqtt is not None
    assert config.proxy is not None
    assert config.proxy.guard == ("popdb-api", "popdb-tcp")


def test_minimal_config_is_valid() -> None:
    config = load_config(MINIMAL, env={})
    assert config.site.id == "lab"
    assert len(config.targets) == 1
    assert config.mqtt is None
    assert config.proxy is None


def _fields_by_model(value: object, seen: dict[type[BaseModel], set[str]]) -> None:
    """Collect, per model class, the keys written in the file (explicitly set fields)."""
    if isinstance(value, BaseModel):
        seen.setdefault(type(value), set()).update(value.model_fields_set)
        for name in type(value).model_fields:
            _fields_by_model(getattr(value, name), seen)
    elif isinstance(value, tuple):
        for item in value:
            _fields_by_model(item, seen)


def _all_models(model: type[BaseModel], out: set[type[BaseModel]]) -> None:
    out.add(model)
    for field in model.model_fields.values():
        stack: list[object] = [field.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                if tp not in out:
                    _all_models(tp, out)
            else:
                stack.extend(typing.get_args(tp))


def test_example_config_sets_every_key_of_every_section() -> None:
    config = load_config(EXAMPLE, env={})
    seen: dict[type[BaseModel], set[str]] = {}
    _fields_by_model(config, seen)
    models: set[type[BaseModel]] = set()
    _all_models(Config, models)
    # Keys common to every target type need documenting once, on any target.
    targets = (IcmpTarget, TcpTarget, HttpTarget, DnsTarget, TlsTarget, PathTarget)
    common = set.intersection(*(set(t.model_fields) for t in targets)) - {"type"}
    seen_on_targets = set.union(*(seen.get(t, set()) for t in targets))
    missing = {
        f"{model.__name__}.{name}"
        for model in models
        for name in model.model_fields
        if name not in seen.get(model, set())
        and not (model in targets and name in common and name in seen_on_targets)
    }
    assert missing == set()


def test_unquoted_times_of_day_are_read_as_text_not_base60_integers() -> None:
    config = load(
        """
        site: {id: s}
        peak_hours:
          - {days: [mon-fri], start: 7:30, end: 13:30}
          - {days: [sat], start: 07:30, end: 11:30}
        """
    )
    assert [(w.start, w.end) for w in config.peak_hours] == [("07:30", "13:30"), ("07:30", "11:30")]


def test_yes_and_no_keep_their_meaning_where_the_schema_expects_words() -> None:
    config = load(
        """
        site: {id: s}
        targets: [{name: gw, type: icmp, host: 192.0.2.1, privileged: no}]
        """
    )
    target = config.targets[0]
    assert isinstance(target, IcmpTarget)
    assert target.privileged == "no"


def test_yaml_anchors_and_merge_keys_work() -> None:
    config = load(
        """
        site: {id: s}
        targets:
          - &web {name: a, type: tcp, host: popdb.example, port: 443}
          - {<<: *web, name: b, port: 8443}
        """
    )
    assert [(t.name, getattr(t, "port", None)) for t in config.targets] == [
        ("a", 443),
        ("b", 8443),
    ]


def test_config_objects_are_frozen_all_the_way_down() -> None:
    config = load_config(EXAMPLE, env={})
    with pytest.raises(ValidationError, match="frozen"):
        config.site = config.site
    with pytest.raises(ValidationError, match="frozen"):
        config.targets[0].name = "other"
    http = config.targets[0]
    assert isinstance(http, HttpTarget)
    with pytest.raises(TypeError):
        http.headers["X-Injected"] = "1"  # type: ignore[index]
    assert config.model_dump()["targets"][0]["headers"]["User-Agent"] == "netwatch"


def test_validating_a_large_valid_config_is_fast() -> None:
    lines = ["site: {id: s}", "targets:"]
    lines += [
        f"  - {{name: t{i}, type: tcp, host: 192.0.2.{i % 250}, port: 443}}" for i in range(500)
    ]
    text = "\n".join(lines)
    started = time.perf_counter()
    config = parse_config(text, "big.yaml", env={})
    elapsed = time.perf_counter() - started
    assert len(config.targets) == 500
    # About 20 ms with libyaml, 150 ms without; the bound only catches a pathological slowdown.
    assert elapsed < 1.0


def test_config_built_in_python_still_rejects_duplicate_target_names() -> None:
    target = {"name": "a", "type": "tcp", "host": "h", "port": 1}
    with pytest.raises(ValidationError, match=r"targets\[1\]\.name: duplicate target name 'a'"):
        Config.model_validate({"site": {"id": "s"}, "targets": [target, target]})


# --- one line per problem, at the right line -----------------------------------------------


def test_discriminator_tag_is_dropped_from_the_path(problems: Problems) -> None:
    assert problems(
        """
        site:
          id: s
        targets:
          - {name: a, type: http, url: "https://popdb.example/"}
          - name: b
            type: tcp
            host: popdb.example
            port: 70000
        """
    ) == ["site.yaml:8: targets[1].port: Input should be less than or equal to 65535"]


def test_unknown_key_is_reported_at_its_line_with_a_suggestion(problems: Problems) -> None:
    assert problems(
        """
        site: {id: s}
        defaults:
          interval: 5s
          timout: 2s
        colour: blue
        """
    ) == [
        "site.yaml:4: defaults.timout: unknown key (did you mean 'timeout'?)",
        "site.yaml:5: colour: unknown key",
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("defaults: {interval: 5 seconds}", "defaults.interval: '5 seconds' is not a duration"),
        ("defaults: {timeout: -2s}", "defaults.timeout: '-2s' is not a duration"),
        ("defaults: {timeout: 0}", "defaults.timeout: a duration must be positive"),
        (
            "proxy: {upstream: 'http://u.example', queue: {max_bytes: 1 parsec}}",
            "proxy.queue.max_bytes: '1 parsec' is not a size",
        ),
        (
            "proxy: {upstream: 'http://u.example', replay: {rate: fast}}",
            "proxy.replay.rate: 'fast' is not a rate",
        ),
        (
            "peak_hours: [{start: '25:00', end: '11:30'}]",
            "peak_hours[0].start: '25:00' is not a time of day",
        ),
        (
            "peak_hours: [{start: 7.30, end: '11:30'}]",
            "peak_hours[0].start: 7.3 is not a time of day",
        ),
        (
            "peak_hours: [{days: [mon, funday], start: '07:30', end: '11:30'}]",
            "peak_hours[0].days: 'funday' is not a day",
        ),
        (
            "peak_hours: [{days: [mon-xyz], start: '07:30', end: '11:30'}]",
            "peak_hours[0].days: 'mon-xyz' is not a day range",
        ),
        ("peak_hours: [{start: '07:30', end: '07:30'}]", "peak_hours[0]: start and end are equal"),
        ("metrics: {listen: 9108}", "metrics.listen: expected text, got 9108"),
        ("metrics: {listen: localhost}", "metrics.listen: 'localhost' is not host:port"),
        (
            "mqtt: {url: 'http://broker.example'}",
            "mqtt.url: 'http://broker.example' is not an mqtt:// or mqtts:// URL",
        ),
        (
            "targets: [{name: 'bad name', type: icmp, host: h}]",
            "targets[0].name: 'bad name' is not a valid name",
        ),
        (
            "targets: [{name: a, type: ping, host: h}]",
            "targets[0].type: unknown type 'ping' "
            "(use one of 'icmp', 'tcp', 'http', 'dns', 'tls', 'path')",
        ),
        ("targets: [{name: a, host: h}]", "targets[0].type: missing required key"),
        ("targets: {name: a}", "targets: expected a list, got a mapping"),
        ("link: {degraded_loss: 2}", "link.degraded_loss: Input should be less than or equal to 1"),
        ("mqtt: on", "mqtt: expected a mapping, got the boolean true"),
    ],
)
def test_bad_values_give_one_readable_line(problems: Problems, line: str, expected: str) -> None:
    found = problems(f"site: {{id: s}}\n{line}\n")
    assert len(found) == 1
    assert found[0].startswith(f"site.yaml:2: {expected}")
    assert "Value error" not in found[0]


def test_bad_timezone(problems: Problems) -> None:
    assert problems("site:\n  id: s\n  timezone: Asia/Saigon_City\n") == [
        "site.yaml:3: site.timezone: unknown timezone 'Asia/Saigon_City'"
        " (use an IANA name such as Asia/Ho_Chi_Minh)"
    ]


def test_duplicate_target_name_points_at_the_second_one(problems: Problems) -> None:
    assert problems(
        """
        site: {id: s}
        targets:
          - {name: popdb-api, type: tcp, host: popdb.example, port: 443}
          - {name: popdb-gw, type: icmp, host: 192.0.2.1}
          - name: popdb-api
            type: icmp
            host: 192.0.2.2
        """
    ) == [
        "site.yaml:5: targets[2].name: duplicate target name 'popdb-api'"
        " (already used by targets[0])"
    ]


def test_missing_required_field_points_at_the_parent_mapping(problems: Problems) -> None:
    assert problems(
        """
        # a comment first
        targets:
          - name: a
            type: tcp
            host: popdb.example
        proxy:
          listen: "127.0.0.1:8080"
        """
    ) == [
        "site.yaml:2: site: missing required key",
        "site.yaml:3: targets[0].port: missing required key",
        "site.yaml:6: proxy.upstream: missing required key",
    ]


def test_proxy_guard_must_name_a_known_target(problems: Problems) -> None:
    assert problems(
        """
        site: {id: s}
        targets: [{name: popdb-api, type: tcp, host: popdb.example, port: 443}]
        proxy:
          upstream: "https://popdb.example"
          guard:
            - popdb-api
            - popdb-apii
            - nothing
        """
    ) == [
        "site.yaml:7: proxy.guard[1]: unknown target 'popdb-apii' (did you mean 'popdb-api'?)",
        "site.yaml:8: proxy.guard[2]: unknown target 'nothing'",
    ]


def test_duplicate_yaml_keys_are_an_error_not_an_override(problems: Problems) -> None:
    assert problems(
        """
        site: {id: s}
        defaults:
          interval: 5s
          interval: 10s
        """
    ) == ["site.yaml:4: defaults.interval: duplicate key (first at line 3)"]


def test_all_problems_are_reported_at_once_in_file_order(problems: Problems) -> None:
    found = problems(
        """
        site: {id: s, timezone: Nowhere}
        defaults: {interval: soon}
        targets:
          - {name: a, type: tcp, host: h, port: 0}
          - {name: a, type: dns}
        proxy: {upstream: "https://u.example", guard: [b]}
        """
    )
    assert [line.split(": ")[0] for line in found] == [
        "site.yaml:1",
        "site.yaml:2",
        "site.yaml:4",
        "site.yaml:5",
        "site.yaml:5",
        "site.yaml:6",
    ]
    assert [line.split(": ")[1] for line in found] == [
        "site.timezone",
        "defaults.interval",
        "targets[0].port",
        "targets[1].name",
        "targets[1].query",
        "proxy.guard[0]",
    ]


# --- whole-file problems ------------------------------------------------------------------


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.problems == [f"{missing}: cannot read config: No such file or directory"]


def test_invalid_yaml_names_the_line(problems: Problems) -> None:
    assert problems(
        """
        site: {id: s}
        targets:
          - name: a
           type: tcp
        """
    ) == ["site.yaml:4: invalid YAML: expected <block end>, but found '<block mapping start>'"]
    assert problems("site: {id: s}\nmetrics:\n  listen: a: b\n") == [
        "site.yaml:3: invalid YAML: mapping values are not allowed here"
    ]


def test_unknown_yaml_tag_is_invalid_yaml(problems: Problems) -> None:
    found = problems("site: {id: !!python/name:os.system s}\n")
    assert found[0].startswith("site.yaml:1: invalid YAML: could not determine a constructor")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file(problems: Problems, text: str) -> None:
    assert problems(text) == [
        "site.yaml:1: (top level): the file is empty (at least site.id is needed)"
    ]


def test_top_level_must_be_a_mapping(problems: Problems) -> None:
    assert problems("# sections\n- site\n- targets\n") == [
        "site.yaml:2: (top level): expected a mapping of sections (site, targets, ...), got a list"
    ]


# --- ${ENV} references --------------------------------------------------------------------


def test_env_references_are_expanded_before_validation() -> None:
    config = load(
        """
        site: {id: "${SITE_ID}"}
        targets: [{name: a, type: tcp, host: h, port: "${PORT}"}]
        mqtt:
          username: ${MQTT_USER:-netwatch}
          password: ${MQTT_PASSWORD}
          client_id: "nw-${SITE_ID}-$${literal}"
          ca_file: ${CA_FILE:-}
        """,
        env={"SITE_ID": "q1", "PORT": "8443", "MQTT_PASSWORD": "s3cr$t"},
    )
    assert config.site.id == "q1"
    assert config.targets[0].port == 8443  # type: ignore[union-attr]
    assert config.mqtt is not None
    assert config.mqtt.username == "netwatch"
    assert config.mqtt.password == "s3cr$t"
    assert config.mqtt.client_id == "nw-q1-${literal}"
    assert config.mqtt.ca_file is None


def test_unset_env_variable_is_an_error_at_its_key(problems: Problems) -> None:
    assert problems(
        """
        site: {id: s}
        mqtt:
          url: "mqtts://127.0.0.1:8883"
          password: ${MQTT_PASSWORD}
          username: "${MQTT_USER:-netwatch}"
        targets: [{name: a, type: tcp, host: h, port: "${PORT}"}]
        """
    ) == [
        "site.yaml:4: mqtt.password: environment variable MQTT_PASSWORD is not set",
        "site.yaml:6: targets[0].port: environment variable PORT is not set",
    ]


def test_env_value_is_validated_like_a_written_one(problems: Problems) -> None:
    assert problems(
        "site: {id: s}\ndefaults: {interval: '${EVERY}'}\n", env={"EVERY": "often"}
    ) == ["site.yaml:2: defaults.interval: 'often' is not a duration (use 500ms, 5s, 2m, 72h)"]


def test_parse_config_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NETWATCH_TEST_SITE", "from-env")
    config = parse_config("site: {id: '${NETWATCH_TEST_SITE}'}\n")
    assert config.site.id == "from-env"


# --- netwatch check-config ----------------------------------------------------------------


def _check_config(path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETWATCH_")}
    return subprocess.run(
        [sys.executable, "-m", "netwatch", "check-config", str(path), *options],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
        check=False,
    )


def test_check_config_accepts_the_example() -> None:
    # Its CA and certificate paths are a site's, not this machine's.
    result = _check_config(EXAMPLE, "--skip-files")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{EXAMPLE}: ok (7 targets")
    assert result.stderr == ""


def test_check_config_prints_one_line_per_problem_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "site: {id: s}\n"
        "targets:\n"
        "  - {name: a, type: tcp, host: h, port: 70000}\n"
        "  - {name: a, type: icmp, host: 192.0.2.1, colour: red}\n",
        encoding="utf-8",
    )
    result = _check_config(bad)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{bad}:3: targets[0].port: Input should be less than or equal to 65535",
        f"{bad}:4: targets[1].name: duplicate target name 'a' (already used by targets[0])",
        f"{bad}:4: targets[1].colour: unknown key",
    ]
