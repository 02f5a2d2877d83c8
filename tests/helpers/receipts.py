"""One assertion for "each write reached the population database once": by receipts.

The simulator answers a repeated ``Idempotency-Key`` from its record, so ``applied`` never
shows a second send; its *receipts* do (every write that reached the API, with the
simulator's elapsed time). ``assert_received_once`` checks them:

- every key in ``expected`` was received (a lost write fails);
- no key was received twice, unless the test itself caused the re-send (``resent``: a
  station that retried with the same key), or a disruption the test injected (a SIGKILL,
  a relay fault: ``disruptions``, in the simulator's elapsed seconds) fell between two
  receipts of it, which is what makes an entry *in doubt* (it may have been applied
  without an answer reaching the proxy); with ``by="body"`` the same for request bodies.

Receipts come from ``sim.receipts`` or, for a simulator in another process, from
``GET /_sim/receipts``; both are lists of dicts with ``idempotency_key``, ``body_sha256``
and ``elapsed_s``.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

# A receipt may be logged a moment after the fault that cut its answer (bytes already in
# the simulator's socket buffer), so a disruption counts from this long before it.
DISRUPTION_SLACK_S = 1.0


def receipt_times(
    receipts: Iterable[Mapping[str, Any]], by: Literal["key", "body"] = "key"
) -> dict[str, list[float]]:
    """Arrival times (simulator elapsed seconds) of each key (or body digest)."""
    field = "idempotency_key" if by == "key" else "body_sha256"
    times: defaultdict[str, list[float]] = defaultdict(list)
    for receipt in receipts:
        name = receipt[field]
        if name is not None:
            times[name].append(float(receipt["elapsed_s"]))
    return dict(times)


def _explained(times: Sequence[float], disruptions: Sequence[float]) -> bool:
    """Every receipt after the first has a disruption between it and the one before."""
    ordered = sorted(times)
    return all(
        any(first - DISRUPTION_SLACK_S <= d <= second for d in disruptions)
        for first, second in itertools.pairwise(ordered)
    )


def repeated_receipts(
    receipts: Iterable[Mapping[str, Any]],
    *,
    resent: Collection[str] = (),
    disruptions: Sequence[float] = (),
    by: Literal["key", "body"] = "key",
) -> dict[str, int]:
    """Keys (or bodies) received more than once with no excuse, with their counts."""
    return {
        name: len(times)
        for name, times in receipt_times(receipts, by).items()
        if len(times) > 1 and name not in resent and not _explained(times, disruptions)
    }


def assert_received_once(
    receipts: Iterable[Mapping[str, Any]],
    expected: Collection[str] | None = None,
    *,
    resent: Collection[str] = (),
    disruptions: Sequence[float] = (),
    by: Literal["key", "body"] = "key",
) -> None:
    """Fail unless each ``expected`` key arrived, and none arrived twice without an excuse."""
    rows = list(receipts)
    seen = receipt_times(rows, by)
    if expected is not None:
        missing = sorted(set(expected) - set(seen))
        assert not missing, f"{len(missing)} writes never reached the upstream: {missing[:10]}"
    twice = repeated_receipts(rows, resent=resent, disruptions=disruptions, by=by)
    assert not twice, (
        f"{len(twice)} writes reached the upstream more than once with no fault between "
        f"the sends: {dict(sorted(twice.items())[:10])}"
    )
