"""The installed write function, called as the daemon's least-privilege role calls it.

What it does with a row another transaction holds, with a dispatch time it
cannot subtract, and with its announcement when the NOTIFY queue is filling.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout, OutcomeWrites
from order_monitor.db import Queries, WriteBatch, Written
from tests.conftest import DAEMON_ROLE, OWNER_ROLE, as_daemon

LAYOUT = Layout(role=DAEMON_ROLE)

AConn = psycopg.AsyncConnection[Any]


@pytest.fixture
async def daemon(db: str) -> AsyncIterator[AConn]:
    async with await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True) as conn:
        yield conn


@pytest.fixture
async def admin(db: str) -> AsyncIterator[AConn]:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
        yield conn


async def _dispatch(admin: AConn, ref: str, sent_at: str = "now()") -> uuid.UUID:
    # sent_at is SQL of this file's own, never input.
    cursor = await admin.execute(
        sql.SQL(
            """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus", "sentAt")
               VALUES (%s, 'fake', 'sent', {}) RETURNING id"""
        ).format(sql.SQL(sent_at)),
        (ref,),
    )
    row = await cursor.fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


async def _write(
    daemon: AConn, orders: dict[uuid.UUID, str], kind: str = "done"
) -> dict[Any, Written]:
    batch = WriteBatch(
        ids=list(orders),
        references=list(orders.values()),
        provider_ids=["fake"] * len(orders),
        kinds=[kind] * len(orders),
        pins=["PIN"] * len(orders),
        provider_messages=[None] * len(orders),
        last_messages=["Completed"] * len(orders),
    )
    return await Queries(LAYOUT).write(daemon, batch)


async def _column(admin: AConn, order: uuid.UUID, column: str) -> Any:
    cursor = await admin.execute(
        sql.SQL("SELECT {} FROM product_orders WHERE id = %s").format(sql.Identifier(column)),
        (order,),
    )
    row = await cursor.fetchone()
    assert row is not None
    return row[0]


async def test_a_row_another_transaction_holds_is_skipped_and_reported_locked(
    db: str, admin: AConn, daemon: AConn
) -> None:
    held = await _dispatch(admin, "HELD")
    free = await _dispatch(admin, "FREE")
    referenced = await _dispatch(admin, "REFERENCED")
    async with await psycopg.AsyncConnection.connect(db) as other:
        # An idle-in-transaction session holding one row, and another
        # transaction that only protects one from deletion (a foreign key
        # being inserted takes this lock): the first must be skipped without
        # waiting, the second must not be.
        await other.execute("SELECT FROM product_orders WHERE id = %s FOR UPDATE", (held,))
        await other.execute("SELECT FROM product_orders WHERE id = %s FOR KEY SHARE", (referenced,))
        # No lock_timeout on this session: before SKIP LOCKED, this call waited for good.
        await daemon.execute("SET statement_timeout = '5s'")
        results = await _write(daemon, {held: "HELD", free: "FREE", referenced: "REFERENCED"})
        assert results == {
            held: Written("locked", False),
            free: Written("done", True),
            referenced: Written("done", True),
        }
        assert await _column(admin, held, "externalStatus") == "sent"
        await other.rollback()
    assert await _write(daemon, {held: "HELD"}) == {held: Written("done", True)}
    assert await _column(admin, held, "pinCode") == "PIN"


async def test_a_row_locked_and_no_longer_matching_the_guard_is_stale_not_locked(
    db: str, admin: AConn, daemon: AConn
) -> None:
    order = await _dispatch(admin, "OLD")
    async with await psycopg.AsyncConnection.connect(db) as other:
        # The application re-sent the order under a new reference and has
        # not committed yet: our snapshot still sees OLD, so the row reads as
        # locked for now ...
        await other.execute(
            "UPDATE product_orders SET provider_referans = 'NEW' WHERE id = %s", (order,)
        )
        assert await _write(daemon, {order: "OLD"}) == {order: Written("locked", False)}
        await other.commit()
    # ... and as stale once it has: absent from the result, nothing written.
    assert await _write(daemon, {order: "OLD"}) == {}
    assert await _column(admin, order, "pinCode") is None


async def test_the_duration_is_never_negative_never_out_of_range_and_null_when_unknowable(
    admin: AConn, daemon: AConn
) -> None:
    dispatched = {
        "recent": "now() - interval '5 seconds'",
        "tomorrow_and_then_some": "now() + interval '30 days'",
        "two_months_ago": "now() - interval '60 days'",
        "infinity": "'infinity'",
        "minus_infinity": "'-infinity'",
    }
    orders = {await _dispatch(admin, ref, at): ref for ref, at in dispatched.items()}
    # One batch, bad dispatch times among good ones: before, 'integer out of
    # range' or 'interval out of range' failed all of it.
    results = await _write(daemon, orders)
    assert {o: r.outcome for o, r in results.items()} == dict.fromkeys(orders, "done")
    durations = {ref: await _column(admin, o, "durationMs") for o, ref in orders.items()}
    assert 5000 <= durations["recent"] < 60_000
    assert durations["tomorrow_and_then_some"] == 0
    assert durations["two_months_ago"] == 2_147_483_647
    assert durations["infinity"] is None
    assert durations["minus_infinity"] is None


async def _install_write_function(admin: AConn, queue_limit: float) -> None:
    statement = schema.write_function_statement(LAYOUT, OutcomeWrites(), queue_limit=queue_limit)
    await admin.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(OWNER_ROLE)))
    await admin.execute(statement.query)
    await admin.execute("RESET ROLE")


async def test_results_are_written_but_not_announced_once_the_notify_queue_is_past_the_limit(
    db: str, admin: AConn, daemon: AConn
) -> None:
    # A real queue cannot be filled in a test (8 GB by default), and its
    # usage cannot be faked: the same function is installed with the limit
    # at 0, which the usage of an empty queue (0.0) already reaches. Only that
    # literal differs from what install.sql holds (asserted first).
    installed = schema.write_function_body(LAYOUT, OutcomeWrites())
    assert f"pg_catalog.pg_notification_queue_usage() < {schema.NOTIFY_QUEUE_LIMIT}" in installed
    assert schema.NOTIFY_QUEUE_LIMIT == 0.5
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as listener:
        await listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(LAYOUT.result_channel)))
        below = await _dispatch(admin, "BELOW")
        assert await _write(daemon, {below: "BELOW"}) == {below: Written("done", True)}
        heard = [n.payload async for n in listener.notifies(timeout=2.0, stop_after=1)]
        assert len(heard) == 1
        assert str(below) in heard[0]

        await _install_write_function(admin, queue_limit=0.0)
        past = await _dispatch(admin, "PAST")
        assert await _write(daemon, {past: "PAST"}) == {past: Written("done", False)}
        assert await _column(admin, past, "pinCode") == "PIN"
        assert [n async for n in listener.notifies(timeout=1.0)] == []
        # A pending result is never announced, whatever the queue holds.
        await _install_write_function(admin, queue_limit=schema.NOTIFY_QUEUE_LIMIT)
        still = await _dispatch(admin, "STILL")
        assert await _write(daemon, {still: "STILL"}, kind="pending") == {
            still: Written("pending", False)
        }
