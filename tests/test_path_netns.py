"""Real multi-hop paths: a client, two routers and a destination, each in its own network
namespace (``helpers.netchain``), and nftables rules on a router to make loss start there.

``netwatch probe path`` and ``netwatch run`` run inside the client namespace, so every hop
is a real kernel forwarding the packet and answering its expired TTL. They need root, ``ip``
and ``nft``, and are skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.netchain import NetChain, unavailable_reason
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.netns

METRICS = "127.0.0.1:9108"  # inside the client namespace: nothing else listens there


@pytest.fixture
def chain() -> Iterator[NetChain]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with closing(NetChain.create(routers=2)) as chain:
        yield chain


def trace(chain: NetChain, *args: str) -> tuple[int, dict[str, Any]]:
    done = chain.exec(
        chain.client,
        [
            sys.executable,
            "-m",
            "netwatch",
            "probe",
            "path",
            chain.destination_address,
            "--json",
            *args,
        ],
    )
    assert "Traceback" not in done.stderr, done.stderr
    data: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, data


@pytest.mark.parametrize("protocol", ["icmp", "udp"])
def test_a_trace_sees_every_router_then_the_destination(chain: NetChain, protocol: str) -> None:
    code, result = trace(chain, "--protocol", protocol)
    assert code == 0, result
    details = result["details"]
    assert details["reached"] is True
    assert [h["address"] for h in details["hops"]] == chain.hops
    assert [h["loss"] for h in details["hops"]] == [0.0, 0.0, 0.0]
    assert all(h["rtt_avg"] > 0 for h in details["hops"])
    assert (details["last_hop"], details["loss_from"]) == (3, None)
    # Nothing was sent past the destination after round 1 told where it is.
    assert details["probes_sent"] <= 3 * 3 + 4


@pytest.mark.parametrize(("router", "protocol"), [(1, "icmp"), (2, "icmp"), (2, "udp")])
def test_loss_starts_at_the_router_that_drops(chain: NetChain, router: int, protocol: str) -> None:
    chain.drop_at(router)
    code, result = trace(chain, "--protocol", protocol, "--max-hops", "8")
    assert code == 1
    assert result["success"] is False
    details = result["details"]
    assert details["reached"] is False
    assert details["last_hop"] == router - 1
    assert details["loss_from"] == router
    assert [h["address"] for h in details["hops"]] == [*chain.hops[: router - 1], None]
    assert details["hops"][-1]["loss"] == 1.0
    chain.undrop_at(router)
    code, result = trace(chain, "--protocol", protocol)
    assert code == 0
    assert result["details"]["loss_from"] is None


# --- the daemon in the client namespace --------------------------------------------------------


_GET = (
    "import sys, urllib.request; "
    "sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
)


def fetch(chain: NetChain, path: str) -> str | None:
    """GET a daemon URL from inside the client namespace (None when it does not answer)."""
    done = chain.exec(chain.client, [sys.executable, "-c", _GET, f"http://{METRICS}{path}"])
    return done.stdout if done.returncode == 0 else None


def scrape(chain: NetChain) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(fetch(chain, "/metrics") or ""):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def status(chain: NetChain) -> dict[str, Any]:
    text = fetch(chain, "/api/v1/status")
    assert text is not None
    data: dict[str, Any] = json.loads(text)
    return data


def netwatch_status(chain: NetChain) -> str:
    """``netwatch status`` as an operator in the office runs it (wide terminal)."""
    argv = ["env", "COLUMNS=200", sys.executable, "-m", "netwatch", "status"]
    done = chain.exec(chain.client, [*argv, "--url", f"http://{METRICS}"])
    assert done.returncode == 0, done.stderr
    return done.stdout


def sample(metrics: dict[Any, float], name: str, **labels: str) -> float | None:
    for (n, lbls), v in metrics.items():
        if n == name and all(dict(lbls).get(k) == val for k, val in labels.items()):
            return v
    return None


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(check)
        if last:
            return last
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@pytest.mark.slow
@pytest.mark.timeout(110)
async def test_the_daemon_exports_hops_and_names_the_failing_layer(
    chain: NetChain, tmp_path: Path
) -> None:
    gw, edge, dest = chain.hops
    config = {
        "site": {"id": "q1-ben-nghe", "district": "Quận 1", "isp": "VNPT", "timezone": "UTC"},
        "defaults": {"interval": "500ms", "timeout": "400ms"},
        "link": {"fail_after": 2, "recover_after": 2},
        "metrics": {"listen": METRICS},
        "targets": [
            {"name": "lan-gw", "type": "icmp", "host": gw, "count": 1, "role": "gateway"},
            {"name": "isp-edge", "type": "icmp", "host": edge, "count": 1, "role": "isp"},
            {"name": "popdb", "type": "icmp", "host": dest, "count": 1},
            {
                "name": "popdb-path",
                "type": "path",
                "host": dest,
                # Routers answer expired TTLs at about 1/s (Linux icmp_ratelimit): a
                # faster trace would show them losing probes.
                "interval": "3s",
                "timeout": "400ms",
                "rounds": 2,
                "spacing": "100ms",
                "max_hops": 6,
            },
        ],
    }
    cfg = tmp_path / "netwatch.yaml"
    cfg.write_text(yaml.safe_dump(config, allow_unicode=True))
    argv = [sys.executable, "-m", "netwatch", "--log-format", "json", "run", "-c", str(cfg)]
    daemon = chain.popen(chain.client, argv, tmp_path / "daemon.log")
    try:

        def reached_with_three_hops() -> dict[Any, float] | None:
            m = scrape(chain)
            ok = sample(m, "netwatch_path_reached", target="popdb-path") == 1.0
            ok = ok and sample(m, "netwatch_site_fault", domain="none") == 1.0
            ok = ok and sample(m, "netwatch_link_up", target="isp-edge") == 1.0
            return m if ok and sample(m, "netwatch_path_hops", target="popdb-path") == 3 else None

        m = await until(reached_with_three_hops, 30, "a 3-hop trace and no fault")
        for hop in ("1", "2", "3"):
            rtt = sample(m, "netwatch_path_hop_rtt_seconds", target="popdb-path", hop=hop)
            assert rtt is not None
            assert 0 < rtt < 0.4
            assert sample(m, "netwatch_path_hop_loss_ratio", target="popdb-path", hop=hop) == 0.0
        assert sample(m, "netwatch_path_loss_from_hop", target="popdb-path") == 0
        info = sample(m, "netwatch_site_info", site="q1-ben-nghe", district="Quận 1", isp="VNPT")
        assert info == 1.0
        # Hop addresses are in the status, never in a label.
        assert not any("10.77." in v for (_, lbls) in m for _, v in lbls)
        path = next(t for t in status(chain)["targets"] if t["name"] == "popdb-path")["path"]
        assert [h["address"] for h in path["hops"]] == chain.hops
        route = " > ".join(chain.hops)
        assert f"path popdb-path: reached in 3 hops  {route}" in netwatch_status(chain)

        chain.drop_at(2)  # the ISP's edge goes silent: isp, and the trace dies at hop 2

        def isp_fault() -> dict[Any, float] | None:
            m = scrape(chain)
            ok = sample(m, "netwatch_site_fault", domain="isp") == 1.0
            ok = ok and sample(m, "netwatch_path_reached", target="popdb-path") == 0.0
            return m if ok else None

        m = await until(isp_fault, 30, "fault isp and an unreached trace")
        assert sample(m, "netwatch_path_loss_from_hop", target="popdb-path") == 2
        assert sample(m, "netwatch_path_last_hop", target="popdb-path") == 1
        assert sample(m, "netwatch_path_hop_loss_ratio", target="popdb-path", hop="2") == 1.0
        assert sample(m, "netwatch_path_hop_rtt_seconds", target="popdb-path", hop="2") is None
        assert sample(m, "netwatch_path_hop_loss_ratio", target="popdb-path", hop="3") is None
        assert [sample(m, "netwatch_site_fault", domain=d) for d in ("none", "lan", "core")] == [
            0.0,
            0.0,
            0.0,
        ]
        fault = status(chain)["fault"]
        assert (fault["domain"], fault["culprits"]) == ("isp", ["isp-edge"])
        shown = netwatch_status(chain)
        assert "fault isp since" in shown
        expected = f"path popdb-path: not reached, last answer hop 1, loss from hop 2  {gw} > ???"
        assert expected in shown

        chain.undrop_at(2)
        chain.drop_at(1)  # now the office's own gateway: lan

        def lan_fault() -> bool:
            return sample(scrape(chain), "netwatch_site_fault", domain="lan") == 1.0

        await until(lan_fault, 30, "fault lan")
    finally:
        daemon.kill()
        daemon.wait(10)


def test_a_local_firewall_refusing_the_probes_is_named(chain: NetChain) -> None:
    nft = ["nft", "add"]
    chain.run(chain.client, [*nft, "table", "inet", "block"])
    chain.run(
        chain.client,
        [*nft, "chain", "inet", "block", "out", "{ type filter hook output priority 0; }"],
    )
    chain.run(
        chain.client, [*nft, "rule", "inet", "block", "out", "ip", "daddr", "10.77.0.0/16", "drop"]
    )
    code, result = trace(chain, "--protocol", "icmp", "--max-hops", "4")
    assert code == 1
    assert result["error"] == "unreachable"
    assert result["message"].startswith("cannot send: ")
