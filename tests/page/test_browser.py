"""The page in a real browser: Debian's headless Chromium, driven by selenium.

A running daemon (as its least-privilege role) serves a shop with orders in
every state. The browser's DOM must agree with the table; a provider's
``<script>`` and an ``<img onerror>`` in a message must show as text and run
nothing (they would set the title, or raise an alert); on a phone's width
nothing but the tables scrolls sideways. Screenshots of both widths are
saved (ORDER_MONITOR_TEST_SCREENSHOTS names a folder to keep them in).

Skipped, saying why, where Chromium or its driver is missing; .ci/run
installs both, and runs this once (in the embedded PostgreSQL's run).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from order_monitor.daemon import Daemon
from order_monitor.providers.fake import FakeProvider
from tests.daemon_fixtures import App, eventually, running, settings_for
from tests.page.dom import Page
from tests.page.shop import count_in_flight, settled, shop

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _why_not() -> str | None:
    if os.environ.get("ORDER_MONITOR_TEST_SKIP_BROWSER"):
        return "ORDER_MONITOR_TEST_SKIP_BROWSER is set (this CI run proves it in the other)"
    for path, package in ((CHROMIUM, "chromium"), (DRIVER, "chromium-driver")):
        if not Path(path).is_file():
            return f"{path} is missing (Debian package {package})"
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=f"no browser: {_why_not()}")


def _browser(user_data: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # As root in a sandboxed CI there is no user namespace for Chromium's own
    # sandbox; the background-networking flags keep it off a network it cannot reach.
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={user_data}",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))


def _look(base: str, shots: Path, user_data: Path) -> dict[str, Any]:
    """Everything the test checks, read in the browser (a thread of its own: selenium blocks)."""
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    shots.mkdir(parents=True, exist_ok=True)
    driver = _browser(user_data)
    try:
        driver.get(f"{base}/")
        seen: dict[str, Any] = {"title": driver.title}
        try:
            seen["alert"] = driver.switch_to.alert.text
        except NoAlertPresentException:
            seen["alert"] = None
        seen["in_flight_total"] = driver.find_element(By.ID, "in-flight-total").text
        row = driver.find_element(By.CSS_SELECTOR, 'tr[data-provider="fake"]')
        seen["fake_in_flight"] = row.find_element(By.CSS_SELECTOR, '[data-field="in-flight"]').text
        seen["gave_up_count"] = driver.find_element(By.ID, "gave-up-count").text
        seen["messages"] = [
            cell.text for cell in driver.find_elements(By.CSS_SELECTOR, '[data-field="message"]')
        ]
        seen["images"] = len(driver.find_elements(By.CSS_SELECTOR, "main img"))
        seen["scripts"] = len(driver.find_elements(By.TAG_NAME, "script"))
        seen["stylesheet_applied"] = driver.execute_script(
            "return getComputedStyle(document.querySelector('.facts')).display"
        )
        driver.save_screenshot(str(shots / "page-desktop.png"))
        driver.set_window_size(390, 844)
        driver.get(f"{base}/")
        seen["phone_overflow"] = driver.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        driver.save_screenshot(str(shots / "page-phone.png"))
        return seen
    finally:
        driver.quit()


async def test_the_page_in_chromium_matches_the_table_and_runs_no_injected_script(
    db: str, app: App, fake: FakeProvider, tmp_path: Path
) -> None:
    await shop(app, fake)
    daemon = Daemon(replace(settings_for(db, fake), http_listen="127.0.0.1:0", page_refresh=1.0))
    shots = Path(os.environ.get("ORDER_MONITOR_TEST_SCREENSHOTS") or tmp_path)
    async with running(daemon), aiohttp.ClientSession() as http:
        assert daemon.http_server is not None
        base = f"http://127.0.0.1:{daemon.http_server.port}"
        await eventually(settled(app), what="the finished orders to be written")

        async def read_since() -> bool:
            # The page's shared reading is a refresh old at most: wait for one
            # made after the writes, as the server answers it.
            async with http.get(f"{base}/") as response:
                return Page(await response.text()).by_id.get("gave-up-count") == "2"

        await eventually(read_since, within=30, what="a reading made after the writes")
        seen = await asyncio.to_thread(_look, base, shots, tmp_path / "chromium")
        in_flight = await count_in_flight(app)

    assert seen["alert"] is None
    assert "pwned" not in seen["title"]
    assert seen["scripts"] == 0
    assert seen["images"] == 0
    assert seen["in_flight_total"] == str(in_flight)
    assert seen["fake_in_flight"] == "2"
    assert seen["gave_up_count"] == "2"
    assert any("<script>document.title='pwned'</script>" in m for m in seen["messages"])
    assert seen["stylesheet_applied"] == "grid"
    assert seen["phone_overflow"] <= 0
    assert (shots / "page-desktop.png").stat().st_size > 10_000
