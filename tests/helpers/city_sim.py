"""Many simulated netwatch sites behind one loopback HTTP server.

Each "shard" of sites is one scrape target, ``/shard/{n}/metrics``, so a Prometheus (agent)
sees one target per site (``per_shard=1``) or fewer, bigger targets for thousands of sites.
Every series carries its site's ``site`` label, as a real netwatch daemon's do. Faults are
set at any time with :meth:`CitySim.set_faults`:

``silent``        the site's series stop (its WAN is down: nothing reaches the centre)
``service_down``  the site reports its ``service``-role target down (netwatch_link_up 0)
``slow``          the service answers, slowly (latency, not loss)

    async with CitySim(make_city(300)) as sim:
        sim.targets        # ["127.0.0.1:PORT/shard/0/metrics", ...] -> scrape configs
        sim.set_faults({site.id: "silent" for site in isp_sites})
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from .city import NORMAL_LATENCY, SERVICE, SLOW_LATENCY, TARGETS, Fault, Site
from .servers import run_http_server

DOMAINS = ("none", "lan", "isp", "core", "service")
PROBES_PER_SECOND = 1.0


@dataclass
class _Probe:
    """The service target's probe history: a histogram's count and sum advanced in time."""

    t0: float
    last: float
    count: int = 0
    total: float = 0.0

    def advance(self, now: float, latency: float) -> None:
        count = int((now - self.t0) * PROBES_PER_SECOND)
        self.total += (count - self.count) * latency
        self.count = count
        self.last = now


@dataclass
class _SiteState:
    site: Site
    static: str
    probe: _Probe
    fault: Fault | None = None


def _labels(**labels: str) -> str:
    return ",".join(f'{k}="{v}"' for k, v in labels.items())


class CitySim:
    def __init__(self, city: Sequence[Site], per_shard: int = 1) -> None:
        now = time.time()
        self.city = list(city)
        self.per_shard = per_shard
        self.scrapes = 0
        self._states = [_SiteState(s, self._static(s), _Probe(now, now)) for s in self.city]
        self._server: Any = None
        self.url = ""

    @staticmethod
    def _static(site: Site) -> str:
        lines = [
            "netwatch_site_info{"
            + _labels(
                site=site.id,
                name=site.name,
                district=site.district,
                isp=site.isp,
                uplink=site.uplink,
            )
            + "} 1",
            f'netwatch_peak_hours{{site="{site.id}"}} 1',
        ]
        for target, kind, role in TARGETS:
            ids = _labels(site=site.id, target=target, type=kind)
            lines.append(f'netwatch_target_info{{{ids},role="{role}"}} 1')
            if target != SERVICE:
                lines.append(f"netwatch_link_up{{{ids}}} 1")
        return "\n".join(lines) + "\n"

    @property
    def shards(self) -> int:
        return -(-len(self._states) // self.per_shard)

    @property
    def targets(self) -> list[tuple[str, str, str | None]]:
        """(host:port, metrics path, site or None) per shard."""
        host = self.url.removeprefix("http://")
        return [
            (
                host,
                f"/shard/{n}/metrics",
                self.city[n].id if self.per_shard == 1 else None,
            )
            for n in range(self.shards)
        ]

    def set_faults(self, faults: dict[str, Fault]) -> float:
        """Replace every site's fault (sites not named are healthy); returns the time."""
        now = time.time()
        for state in self._states:
            state.fault = faults.get(state.site.id)
        return now

    def _site_text(self, state: _SiteState, now: float) -> str:
        fault = state.fault
        down = fault == "service_down"
        state.probe.advance(now, SLOW_LATENCY if fault == "slow" else NORMAL_LATENCY)
        ids = _labels(site=state.site.id, target=SERVICE, type="http")
        now_state = "down" if down else "degraded" if fault == "slow" else "up"
        domain = "service" if down else "none"
        lines = [
            state.static,
            f"netwatch_link_up{{{ids}}} {0 if down else 1}\n",
            *(
                f'netwatch_link_state{{{ids},state="{s}"}} {int(s == now_state)}\n'
                for s in ("up", "degraded", "down")
            ),
            f'netwatch_probe_duration_seconds_bucket{{{ids},le="+Inf"}} {state.probe.count}\n',
            f"netwatch_probe_duration_seconds_count{{{ids}}} {state.probe.count}\n",
            f"netwatch_probe_duration_seconds_sum{{{ids}}} {state.probe.total:.3f}\n",
            *(
                f'netwatch_site_fault{{site="{state.site.id}",domain="{d}"}} {int(d == domain)}\n'
                for d in DOMAINS
            ),
        ]
        return "".join(lines)

    async def _metrics(self, request: web.Request) -> web.Response:
        shard = int(request.match_info["shard"])
        chosen = self._states[shard * self.per_shard : (shard + 1) * self.per_shard]
        if not chosen:
            raise web.HTTPNotFound()
        now = time.time()
        live = [s for s in chosen if s.fault != "silent"]
        self.scrapes += 1
        if not live:
            # A cut-off site does not answer at all.
            raise web.HTTPServiceUnavailable()
        body = "".join(self._site_text(s, now) for s in live)
        return web.Response(text=body, content_type="text/plain", charset="utf-8")

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_get("/shard/{shard}/metrics", self._metrics)
        self._server = run_http_server(app)
        self.url = await self._server.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._server.__aexit__(exc_type, exc, tb)
