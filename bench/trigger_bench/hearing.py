"""Who hears about orders: the daemon's scheduler recording offers, or v1's bare LISTEN."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg

# bench/common: bench/ is on sys.path, bench/trigger.py being run as a script.
from psycopg import sql

from order_monitor.engine.scheduler import Scheduler
from trigger_bench.setup import LAYOUT


class MissedOrders(RuntimeError):
    pass


class OfferLog(Scheduler):
    """The daemon's own Scheduler, noting every order offered to it (measuring only)."""

    def __init__(self) -> None:
        super().__init__()
        self.offered: set[int] = set()

    def offer(self, order: int, due: float, **options: Any) -> bool:
        self.offered.add(order)
        return super().offer(order, due, **options)


class BareListener:
    """A session that LISTENs on the v1 database and keeps every payload (an order id)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.received: set[int] = set()
        self.notifications = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[BareListener]:
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(LAYOUT.channel)))

        async def consume() -> None:
            async for notify in conn.notifies():
                self.notifications += 1
                self.received.add(uuid.UUID(notify.payload).int)

        task = asyncio.create_task(consume(), name="v1-listener")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await conn.close()
