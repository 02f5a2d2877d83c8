"""The site monitor: probe results -> link states -> metrics and events.

- ``link``: the pure, table-driven link state machine (no I/O);
- ``schedule``: peak-hour windows in the site's time zone;
- ``runner``: the async driver that schedules probes and feeds the link machine;
- ``metrics`` and ``exposition``: the Prometheus side, rendered at scrape time;
- ``api``: ``/metrics``, ``/healthz`` and ``/api/v1/status``.
"""
