"""The command line: the only place that parses argv, configures logging and picks exit codes.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad config. Errors are one line on
stderr; ``--debug`` shows the traceback.

Every command imports what it needs when it runs: ``run`` and ``proxy`` stay up for months on
small machines, so they must not carry the tables, the demo or the queue tools in memory.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

import click
import structlog

from netwatch import __version__
from netwatch.errors import ConfigError, NetwatchError, UsageError
from netwatch.logs import configure_logging
from netwatch.words import plural


class _State:
    debug = False


class _Commands(click.Group):
    """The top-level group; the commands defined in other modules are imported only when
    invoked (or listed by ``--help``)."""

    lazy: ClassVar[Mapping[str, str]] = MappingProxyType(
        {"queue": "netwatch.proxy.queue_cmd:queue"}
    )

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        where = self.lazy.get(cmd_name)
        if where is None:
            return super().get_command(ctx, cmd_name)
        module, _, name = where.partition(":")
        command: click.Command = getattr(importlib.import_module(module), name)
        return command


def _fail(message: str, code: int) -> None:
    click.echo(f"netwatch: error: {message}", err=True)
    sys.exit(code)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="netwatch")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default="auto",
    show_default=True,
    help="auto: JSON lines when stderr is not a terminal.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def cli(debug: bool, log_format: str, log_level: str) -> None:
    """netwatch: link monitoring and offline queue-and-replay for ID-card issuing sites."""
    _State.debug = debug
    configure_logging("debug" if debug else log_level, log_format)  # type: ignore[arg-type]


config_option = click.option(
    "-c",
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The site's YAML config file.",
)


def _raise_open_file_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every station connection, upstream
    connection and probe holds a descriptor, and services often start with a soft 1024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, _NOFILE_WHEN_UNLIMITED)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:  # e.g. above the kernel's nr_open: keep the soft one
        structlog.get_logger("netwatch").warning("open_file_limit_kept", soft=soft, error=str(exc))
        return
    structlog.get_logger("netwatch").info("open_file_limit_raised", soft=soft, to=target)


_NOFILE_WHEN_UNLIMITED = 1 << 20


@cli.command()
@config_option
def run(config_path: Path) -> None:
    """Run the site daemon: probes, link states, metrics, MQTT, and the proxy if configured."""
    from netwatch import loop
    from netwatch.daemon import run_daemon

    _raise_open_file_limit()
    loop.run(run_daemon(config_path, role="site"))


@cli.command()
@config_option
def proxy(config_path: Path) -> None:
    """Run only the station proxy (with its own guard probe of the upstream)."""
    from netwatch.config.schema import load_config
    from netwatch.daemon import run_daemon

    if load_config(config_path).proxy is None:
        raise ConfigError(f"{config_path}: proxy: section missing; `netwatch proxy` needs it")
    from netwatch import loop

    _raise_open_file_limit()
    loop.run(run_daemon(config_path, role="proxy"))


@cli.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--skip-files",
    is_flag=True,
    help="Do not check the files it names (CA, certificates, key, queue): for a config "
    "checked away from its site.",
)
def check_config(path: Path, skip_files: bool) -> None:
    """Validate a config file and the files it names: exit 0, or 2 with one line per problem."""
    from netwatch.config.files import check_files
    from netwatch.config.schema import load_config

    config = load_config(path)
    if not skip_files:
        check_files(config, path)
    extra = f", proxy on {config.proxy.listen}" if config.proxy else ""
    click.echo(f"{path}: ok ({plural(len(config.targets), 'target')}{extra})")


@cli.command()
@click.argument(
    "probe_type",
    metavar="TYPE",
    type=click.Choice(["icmp", "tcp", "http", "dns", "tls", "path"]),
)
@click.argument("target")
@click.option("--timeout", default="2s", show_default=True, help="Probe timeout (e.g. 500ms, 2s).")
@click.option("--count", default=5, show_default=True, help="icmp: echoes per round.")
@click.option("--expect-status", multiple=True, type=int, help="http: accepted status (repeat).")
@click.option("--body-regex", default=None, help="http: the body must match this regex.")
@click.option("--insecure", is_flag=True, help="http/tls: do not verify the certificate.")
@click.option("--record", default="A", type=click.Choice(["A", "AAAA"]), help="dns: record type.")
@click.option("--server", default=None, help="dns: nameserver host[:port].")
@click.option("--expect", multiple=True, help="dns: expected address (repeat).")
@click.option("--rounds", default=3, show_default=True, help="path: probes per hop.")
@click.option("--max-hops", default=30, show_default=True, help="path: the longest path traced.")
@click.option(
    "--protocol",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "icmp", "udp"]),
    help="path: icmp (root or CAP_NET_RAW) or udp; auto picks icmp when allowed.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def probe(
    probe_type: str,
    target: str,
    timeout: str,
    count: int,
    expect_status: tuple[int, ...],
    body_regex: str | None,
    insecure: bool,
    record: str,
    server: str | None,
    expect: tuple[str, ...],
    rounds: int,
    max_hops: int,
    protocol: str,
    as_json: bool,
) -> None:
    """Run one probe now: icmp HOST, tcp HOST:PORT, http URL, dns NAME, tls HOST[:PORT],
    path HOST (an mtr-style trace)."""
    from netwatch.oneshot import probe_params, render_result, run_probe

    params = probe_params(
        probe_type,
        target,
        count=count,
        expect_status=expect_status,
        body_regex=body_regex,
        insecure=insecure,
        record=record,
        server=server,
        expect=expect,
        rounds=rounds,
        max_hops=max_hops,
        protocol=protocol,
    )
    result = run_probe(probe_type, params, timeout)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, default=str))
    else:
        render_result(result)
    sys.exit(0 if result.success else 1)


@cli.command()
@click.option(
    "--url", default=None, help="Daemon base URL [default: from -c, else http://127.0.0.1:9108]."
)
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON status.")
@click.option(
    "--token",
    envvar="NETWATCH_TOKEN",
    default=None,
    help="Bearer token (metrics.token or proxy.admin_token) [env: NETWATCH_TOKEN].",
)
def status(url: str | None, config_path: Path | None, as_json: bool, token: str | None) -> None:
    """Show link states, proxy mode and queue depth of a running daemon."""
    from netwatch.oneshot import fetch_status, render_status

    if url is None:
        listen = "127.0.0.1:9108"
        if config_path is not None:
            from netwatch.config.schema import load_config

            config = load_config(config_path)
            listen = config.metrics.listen
            token = token or config.metrics.token
        host, _, port = listen.rpartition(":")
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '', '::') else host}:{port}"
    data = fetch_status(url, token=token or None)
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        render_status(data)


@cli.command()
@click.option("--duration", default=60.0, show_default=True, type=float, help="Seconds to run.")
@click.option(
    "--seconds-per-hour",
    default=4.0,
    show_default=True,
    type=float,
    help="How many real seconds one simulated hour lasts.",
)
@click.option("--stations", default=3, show_default=True, type=int, help="Simulated stations.")
@click.option("--seed", default=7, show_default=True, type=int)
@click.option("--metrics-port", default=0, type=int, help="Port for /metrics [default: free port].")
@click.option(
    "--upstream",
    type=click.Choice(["dedupe", "naive"]),
    default="dedupe",
    show_default=True,
    help="naive: the database ignores Idempotency-Key (the proxy looks writes in doubt up).",
)
@click.pass_context
def demo(
    ctx: click.Context,
    duration: float,
    seconds_per_hour: float,
    stations: int,
    seed: int,
    metrics_port: int,
    upstream: str,
) -> None:
    """Everything on loopback: simulated population database, daemon, proxy and stations."""
    from netwatch.demo.run import DemoOptions, run_demo

    root = ctx.find_root()
    if root.params.get("log_level") == "info" and not root.params.get("debug"):
        # The live view owns the terminal (and the summary reports dead letters): only
        # errors go to stderr unless --log-level asks for more.
        configure_logging("error", root.params.get("log_format", "auto"))

    if duration <= 0 or seconds_per_hour <= 0 or stations < 0:
        raise UsageError("--duration and --seconds-per-hour must be positive, --stations >= 0")
    from netwatch import loop

    summary = loop.run(
        run_demo(
            DemoOptions(
                duration=duration,
                seconds_per_hour=seconds_per_hour,
                stations=stations,
                seed=seed,
                metrics_port=metrics_port,
                upstream=upstream,
            )
        )
    )
    sys.exit(0 if summary.ok else 1)


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def keygen(path: Path) -> None:
    """Create a queue encryption key file (32 random bytes, mode 0600)."""
    from netwatch.proxy.crypto import generate_key_file

    generate_key_file(path)
    click.echo(f"{path}: key written (keep it safe: queued entries cannot be read without it)")


@cli.command()
@click.option("--site", "site_id", required=True, help="Site id, e.g. q1-ben-nghe.")
@click.option("--name", required=True, help='Site name, e.g. "UBND phường Bến Nghé".')
@click.option("--upstream", required=True, help="The population database API's base URL.")
@click.option("--district", default="", help="District label (city view).")
@click.option("--isp", default="", help="ISP label (city view).")
@click.option("--timezone", default="Asia/Ho_Chi_Minh", show_default=True)
@click.option(
    "--queue",
    "queue_path",
    default="/var/lib/netwatch/queue.db",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Queue file; its key is made beside it (queue.key).",
)
@click.option(
    "-c",
    "--config",
    "config_path",
    default="/etc/netwatch/netwatch.yaml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the config.",
)
@click.option(
    "--listen", default="0.0.0.0:8080", show_default=True, help="Where stations reach the proxy."
)
@click.option("--metrics-listen", default="127.0.0.1:9108", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing config (never a key).")
def init(
    site_id: str,
    name: str,
    upstream: str,
    district: str,
    isp: str,
    timezone: str,
    queue_path: Path,
    config_path: Path,
    listen: str,
    metrics_listen: str,
    force: bool,
) -> None:
    """Write a site's first config and its queue key."""
    from netwatch.siteinit import SiteAnswers, write_site

    answers = SiteAnswers(
        site_id=site_id,
        name=name,
        upstream=upstream,
        district=district,
        isp=isp,
        timezone=timezone,
        queue=queue_path,
        proxy_listen=listen,
        metrics_listen=metrics_listen,
    )
    written = write_site(answers, config_path, force=force)
    key = "written" if written.key_created else "kept (it already existed)"
    click.echo(f"{written.config_path}: config written for site {written.config.site.id}")
    click.echo(f"{written.key_path}: queue key {key}; back it up (docs/install.md)")
    click.echo(f"next: netwatch check-config {written.config_path}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: maps every error to one line and an exit code."""
    try:
        cli.main(args=argv, prog_name="netwatch", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 1)
    except click.ClickException as exc:
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            click.echo(exc.ctx.get_usage(), err=True)
        _fail(exc.format_message(), 2 if isinstance(exc, click.UsageError) else exc.exit_code)
    except NetwatchError as exc:
        if _State.debug:
            raise
        if isinstance(exc, ConfigError):
            for line in exc.problems:
                click.echo(line, err=True)
            sys.exit(exc.exit_code)
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        if _State.debug:
            raise
        _fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)
