"""The application the demo plays: it dispatches orders the way the real one does."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from typing import Any

import psycopg

from order_monitor.demo.setup import PROVIDER_ID


class Application:
    """The application's side: orders created, dispatched, and nothing else.

    As in the real application, an order is first inserted ('not_sent'), then
    dispatched: once the provider has accepted it, one UPDATE sets
    ``provider_referans``, ``"providerId"``, ``"externalStatus"='sent'`` and
    ``"sentAt"``. That UPDATE's trigger is what tells the daemon. Orders start
    at a steady rate on a fixed timetable (a slow statement does not push the
    later ones back).
    """

    def __init__(self, dsn: str, *, orders: int, rate: float, seed: int) -> None:
        self._dsn = dsn
        self._rate = rate
        self._rng = random.Random(seed)  # noqa: S311 - a simulation, not a secret
        self.references = [f"BRK-{seed}-{n:06d}" for n in range(orders)]
        self.dispatched = 0
        self._stop = asyncio.Event()
        self._tenants = [uuid.UUID(int=self._rng.getrandbits(128)) for _ in range(3)]

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
            start = loop.time()
            for n, reference in enumerate(self.references):
                wait = start + n / self._rate - loop.time()
                if self._stop.is_set():
                    return
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), wait)
                    if self._stop.is_set():
                        return
                await self._dispatch(conn, n, reference)
                self.dispatched += 1

    async def _dispatch(self, conn: psycopg.AsyncConnection[Any], n: int, reference: str) -> None:
        rng = self._rng
        price = round(rng.uniform(1, 50), 2)
        cursor = await conn.execute(
            """INSERT INTO product_orders
                   ("tenantId", "orderNo", "userId", "productId", "userIdentifier",
                    price, "sellPriceAmount")
               VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id""",
            (
                rng.choice(self._tenants),
                1000 + n,
                uuid.UUID(int=rng.getrandbits(128)),
                uuid.UUID(int=rng.getrandbits(128)),
                f"05{rng.randrange(10**9):09d}",
                price,
                round(price * 1.2, 2),
            ),
        )
        row = await cursor.fetchone()
        assert row is not None
        # ... the application calls the provider, which accepts the order and
        # returns its reference; then the application records the dispatch.
        await conn.execute(
            """UPDATE product_orders
                  SET provider_referans = %s, "providerId" = %s,
                      "externalStatus" = 'sent', "sentAt" = now()
                WHERE id = %s""",
            (reference, PROVIDER_ID, row[0]),
        )
