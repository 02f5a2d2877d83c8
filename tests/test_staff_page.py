"""The counter staff's page in a real browser: Debian's chromium, driven by Playwright.

A real station proxy in front of the population-database simulator, behind a fault relay:
the link is broken and mended for real, and the page (Vietnamese by default, English with
``?lang=en``) must say so in words and in the banner's colour, on a 1366x768 screenshot.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from helpers.png import read_png
from helpers.relay import FaultRelay
from helpers.servers import free_port, wait_until
from prometheus_client import CollectorRegistry

from netwatch.config.schema import Proxy
from netwatch.demo.simulator import PopulationSimulator, SimulatorSettings
from netwatch.events import EventHub
from netwatch.proxy.station import StationProxy

CHROMIUM = os.environ.get("NETWATCH_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1366, "height": 768}
SITE_NAME = "UBND phường Bến Nghé"

# The banner colours of the page's stylesheet, and how far a screenshot may stray from them.
GREEN, AMBER, BLUE = (0x15, 0x80, 0x3D), (0xF5, 0x9E, 0x0B), (0x1D, 0x4E, 0xD8)
TOLERANCE = 12

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(),
        reason=f"{CHROMIUM} missing: `make deps` installs Debian's chromium",
    ),
]


@asynccontextmanager
async def browser_page(lang: str = "vi") -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport=VIEWPORT, locale=lang)
            yield await context.new_page()
        finally:
            await browser.close()


@asynccontextmanager
async def station(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[StationProxy, Any]]:
    """Simulator <- relay <- proxy, the proxy's replay loops running as in the daemon."""
    async with (
        PopulationSimulator(SimulatorSettings(), host="127.0.0.1", port=0) as sim,
        FaultRelay("127.0.0.1", sim.port) as relay,
    ):
        data: dict[str, Any] = {
            "listen": f"127.0.0.1:{free_port()}",
            "upstream": relay.url,
            "queue": {"path": str(tmp_path / "queue.db")},
            "replay": {"rate": "1000/s", "peak_rate": "1000/s", "backoff_initial": "100ms"},
            "connect_timeout": "1s",
            "request_timeout": "5s",
        }
        data.update(overrides)
        proxy = StationProxy(
            Proxy.model_validate(data),
            "q1-ben-nghe",
            CollectorRegistry(),
            EventHub(),
            lambda: False,
            None,
            site_name=SITE_NAME,
        )
        async with proxy:
            task = asyncio.get_running_loop().create_task(proxy.run())
            try:
                yield proxy, relay
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task


async def post_application(
    proxy: StationProxy, seq: int, *, invalid: bool = False
) -> tuple[int, dict[str, Any]]:
    """One application; the simulator refuses (422) one marked invalid."""
    body: dict[str, Any] = {"station": "counter-1", "seq": seq}
    if invalid:
        body["invalid"] = True
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proxy.url}/api/applications",
            json=body,
            headers={"Netwatch-Order-Key": "counter-1"},
        ) as response,
    ):
        return response.status, await response.json()


async def mode_shown(page: Any, mode: str, timeout: float = 30.0) -> None:
    """The banner says ``mode`` (the page refreshes itself; nothing reloads it here)."""

    async def shown() -> bool:
        return bool(await page.get_attribute("#banner", "data-mode") == mode)

    await wait_until(shown, timeout=timeout, interval=0.2, message=f"banner shows {mode}")


async def screenshot_colour(page: Any, path: Path) -> tuple[int, int, int]:
    """Take a 1366x768 screenshot; the colour in the middle of the banner's left margin."""
    await page.screenshot(path=str(path))
    box = await page.locator("#banner").bounding_box()
    x, y = int(box["x"] + 8), int(box["y"] + box["height"] / 2)
    image = read_png(path, max_rows=y + 1)
    assert (image.width, image.height) == (1366, 768)
    return image.pixel(x, y)


def close_to(colour: tuple[int, int, int], expected: tuple[int, int, int]) -> bool:
    return all(abs(a - b) <= TOLERANCE for a, b in zip(colour, expected, strict=True))


async def text(page: Any) -> str:
    return str(await page.inner_text("body"))


async def look_up(page: Any, ticket: str) -> str:
    await page.fill("#ticket-input", ticket)
    await page.click("#ticket-button")

    async def answered() -> str:
        value = str(await page.inner_text("#ticket-result")).strip()
        return value if value not in ("", "…") else ""

    return await wait_until(answered, timeout=10, interval=0.1, message="ticket answer")


