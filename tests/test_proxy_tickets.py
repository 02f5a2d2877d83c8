"""The ticket a station gets is the contract's: ``GET /_netwatch/tickets/{id}`` answers
``{"ticket", "state", "attempts", "upstream_status", "queued_at", "delivered_at"}``, and a
queued write keeps the station's ``Netwatch-Order-Key``. (Mutation testing found both
unguarded: renamed fields and a dropped order key survived.)"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import aiohttp
from helpers.servers import wait_until
from test_proxy import make_settings, post, running, ticket_state

from netwatch.demo.simulator import PopulationSimulator


async def test_a_ticket_answers_the_contract_fields_through_its_life(
    tmp_path: Path, sim: PopulationSimulator
) -> None:
    async with (
        aiohttp.ClientSession() as client,
        running(make_settings(tmp_path, sim.url)) as proxy,
    ):
        async with client.get(f"{proxy.url}/_netwatch/tickets/{'0' * 32}") as response:
            assert (response.status, await response.json()) == (404, {"error": "unknown_ticket"})
        proxy.override("offline")
        _, answer, _ = await post(
            client, proxy, {"citizen_id": "1"}, **{"Netwatch-Order-Key": "st-7"}
        )
        ticket = answer["ticket"]
        (entry,) = await proxy.queue.list()
        assert (entry.id, entry.order_key) == (ticket, "st-7")
        queued = await ticket_state(client, proxy, ticket)
        assert queued == {
            "ticket": ticket,
            "state": "queued",
            "attempts": 0,
            "upstream_status": None,
            "queued_at": answer["queued_at"],
            "delivered_at": None,
            "reason": None,
            "attempts_in_doubt": 0,
            "awaiting_operator": False,
        }
        proxy.override("auto")
        await wait_until(lambda: proxy.mode == "online", timeout=10)
        delivered = await ticket_state(client, proxy, ticket)
    assert (delivered["ticket"], delivered["state"]) == (ticket, "delivered")
    assert (delivered["attempts"], delivered["upstream_status"]) == (1, 201)
    assert delivered["queued_at"] == answer["queued_at"]
    queued_at = datetime.fromisoformat(delivered["queued_at"])
    delivered_at = datetime.fromisoformat(delivered["delivered_at"])
    assert queued_at <= delivered_at
    assert sim.receipts[0]["order_key"] == "st-7"
