"""The action's sender against a real HTTP server: pauses, breaker, bounded bodies, no redirects.

The clock is injected (the pause and the breaker are read from it); the
HTTP exchange is real, on loopback.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web

from order_monitor.config import ProviderLimits
from order_monitor.delivery.requests import build_requests
from order_monitor.delivery.sender import CIRCUIT_OPEN, PAUSED, ActionSender, Deferred, Sent
from tests.delivery.test_requests import NOW, make_action, make_entry

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def serve(handler: Handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/api/admin/orders/bulk/approve"


async def one_request(
    handler: Handler,
    session: aiohttp.ClientSession,
    clock: Clock,
    limits: ProviderLimits | None = None,
    count: int = 1,
) -> tuple[ActionSender, list[Sent | Deferred]]:
    runner, url = await serve(handler)
    try:
        action = make_action(url=url, limits=limits or ProviderLimits())
        sender = ActionSender(action, session, clock=clock, wall=lambda: 1_700_000_000.0)
        (request,) = build_requests(action, [make_entry()], now=NOW)
        return sender, [await sender.send(request) for _ in range(count)]
    finally:
        await runner.cleanup()


async def test_a_lower_case_retry_after_pauses_the_action(
    session: aiohttp.ClientSession,
) -> None:
    # A raw server: aiohttp's own would write the header name capitalised.
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nretry-after: 7\r\n"
            b"content-length: 0\r\nconnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clock = Clock()
    try:
        action = make_action(url=f"http://127.0.0.1:{port}/bulk/approve")
        sender = ActionSender(action, session, clock=clock, wall=lambda: 1_700_000_000.0)
        (request,) = build_requests(action, [make_entry()], now=NOW)
        first, second = [await sender.send(request) for _ in range(2)]
    finally:
        server.close()
        await server.wait_closed()
    assert isinstance(first, Sent)
    assert first.status == 503
    # The pause holds the next request back without sending it...
    assert second == Deferred(PAUSED, 7.0)
    assert sender.blocked_for() == 7.0
    # ...and a 503 that asked us to wait is no breaker failure.
    assert sender.breaker.failures == 0
    clock.now += 7.5
    assert sender.blocked_for() is None


async def test_answers_without_a_usable_reply_open_the_breaker(
    session: aiohttp.ClientSession,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=500, text="boom")

    clock = Clock()
    limits = ProviderLimits(breaker_failures=2, breaker_cooldown=30.0)
    _, results = await one_request(handler, session, clock, limits, count=3)
    assert [r.status for r in results[:2] if isinstance(r, Sent)] == [500, 500]
    assert results[2] == Deferred(CIRCUIT_OPEN, 30.0)


async def test_a_body_larger_than_max_body_is_no_answer(
    session: aiohttp.ClientSession,
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        for _ in range(64):  # 64 KiB, streamed without a length
            await response.write(b"x" * 1024)
        return response

    limits = ProviderLimits(max_body=4096)
    _, (result,) = await one_request(handler, session, Clock(), limits)
    assert isinstance(result, Sent)
    assert result.status is None
    assert result.failure is not None
    assert "larger than 4096 bytes" in result.failure


async def test_a_redirect_is_not_followed_with_the_token(
    session: aiohttp.ClientSession,
) -> None:
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.path)
        if request.path.endswith("/elsewhere"):
            return web.json_response({"ok": True})
        raise web.HTTPFound("/elsewhere")

    _, (result,) = await one_request(handler, session, Clock())
    assert isinstance(result, Sent)
    assert result.status == 302
    assert seen == ["/api/admin/orders/bulk/approve"]


async def test_a_refused_connection_says_where_and_never_the_url_or_token(
    session: aiohttp.ClientSession,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    runner, url = await serve(handler)
    await runner.cleanup()  # nobody listens there any more
    action = replace(make_action(url=url + "?key=do-not-log"), limits=ProviderLimits())
    sender = ActionSender(action, session, clock=Clock())
    (request,) = build_requests(action, [make_entry()], now=NOW)
    result = await sender.send(request)
    assert isinstance(result, Sent)
    assert result.status is None
    assert result.failure is not None
    assert "127.0.0.1" in result.failure
    assert "do-not-log" not in result.failure
    assert "Bearer" not in result.failure