async def test_staff_page_follows_the_link_down_and_back(tmp_path: Path) -> None:
    # A slow replay, so that the blue "replaying" banner lasts long enough to be seen.
    async with (
        station(tmp_path, replay={"rate": "20/m", "peak_rate": "20/m"}) as (proxy, relay),
        browser_page() as page,
    ):
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        # Script errors, and anything the page's Content-Security-Policy had to block.
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on(
            "console",
            lambda message: (
                problems.append(message.text) if "Content Security Policy" in message.text else None
            ),
        )
        await page.goto(f"{proxy.url}/_netwatch/")

        await mode_shown(page, "online")
        colour = await screenshot_colour(page, tmp_path / "online.png")
        assert close_to(colour, GREEN), colour
        body = await text(page)
        assert "Đang gửi hồ sơ ngay" in body
        assert SITE_NAME in body
        assert await page.inner_text("#waiting") == "0"

        relay.mode = "refuse"
        tickets = []
        for seq in range(1, 4):
            status, answer = await post_application(proxy, seq)
            assert status == 202, answer
            tickets.append(answer["ticket"])
        await mode_shown(page, "offline")

        async def three_waiting() -> bool:
            return bool(await page.inner_text("#waiting") == "3")

        await wait_until(three_waiting, timeout=15, interval=0.2, message="3 waiting shown")
        colour = await screenshot_colour(page, tmp_path / "offline.png")
        assert close_to(colour, AMBER), colour
        body = await text(page)
        assert "Mất kết nối: hồ sơ được giữ lại và sẽ tự động gửi" in body
        assert "Hồ sơ chờ lâu nhất" in body
        assert "tiếp nhận lúc" in body  # the oldest entry's time, in the site's time zone
        assert "Đang chờ gửi" in await look_up(page, tickets[0])
        assert "Không tìm thấy" in await look_up(page, "0" * 32)

        relay.mode = "pass"
        await mode_shown(page, "replaying", timeout=40)
        colour = await screenshot_colour(page, tmp_path / "replaying.png")
        assert close_to(colour, BLUE), colour
        assert "đang gửi các hồ sơ đã giữ" in await text(page)

        await mode_shown(page, "online", timeout=60)
        assert await page.inner_text("#waiting") == "0"
        assert await page.inner_text("#last-sent") != "Chưa có"
        assert "Đã gửi thành công" in await look_up(page, tickets[-1])

        assert not problems, problems
        origin = urlsplit(proxy.url).netloc
        assert requests
        assert all(urlsplit(url).netloc == origin for url in requests), requests


async def test_staff_page_in_english_when_asked(tmp_path: Path) -> None:
    async with station(tmp_path) as (proxy, relay), browser_page("en") as page:
        relay.mode = "refuse"
        status, answer = await post_application(proxy, 1)
        assert status == 202, answer
        status, refused = await post_application(proxy, 2, invalid=True)
        assert status == 202, refused
        await page.goto(f"{proxy.url}/_netwatch/?lang=en")
        await mode_shown(page, "offline")
        colour = await screenshot_colour(page, tmp_path / "offline-en.png")
        assert close_to(colour, AMBER), colour
        body = await text(page)
        assert "applications are kept and will be sent automatically" in body
        assert "Applications waiting" in body
        assert "Waiting to be sent" in await look_up(page, answer["ticket"])
        assert await page.inner_text("#operator") == "0"

        # Back online, the database refuses the invalid one: a dead letter for a technician.
        relay.mode = "pass"
        await mode_shown(page, "online", timeout=60)

        async def technician_called() -> str:
            return str(await page.inner_text("#operator-note"))

        note = await wait_until(
            lambda: _contains(technician_called, "1 refused or expired"), timeout=20
        )
        assert note.startswith("Call the technician")
        assert await page.inner_text("#operator") == "1"
        assert "Could not be sent" in await look_up(page, refused["ticket"])
        assert "Sent successfully" in await look_up(page, answer["ticket"])


async def _contains(read: Any, words: str) -> str:
    value = str(await read())
    return value if words in value else ""


async def test_staff_page_works_when_the_status_needs_a_token(tmp_path: Path) -> None:
    async with station(tmp_path, admin_token="s3cret-admin") as (proxy, _), browser_page() as page:
        await page.goto(f"{proxy.url}/_netwatch/")
        await mode_shown(page, "online")
        assert "Đang gửi hồ sơ ngay" in await text(page)
        # The page read the public view, not the protected status.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{proxy.url}/_netwatch/status") as response,
        ):
            assert response.status == 401
