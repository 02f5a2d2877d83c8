"""The population-database simulator: idempotent apply, faults, control, the compressed day."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections.abc import AsyncIterator
from datetime import time as time_of_day
from typing import Any

import aiohttp
import pytest
from helpers.servers import free_port, wait_for_port

from netwatch.demo.simulator import (
    DayClock,
    PopulationSimulator,
    SimulatorSettings,
    default_outage_plan,
    in_windows,
)


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


@pytest.fixture
async def sim() -> AsyncIterator[PopulationSimulator]:
    async with PopulationSimulator() as simulator:
        yield simulator


async def post(
    http: aiohttp.ClientSession, sim: PopulationSimulator, body: Any, **headers: str
) -> tuple[int, Any, aiohttp.ClientResponse]:
    headers = {k.replace("_", "-"): v for k, v in headers.items()}
    async with http.post(f"{sim.url}/api/applications", json=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp


async def test_binds_a_free_port_and_answers_health(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    assert sim.port > 0
    assert sim.url == f"http://127.0.0.1:{sim.port}"
    async with http.get(f"{sim.url}/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_repeated_idempotency_key_is_applied_once_and_replayed(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    status, first, resp = await post(
        http, sim, {"citizen_id": "079123456789"}, Idempotency_Key="k1"
    )
    assert status == 201
    assert "Idempotent-Replayed" not in resp.headers
    assert set(first) >= {"id", "seq"}
    status, again, resp = await post(
        http, sim, {"citizen_id": "079123456789"}, Idempotency_Key="k1"
    )
    assert (status, again) == (201, first)
    assert resp.headers["Idempotent-Replayed"] == "true"
    assert len(sim.applied) == 1
    assert (sim.stats.applied, sim.stats.replayed) == (1, 1)


async def test_concurrent_requests_with_one_key_apply_once(
    http: aiohttp.ClientSession,
) -> None:
    async with PopulationSimulator(SimulatorSettings(latency_ms=30)) as sim:
        results = await asyncio.gather(
            *(post(http, sim, {"n": 1}, Idempotency_Key="same") for _ in range(5))
        )
    assert {body["id"] for _, body, _ in results} == {"APP-000001"}
    assert len(sim.applied) == 1


async def test_writes_without_a_key_apply_every_time(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    await post(http, sim, {"n": 1})
    await post(http, sim, {"n": 1})
    assert [entry["idempotency_key"] for entry in sim.applied] == [None, None]


async def test_applied_list_records_writes_in_apply_order(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    for seq in range(1, 4):
        body = {"station": "st-1", "seq": seq, "citizen_id": "079000000001"}
        await post(http, sim, body, Idempotency_Key=f"k{seq}", Netwatch_Order_Key="st-1")
    _, created, _ = await post(http, sim, {"station": "st-2", "seq": 1})
    async with http.put(
        f"{sim.url}/api/applications/{created['id']}",
        json={"station": "st-2", "seq": 2, "status": "photo-taken"},
        headers={"Idempotency-Key": "put-1"},
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["version"] == 2
    async with http.get(f"{sim.url}/_sim/applied") as resp:
        applied = await resp.json()
    assert applied == sim.applied
    assert [e["seq"] for e in applied] == [1, 2, 3, 4, 5]
    assert [(e["station"], e["station_seq"]) for e in applied] == [
        ("st-1", 1),
        ("st-1", 2),
        ("st-1", 3),
        ("st-2", 1),
        ("st-2", 2),
    ]
    assert applied[0]["idempotency_key"] == "k1"
    assert applied[0]["order_key"] == "st-1"
    assert applied[0]["method"] == "POST"
    assert applied[0]["path"] == "/api/applications"
    assert applied[0]["body"]["citizen_id"] == "079000000001"
    assert applied[4]["method"] == "PUT"
    assert applied[4]["path"] == f"/api/applications/{created['id']}"
    assert applied[3]["order_key"] is None


async def test_read_surface(sim: PopulationSimulator, http: aiohttp.ClientSession) -> None:
    _, created, _ = await post(http, sim, {"citizen_id": "079000000042"})
    async with http.get(f"{sim.url}/api/applications/{created['id']}") as resp:
        assert resp.status == 200
        assert (await resp.json())["data"] == {"citizen_id": "079000000042"}
    async with http.get(f"{sim.url}/api/applications/APP-999999") as resp:
        assert resp.status == 404
    async with http.get(f"{sim.url}/api/citizens/079000000042") as resp:
        assert await resp.json() == {"id": "079000000042", "applications": [created["id"]]}
    async with http.put(f"{sim.url}/api/applications/APP-999999", json={}) as resp:
        assert resp.status == 404
    assert len(sim.applied) == 1


async def test_invalid_application_gets_422_and_is_not_applied(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    status, body, _ = await post(http, sim, {"invalid": True}, Idempotency_Key="bad")
    assert status == 422
    assert body["error"] == "validation_failed"
    status, _, resp = await post(http, sim, {"invalid": True}, Idempotency_Key="bad")
    assert status == 422
    assert resp.headers["Idempotent-Replayed"] == "true"
    assert sim.applied == []
    assert sim.stats.rejected == 1


async def test_custom_validation_rule(http: aiohttp.ClientSession) -> None:
    def needs_citizen(body: Any) -> str | None:
        return None if "citizen_id" in body else "citizen_id is required"

    async with PopulationSimulator(SimulatorSettings(validate=needs_citizen)) as sim:
        status, body, _ = await post(http, sim, {"name": "x"})
        assert (status, body["detail"]) == (422, "citizen_id is required")


async def test_body_that_is_not_a_json_object_gets_400(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    for data in (b"not json", b"[1, 2]"):
        async with http.post(f"{sim.url}/api/applications", data=data) as resp:
            assert resp.status == 400
    assert sim.applied == []


async def test_http503_outage_answers_503_until_it_ends(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    sim.set_outage(True)
    async with http.get(f"{sim.url}/health") as resp:
        assert resp.status == 503
    status, _, _ = await post(http, sim, {"n": 1}, Idempotency_Key="k")
    assert status == 503
    assert sim.applied == []
    sim.set_outage(False)
    async with http.get(f"{sim.url}/health") as resp:
        assert resp.status == 200
    status, _, _ = await post(http, sim, {"n": 1}, Idempotency_Key="k")
    assert status == 201
    assert sim.stats.outage_503 == 2


async def test_reset_outage_aborts_the_connection_without_an_answer(
    http: aiohttp.ClientSession,
) -> None:
    async with PopulationSimulator(SimulatorSettings(outage_kind="reset")) as sim:
        sim.set_outage(True)
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(http, sim, {"n": 1}, Idempotency_Key="k")
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"{sim.url}/health")
        assert sim.applied == []
        assert sim.stats.outage_resets >= 2  # the client may retry on a fresh connection
        sim.set_outage(False)
        async with http.get(f"{sim.url}/health") as resp:
            assert resp.status == 200


async def test_outage_schedule_follows_elapsed_time(http: aiohttp.ClientSession) -> None:
    clock = FakeTime()
    settings = SimulatorSettings(outages=[(10.0, 20.0)])
    async with PopulationSimulator(settings, clock=clock) as sim:
        statuses = []
        for offset in (0.0, 10.0, 19.9, 20.0):
            clock.now = 1000.0 + offset
            async with http.get(f"{sim.url}/health") as resp:
                statuses.append(resp.status)
        assert statuses == [200, 503, 503, 200]
        sim.set_outage(True)
        assert sim.in_outage()
        sim.set_outage(None)
        assert not sim.in_outage()


async def test_callable_outage_schedule() -> None:
    clock = FakeTime()
    settings = SimulatorSettings(outages=lambda elapsed: elapsed >= 5)
    async with PopulationSimulator(settings, clock=clock) as sim:
        assert not sim.in_outage()
        clock.now += 5
        assert sim.in_outage()


async def test_latency_delays_every_answer(http: aiohttp.ClientSession) -> None:
    async with PopulationSimulator(SimulatorSettings(latency_ms=150, jitter_ms=20)) as sim:
        started = time.monotonic()
        async with http.get(f"{sim.url}/health") as resp:
            assert resp.status == 200
        assert time.monotonic() - started >= 0.13


async def test_error_rate_injects_503s(http: aiohttp.ClientSession) -> None:
    async with PopulationSimulator(SimulatorSettings(error_rate=1.0)) as sim:
        status, _, _ = await post(http, sim, {"n": 1})
        assert status == 503
        async with http.get(f"{sim.url}/health") as resp:
            assert resp.status == 200
        assert sim.stats.injected_errors == 1
        assert sim.applied == []


async def test_control_endpoint_changes_behaviour_at_runtime(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    control = f"{sim.url}/_sim/control"
    async with http.post(control, json={"outage": True, "latency_ms": 5}) as resp:
        state = await resp.json()
        assert (state["outage"], state["latency_ms"]) == (True, 5)
    async with http.get(f"{sim.url}/health") as resp:
        assert resp.status == 503
    async with http.post(control, json={"outage": None, "reject_next": 2, "reject_status": 429}):
        pass
    statuses = [(await post(http, sim, {"n": n}))[0] for n in range(3)]
    assert statuses == [429, 429, 201]
    async with http.post(control, json={"error_rate": 2}) as resp:
        assert resp.status == 400
    async with http.post(control, json={"outage_kind": "reset", "outage": True}) as resp:
        assert (await resp.json())["outage_kind"] == "reset"
    async with http.get(f"{sim.url}/_sim/stats") as resp:
        stats = await resp.json()
    assert stats["applied"] == 1
    assert stats["injected_errors"] == 2
    assert stats["outage"] is True


async def test_control_rejects_unknown_keys(sim: PopulationSimulator) -> None:
    with pytest.raises(ValueError, match="bad control value"):
        sim.control(latency=5)


def test_day_clock_maps_real_seconds_to_the_simulated_day() -> None:
    clock = FakeTime()
    day = DayClock(seconds_per_hour=10, start_hour=7.0, clock=clock)
    assert day.hour() == 7.0
    clock.now += 5
    assert day.hour() == 7.5
    assert day.time_at(5) == time_of_day(7, 30)
    assert day.hour_at(170) == 0.0
    assert day.time_at(175) == time_of_day(0, 30)
    assert day.seconds_until(7.5) == 5
    assert day.seconds_until(6.0) == 230
    assert day.seconds_until(13.5, after_s=50) == 65
    with pytest.raises(ValueError, match="seconds_per_hour"):
        DayClock(seconds_per_hour=0, start_hour=7)


def test_outage_plan_is_seeded_and_clustered_at_peak_hours() -> None:
    day = DayClock(seconds_per_hour=10, start_hour=0.0)
    plan = default_outage_plan(day, 240, seed=7)
    assert plan == default_outage_plan(day, 240, seed=7)
    assert plan != default_outage_plan(day, 240, seed=8)
    assert all(0 <= start < end <= 240 for start, end in plan)
    assert all(a_end < b_start for (_, a_end), (b_start, _) in itertools.pairwise(plan))
    only_peak = default_outage_plan(day, 240, seed=7, off_peak_rate_per_hour=0)
    assert only_peak
    assert all(in_windows(day.hour_at(start)) for start, _ in only_peak)
    many_days = DayClock(seconds_per_hour=1, start_hour=0.0)
    starts = [start % 24 for start, _ in default_outage_plan(many_days, 24 * 30)]
    peak = sum(1 for hour in starts if in_windows(hour))
    assert peak > 2 * (len(starts) - peak)


async def test_module_runs_as_a_script() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(
            sys.executable,
            "-m",
            "netwatch.demo.simulator",
            "--port",
            str(port),
            "--latency-ms",
            "0",
        ),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        await wait_for_port("127.0.0.1", port, timeout=10)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/health") as resp,
        ):
            assert resp.status == 200
    finally:
        proc.terminate()
        stdout, _ = await proc.communicate()
    assert f"http://127.0.0.1:{port}" in stdout.decode()


async def test_every_receipt_is_counted_even_when_the_key_hides_it_from_applied(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    for _ in range(3):
        status, _, _ = await post(http, sim, {"citizen_id": "1"}, Idempotency_Key="k-1")
        assert status == 201
    await post(http, sim, {"citizen_id": "2"}, Idempotency_Key="k-2")
    assert len(sim.applied) == 2
    assert sim.receipt_counts() == {"k-1": 3, "k-2": 1}
    assert sim.received_more_than_once() == {"k-1": 3}
    assert len(sim.received_more_than_once(by="body")) == 1
    async with http.get(f"{sim.url}/_sim/receipts") as resp:
        assert [r["idempotency_key"] for r in await resp.json()] == ["k-1"] * 3 + ["k-2"]


async def test_faults_before_the_api_are_not_receipts(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    sim.set_outage(True)
    status, _, _ = await post(http, sim, {"citizen_id": "1"}, Idempotency_Key="k-1")
    assert status == 503
    assert sim.receipts == []


async def test_naive_upstream_applies_a_repeated_key_again(
    http: aiohttp.ClientSession,
) -> None:
    async with PopulationSimulator(SimulatorSettings(naive=True)) as naive:
        await post(http, naive, {"citizen_id": "1"}, Idempotency_Key="k-1")
        status, _, resp = await post(http, naive, {"citizen_id": "1"}, Idempotency_Key="k-1")
        assert status == 201
        assert "Idempotent-Replayed" not in resp.headers
        assert len(naive.applied) == 2
        assert naive.stats.duplicate_applies == 1
        naive.control(naive=False)
        status, _, resp = await post(http, naive, {"citizen_id": "1"}, Idempotency_Key="k-1")
        assert resp.headers["Idempotent-Replayed"] == "true"
        assert len(naive.applied) == 2


async def test_lookup_by_application_number_and_by_key(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    await post(http, sim, {"citizen_id": "1", "application_no": "HS-7"}, Idempotency_Key="k-7")
    async with http.get(f"{sim.url}/api/applications/HS-7") as resp:
        assert resp.status == 200
        assert (await resp.json())["data"]["application_no"] == "HS-7"
    async with http.get(f"{sim.url}/api/applications/HS-8") as resp:
        assert resp.status == 404
    async with http.get(f"{sim.url}/api/applications/by-key/k-7") as resp:
        assert resp.status == 200
    async with http.get(f"{sim.url}/api/applications/by-key/k-8") as resp:
        assert resp.status == 404


async def test_apply_then_drop_applies_but_never_answers(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    sim.control(after_apply="drop", after_apply_next=1)
    with pytest.raises(aiohttp.ClientError):
        await post(http, sim, {"citizen_id": "1"}, Idempotency_Key="k-1")
    assert len(sim.applied) == 1
    status, _, _ = await post(http, sim, {"citizen_id": "2"}, Idempotency_Key="k-2")
    assert status == 201


async def test_apply_then_stall_applies_before_the_answer_is_late(
    sim: PopulationSimulator, http: aiohttp.ClientSession
) -> None:
    sim.control(after_apply="stall", after_apply_next=1, stall_s=30.0)
    with pytest.raises(asyncio.TimeoutError):
        async with asyncio.timeout(0.5):
            await post(http, sim, {"citizen_id": "1"}, Idempotency_Key="k-1")
    assert len(sim.applied) == 1


async def test_bad_after_apply_control_is_refused(sim: PopulationSimulator) -> None:
    with pytest.raises(ValueError, match="after_apply"):
        sim.control(after_apply="explode")
