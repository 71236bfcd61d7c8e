"""The operator page of a running daemon, on the real database, as the daemon's own role.

Orders in every state the page distinguishes: in flight and waiting,
finished with a PIN, failed with a hostile message, given up by this daemon
and given up before it started, and in flight with a provider id nobody
serves. What the page says is compared with the table itself.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from dataclasses import replace
from typing import Any

import aiohttp
import pytest

from order_monitor.daemon import Daemon
from order_monitor.providers.fake import FakeProvider
from order_monitor.redaction import Secret
from tests.daemon_fixtures import App, eventually, running, settings_for
from tests.page.dom import Page
from tests.page.shop import PIN, TOKEN, count_in_flight, settled, shop


async def _get(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, str, Any]:
    async with http.get(url, **kwargs) as response:
        return response.status, await response.text(), response.headers


async def test_the_page_shows_what_the_table_holds_and_never_a_pin(
    db: str, app: App, fake: FakeProvider
) -> None:
    ids = await shop(app, fake)
    settings = replace(settings_for(db, fake), http_listen="127.0.0.1:0", page_refresh=1.0)
    daemon = Daemon(settings)
    async with running(daemon), aiohttp.ClientSession() as http:
        assert daemon.http_server is not None
        base = f"http://127.0.0.1:{daemon.http_server.port}"
        await eventually(settled(app), what="the finished orders to be written")

        async def page_in_step() -> bool:
            # The page's reading is up to a refresh old: wait for one made after the writes.
            status, html, _ = await _get(http, f"{base}/")
            page = Page(html)
            return status == 200 and page.by_id.get("gave-up-count") == "2"

        await eventually(page_in_step, within=30, what="the page to list both give-ups")
        status, html, headers = await _get(http, f"{base}/")
        assert status == 200
        page = Page(html)

        in_flight = await count_in_flight(app)
        assert in_flight == 3  # wait-1, wait-2, nobody-1
        assert page.by_id["in-flight-total"] == str(in_flight)
        assert page.fields[("data-provider", "fake")]["in-flight"] == "2"
        assert page.fields[("data-unserved", "nobody")]["in-flight"] == "1"
        assert page.by_id["role"] == "leader"
        assert page.by_id["listener"] == "up"
        # Checks of the hour: done-1, fail-1, old-1 and the waiting ones' checks.
        assert int(page.fields[("data-provider", "fake")]["checks"]) >= 3
        assert page.fields[("data-provider", "fake")]["circuit"] == "closed"

        listed = {key[1] for key in page.fields if key[0] == "data-order"}
        assert listed == {str(ids["old-1"]), str(ids["earlier-1"])}

        # Never the PIN, in any form; hostile text shown as text.
        assert PIN not in html
        for raw in ("<script>", "<img", "\u202e", "\u200b"):
            assert raw not in html
        assert "&lt;img src=x onerror=alert(1)&gt; \\u200bzero-width" in html
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert headers["Cache-Control"] == "no-store"
        assert "script-src" not in headers["Content-Security-Policy"]

        # One order: as check --dry-run shows it, no PIN, the message's PIN masked.
        status, html, _ = await _get(http, f"{base}/order", params={"id": str(ids["done-1"])})
        order = Page(html)
        assert status == 200
        assert PIN not in html
        assert order.by_id["last-message"].startswith("not shown")
        assert order.by_id["in-flight"].startswith("no")
        assert order.by_id["external-status"] == "done"

        status, html, _ = await _get(http, f"{base}/order", params={"id": str(ids["fail-1"])})
        assert "<script>" not in html
        assert "&lt;script&gt;document.title=" in html
        assert "\\u202eevil\\u202c" in html

        status, html, _ = await _get(http, f"{base}/order", params={"id": str(ids["wait-1"])})
        next_check = Page(html).by_id["next-check"]
        assert re.match(r"(in|overdue by) \S+, at \d{4}-\d\d-\d\d", next_check) or (
            next_check == "being checked now"
        ), next_check

        status, html, _ = await _get(http, f"{base}/order", params={"id": "not-a-uuid"})
        assert status == 400
        status, html, _ = await _get(
            http, f"{base}/order", params={"id": "00000000-0000-4000-8000-000000000000"}
        )
        assert status == 200
        assert "No order with this id" in html

        # A human deals with the order that gave up: it leaves the list at the next reading.
        await app.conn.execute(
            """UPDATE product_orders SET status = 'approved', "externalStatus" = 'completed'
               WHERE id = %s""",
            (ids["earlier-1"],),
        )

        async def dealt_with() -> bool:
            _, html, _ = await _get(http, f"{base}/")
            return Page(html).by_id.get("gave-up-count") == "1"

        await eventually(dealt_with, within=30, what="the dealt-with order to leave the list")


async def test_fifty_viewers_cost_one_reading_per_refresh_and_healthz_keeps_answering(
    db: str, app: App, fake: FakeProvider
) -> None:
    await shop(app, fake)
    settings = replace(settings_for(db, fake), http_listen="127.0.0.1:0", page_refresh=2.0)
    daemon = Daemon(settings)
    async with (
        running(daemon),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http,
    ):
        assert daemon.http_server is not None
        assert daemon.page is not None
        base = f"http://127.0.0.1:{daemon.http_server.port}"
        before = daemon.page.shared.computed
        started = time.monotonic()
        stop = asyncio.Event()
        pages = 0
        health: list[float] = []

        async def viewer() -> None:
            nonlocal pages
            while not stop.is_set():
                status, _, _ = await _get(http, f"{base}/")
                assert status == 200
                pages += 1

        async def prober() -> None:
            while not stop.is_set():
                asked = time.monotonic()
                status, _, _ = await _get(http, f"{base}/healthz")
                assert status == 200
                health.append(time.monotonic() - asked)
                await asyncio.sleep(0.1)

        tasks = [asyncio.create_task(viewer()) for _ in range(50)]
        tasks.append(asyncio.create_task(prober()))
        await asyncio.sleep(5)
        stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        readings = daemon.page.shared.computed - before

    assert pages >= 50, pages
    # One reading per refresh interval, plus the one under way when the run began.
    assert 1 <= readings <= elapsed / 2.0 + 1, (readings, elapsed)
    assert health
    assert max(health) < 2.0, max(health)


async def test_the_page_needs_its_token_and_checks_it_in_every_form(
    db: str, app: App, fake: FakeProvider
) -> None:
    settings = replace(settings_for(db, fake), http_listen="127.0.0.1:0", page_token=Secret(TOKEN))
    daemon = Daemon(settings)
    async with running(daemon), aiohttp.ClientSession() as http:
        assert daemon.http_server is not None
        base = f"http://127.0.0.1:{daemon.http_server.port}"
        status, html, headers = await _get(http, f"{base}/")
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Basic ")
        assert TOKEN not in html
        basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
        status, _, _ = await _get(http, f"{base}/", headers={"Authorization": f"Basic {basic}"})
        assert status == 200
        status, _, _ = await _get(http, f"{base}/", headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200
        for wrong in (f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Basic !!!", "Basic "):
            status, _, _ = await _get(http, f"{base}/", headers={"Authorization": wrong})
            assert status == 401, wrong
        # The probes stay open, as before: a load balancer has no token.
        status, _, _ = await _get(http, f"{base}/healthz")
        assert status == 200


async def test_without_a_token_the_page_is_loopback_only(
    db: str, app: App, fake: FakeProvider
) -> None:
    daemon = Daemon(replace(settings_for(db, fake), http_listen="127.0.0.1:0"))
    async with running(daemon), aiohttp.ClientSession() as http:
        assert daemon.http_server is not None
        base = f"http://127.0.0.1:{daemon.http_server.port}"
        # DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends its own name.
        status, _, _ = await _get(http, f"{base}/", headers={"Host": "evil.example:9187"})
        assert status == 403
        status, _, _ = await _get(http, f"{base}/", headers={"Host": "localhost:9187"})
        assert status == 200

    exposed = Daemon(replace(settings_for(db, fake), http_listen="0.0.0.0:0"))
    async with running(exposed), aiohttp.ClientSession() as http:
        assert exposed.http_server is not None
        base = f"http://127.0.0.1:{exposed.http_server.port}"
        status, html, _ = await _get(http, f"{base}/")
        assert status == 403
        assert "ORDER_MONITOR_PAGE_TOKEN" in html
        status, _, _ = await _get(http, f"{base}/healthz")
        assert status == 200


@pytest.mark.parametrize("path", ["/", "/order?id=00000000-0000-4000-8000-000000000000"])
async def test_every_page_answer_is_read_only_and_carries_the_security_headers(
    db: str, app: App, fake: FakeProvider, path: str
) -> None:
    daemon = Daemon(replace(settings_for(db, fake), http_listen="127.0.0.1:0"))
    async with running(daemon), aiohttp.ClientSession() as http:
        assert daemon.http_server is not None
        base = f"http://127.0.0.1:{daemon.http_server.port}"
        async with http.post(f"{base}{path}") as response:
            assert response.status == 405
        status, html, headers = await _get(http, f"{base}{path}")
        assert status == 200
        for name in ("X-Content-Type-Options", "Referrer-Policy", "X-Frame-Options"):
            assert name in headers
        assert "<script" not in html
        assert re.findall(r'<form[^>]*method="(\w+)"', html) == ["get"]
