"""Fixtures for end-to-end runs: the application, the fake provider, a running daemon."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from order_monitor.config import ProviderConfig, ProviderLimits, Settings
from order_monitor.daemon import Daemon
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.providers.fake import Behaviour, FakeProvider
from order_monitor.redaction import Secret
from tests.conftest import as_daemon

# Short gaps so a run takes seconds; the shape is the production policy's.
# The schedule still spans about a minute, so a loaded test machine running
# late does not use up an order's slots before its script finishes.
FAST_POLICY = BackoffPolicy(
    initial_delay=0.0, base=0.05, cap=1.0, jitter=0.1, max_attempts=60, max_age=3600
)


async def eventually(
    condition: Callable[[], Awaitable[bool]], *, within: float = 60.0, what: str = "condition"
) -> None:
    """Wait until *condition* holds, polling; fail naming *what* after *within* seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


class App:
    """The application: inserts and updates orders on its own connection."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn

    async def dispatch(
        self, references: Iterable[str], provider_id: str = "fake", sent_ago: float = 0.0
    ) -> list[uuid.UUID]:
        refs = list(references)
        cursor = await self.conn.execute(
            """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus", "sentAt")
               SELECT ref, %s, 'sent', now() - make_interval(secs => %s)
               FROM unnest(%s::text[]) WITH ORDINALITY AS r(ref, n) ORDER BY n
               RETURNING id""",
            (provider_id, sent_ago, refs),
        )
        return [row[0] for row in await cursor.fetchall()]

    async def in_flight(self) -> int:
        cursor = await self.conn.execute(
            """SELECT count(*) FROM product_orders
               WHERE provider_referans IS NOT NULL AND lower("externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown')
                 AND lower(status) NOT IN ('approved', 'rejected')"""
        )
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def rows(self) -> dict[str, dict[str, Any]]:
        """Every order by provider reference."""
        cursor = await self.conn.execute(
            """SELECT provider_referans, id, status, "externalStatus", "pinCode", "providerMessage",
                      "lastMessage", "completedAt", "durationMs", "lastSyncAt", "sentAt"
               FROM product_orders"""
        )
        names = [d.name for d in cursor.description or []]
        return {row[0]: dict(zip(names, row, strict=True)) for row in await cursor.fetchall()}


@pytest.fixture
async def app(db: str) -> AsyncIterator[App]:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        yield App(conn)


@pytest.fixture
async def fake() -> AsyncIterator[FakeProvider]:
    # Wall-clock poll times, comparable with the rows' "sentAt".
    provider = FakeProvider(Behaviour(), token="test-token", clock=time.time)
    async with provider.running():
        yield provider


def settings_for(db: str, fake: FakeProvider, **overrides: Any) -> Settings:
    """Settings for a daemon on *db*, logging in as the least-privilege role (as deployed)."""
    assert fake.base_url is not None
    provider = ProviderConfig(
        name="fake",
        kind="barakat",
        base_url=fake.base_url,
        provider_ids=("fake",),
        limits=ProviderLimits(concurrency=8, read_timeout=2.0, breaker_failures=50),
        secrets={"token": Secret("test-token")},
        options={},
    )
    base = Settings(
        dsn=Secret(as_daemon(db)),
        policy=FAST_POLICY,
        sweep_interval=60.0,
        batch_size=200,
        concurrency=16,
        drain_timeout=2.0,
        listener_health_interval=0.5,
        providers=(provider,),
    )
    return replace(base, **overrides)


@contextlib.asynccontextmanager
async def running(daemon: Daemon) -> AsyncIterator[Daemon]:
    """Run *daemon* in the background until the block ends; fail loudly if it dies."""
    ready = asyncio.Event()
    daemon._on_ready = ready.set
    task = asyncio.create_task(daemon.run())
    try:
        done, _ = await asyncio.wait(
            {task, asyncio.create_task(ready.wait())},
            timeout=30,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if task in done:
            task.result()  # raises what killed it
            pytest.fail("the daemon returned before it was ready")
        assert ready.is_set(), "the daemon did not become ready within 30 s"
        yield daemon
        assert not task.done(), f"the daemon died: {task.exception() if task.done() else ''}"
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 30)
