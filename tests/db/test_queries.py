"""The engine's queries against odd rows."""

from __future__ import annotations

import asyncio

import psycopg

from order_monitor.config import Columns, Layout
from order_monitor.db import ManagedConnection, Queries


async def test_a_row_with_no_dispatch_time_is_treated_as_dispatched_now(db: str) -> None:
    """Both time columns may be nullable in another layout; such a row must get an
    age (and be scheduled), not a NULL that breaks the sweep."""
    layout = Layout(columns=Columns(created_at="approvedAt"))  # a nullable timestamptz
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        await conn.execute(
            """INSERT INTO product_orders (provider_referans, "externalStatus", "providerId")
               VALUES ('no-times', 'sent', 'fake')"""
        )
        queries = Queries(layout)
        (swept,) = await queries.sweep_page(conn, None, 10)
        assert swept.elapsed is not None
        assert 0 <= swept.elapsed < 60
        assert swept.last_checked is None
        (row,) = await queries.fetch_in_flight(conn, [swept.id])
        assert row.elapsed is not None
        assert row.reference == "no-times"


async def test_concurrent_users_of_a_managed_connection_share_one_reconnect(db: str) -> None:
    managed = ManagedConnection(db, "test")
    first = await asyncio.gather(*(managed.get() for _ in range(10)))
    assert len({id(c) for c in first}) == 1
    old = first[0]
    await old.close()  # as if the server had cut it
    again = await asyncio.gather(*(managed.get() for _ in range(10)))
    assert len({id(c) for c in again}) == 1
    assert again[0] is not old
    await managed.reset()  # a late reset by a task that held the old one
    assert await managed.get() is again[0]  # the healthy new connection stays
    await managed.close()
