"""The application the demo plays: it dispatches orders the way the real one does."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from decimal import Decimal
from typing import Any, Final

import psycopg
from psycopg import sql

from order_monitor.demo.application_api import BALANCES
from order_monitor.demo.setup import PROVIDER_ID

#: The shop's customers: few, so that several refunds land in one balance.
USERS: Final = 25
#: What each customer's balance holds before the run (refunds add to it).
OPENING_BALANCE: Final = Decimal("100.00")


class Application:
    """The application's side: orders created and dispatched.

    As in the real application, an order is first inserted ('not_sent'), then
    dispatched: once the provider has accepted it, one UPDATE sets
    ``provider_referans``, ``"providerId"``, ``"externalStatus"='sent'`` and
    ``"sentAt"``. That UPDATE's trigger is what tells the daemon. Orders start
    at a steady rate on a fixed timetable (a slow statement does not push the
    later ones back). Every order has a tenant and a customer with a balance:
    what the application's API (``application_api``, the other half of the
    application) needs to approve it, or reject it and refund the customer.
    """

    def __init__(self, dsn: str, *, orders: int, rate: float, seed: int) -> None:
        self._dsn = dsn
        self._rate = rate
        self._rng = random.Random(seed)  # noqa: S311 - a simulation, not a secret
        self.references = [f"BRK-{seed}-{n:06d}" for n in range(orders)]
        self.dispatched = 0
        self._stop = asyncio.Event()
        self._tenants = [uuid.UUID(int=self._rng.getrandbits(128)) for _ in range(3)]
        self.users = [uuid.UUID(int=self._rng.getrandbits(128)) for _ in range(USERS)]

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with await psycopg.AsyncConnection.connect(self._dsn, autocommit=True) as conn:
            await self._open_balances(conn)
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

    async def _open_balances(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (user_id, balance)"
                " SELECT pg_catalog.unnest(%s::uuid[]), %s ON CONFLICT DO NOTHING"
            ).format(sql.Identifier(BALANCES)),
            (self.users, OPENING_BALANCE),
        )

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
                rng.choice(self.users),
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
