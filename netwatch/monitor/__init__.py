"""The site monitor: probe results -> link states -> metrics and events.

- ``link``: the pure, table-driven link state machine (no I/O);
- ``fault``: the pure, table-driven site-fault verdict over the role-tagged link states;
- ``city``: the site's fault, labels and path traces, exported at scrape time;
- ``schedule``: peak-hour windows in the site's time zone;
- ``runner``: the async driver that schedules probes and feeds the link machine;
- ``metrics`` and ``exposition``: the Prometheus side, rendered at scrape time;
- ``api``: ``/metrics``, ``/healthz`` and ``/api/v1/status``.
"""
