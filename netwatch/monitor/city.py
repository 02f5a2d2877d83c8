"""The site's part of the city view: its fault verdict, its labels, its path traces.

``SiteFault`` re-judges the site (``netwatch.monitor.fault``) after every link change and tells
listeners when the fault domain moves; ``CityCollector`` exports, at scrape time::

    netwatch_site_info{site,name,district,isp,uplink} 1
    netwatch_target_info{site,target,type,role} 1
    netwatch_site_fault{site,domain}                 one series per domain, 1 on the verdict
    netwatch_site_degraded{site,domain}              idem, for the innermost degraded layer
    netwatch_path_hops{site,target}                  hops listed by the last trace
    netwatch_path_reached{site,target}               the last trace reached the host
    netwatch_path_last_hop{site,target}              the last hop that answered
    netwatch_path_loss_from_hop{site,target}         where loss starts (0: no loss)
    netwatch_path_hop_rtt_seconds{site,target,hop}   mean RTT of the hop (answered hops)
    netwatch_path_hop_loss_ratio{site,target,hop}    loss of the hop

Hops are labelled by their index (at most ``max_hops`` <= 64 series per target), never by
address: addresses change with routing and would grow the series without bound. They are
in ``/api/v1/status`` and ``netwatch probe path``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

import structlog
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from netwatch.config.schema import Config
from netwatch.monitor import fault
from netwatch.monitor.runner import TargetRuntime

log = structlog.get_logger("netwatch.monitor.city")

FaultListener = Callable[[fault.FaultStatus], None]


def _links(targets: Mapping[str, TargetRuntime]) -> list[tuple[str, str, str]]:
    return [(name, rt.spec.role, rt.status.state.value) for name, rt in targets.items()]


class SiteFault:
    """The site's fault verdict, re-judged on every link change."""

    def __init__(
        self,
        targets: Callable[[], Mapping[str, TargetRuntime]],
        now: Callable[[], datetime],
        listeners: Iterable[FaultListener] = (),
    ) -> None:
        self._targets = targets
        self._now = now
        self._listeners = list(listeners)
        self.status = fault.initial(now())

    def add_listener(self, listener: FaultListener) -> None:
        self._listeners.append(listener)

    def refresh(self, *_: object) -> None:
        """Re-judge from the monitor's current link states (a link listener)."""
        self.status, effects = fault.step(self.status, _links(self._targets()), self._now())
        for change in effects:
            log.info(
                "site_fault_changed",
                old=change.old.value,
                new=change.new.value,
                reason=change.reason,
            )
            for listener in self._listeners:
                try:
                    listener(self.status)
                except Exception:  # one faulty listener must not silence the others
                    log.exception("fault_listener_failed")

    def view(self) -> dict[str, Any]:
        """A JSON-ready view for ``/api/v1/status``."""
        verdict = self.status.verdict
        return {
            "domain": verdict.fault.value,
            "since": self.status.since.isoformat(),
            "degraded": verdict.degraded.value,
            "culprits": list(verdict.culprits),
            "reason": verdict.reason,
        }


class CityCollector(Collector):
    """Site labels, target roles, the fault verdict and path traces, at scrape time."""

    def __init__(
        self,
        config: Callable[[], Config],
        targets: Callable[[], Mapping[str, TargetRuntime]],
        site_fault: SiteFault,
    ) -> None:
        self._config = config
        self._targets = targets
        self._fault = site_fault

    def collect(self) -> Iterable[Metric]:
        config = self._config()
        site = config.site
        info = GaugeMetricFamily(
            "netwatch_site_info",
            "The site's labels.",
            labels=["site", "name", "district", "isp", "uplink"],
        )
        info.add_metric([site.id, site.name, site.district, site.isp, site.uplink], 1)
        yield info
        targets = dict(self._targets())
        roles = GaugeMetricFamily(
            "netwatch_target_info", "Each target's role.", labels=["site", "target", "type", "role"]
        )
        for name, rt in targets.items():
            roles.add_metric([site.id, name, rt.spec.type, rt.spec.role], 1)
        yield roles
        verdict = self._fault.status.verdict
        yield from _one_hot(
            "netwatch_site_fault",
            "Where along the site's path the fault is (1 on the verdict).",
            site.id,
            verdict.fault.value,
        )
        yield from _one_hot(
            "netwatch_site_degraded",
            "The innermost layer of the site's path that is degraded or down (1 on it).",
            site.id,
            verdict.degraded.value,
        )
        yield from _path_families(site.id, targets)

    def describe(self) -> Iterable[Metric]:
        return []


def _one_hot(name: str, help_text: str, site: str, current: str) -> Iterator[Metric]:
    family = GaugeMetricFamily(name, help_text, labels=["site", "domain"])
    for domain in fault.DOMAINS:
        family.add_metric([site, domain], 1.0 if domain == current else 0.0)
    yield family


def _path_families(site: str, targets: Mapping[str, TargetRuntime]) -> Iterator[Metric]:
    per_target = ["site", "target"]
    hops = GaugeMetricFamily("netwatch_path_hops", "Hops of the last trace.", labels=per_target)
    reached = GaugeMetricFamily(
        "netwatch_path_reached",
        "The last trace reached the host (1) or not (0).",
        labels=per_target,
    )
    last_hop = GaugeMetricFamily(
        "netwatch_path_last_hop",
        "The last hop that answered in the last trace.",
        labels=per_target,
    )
    loss_from = GaugeMetricFamily(
        "netwatch_path_loss_from_hop",
        "The hop from which every hop of the last trace lost probes (0: none).",
        labels=per_target,
    )
    per_hop = [*per_target, "hop"]
    rtt = GaugeMetricFamily(
        "netwatch_path_hop_rtt_seconds", "Mean RTT of each hop in the last trace.", labels=per_hop
    )
    loss = GaugeMetricFamily(
        "netwatch_path_hop_loss_ratio", "Loss of each hop in the last trace.", labels=per_hop
    )
    for name, rt in targets.items():
        last = rt.last
        if rt.spec.type != "path" or last is None or "hops" not in last.details:
            continue
        details = last.details
        key = [site, name]
        hops.add_metric(key, len(details["hops"]))
        reached.add_metric(key, 1.0 if details["reached"] else 0.0)
        last_hop.add_metric(key, details["last_hop"])
        loss_from.add_metric(key, details["loss_from"] or 0)
        for hop in details["hops"]:
            index = [*key, str(hop["hop"])]
            if hop["rtt_avg"] is not None:
                rtt.add_metric(index, hop["rtt_avg"])
            loss.add_metric(index, hop["loss"])
    yield from (hops, reached, last_hop, loss_from, rtt, loss)
