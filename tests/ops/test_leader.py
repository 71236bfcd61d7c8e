"""The leader lock against a real Postgres: waiting, losing, taking over.

Every wait is for an event or a condition, bounded by a timeout; nothing
sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from order_monitor import __version__
from order_monitor.ops.leader import (
    LEADER,
    LOST,
    RELEASED,
    STANDBY,
    LeaderLock,
    lock_key,
)

KEY = lock_key("public", "product_orders")


def fast(dsn: str, **options: Any) -> LeaderLock:
    """A lock that polls and checks often, so the tests wait milliseconds, not seconds."""
    return LeaderLock(dsn, KEY, **{"poll": 0.05, "check_interval": 0.1, **options})


WITHIN = 10.0


async def until(condition: Callable[[], bool], within: float = WITHIN) -> None:
    """Wait for *condition*; fail the test if it does not hold within *within* seconds.

    The counters and roles observed here have no event of their own; a 10 ms
    check under a hard deadline is a bounded wait for a state, not a guess at
    how long something takes.
    """
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - see the docstring
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def leading(lock: LeaderLock) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``async with lock.held()`` in a task until the test lets it go."""
    acquired, leave = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with lock.held():
            acquired.set()
            await leave.wait()

    task = asyncio.create_task(hold())
    try:
        yield task
    finally:
        leave.set()
        task.cancel()
        await asyncio.wait({task})


async def acquired(lock: LeaderLock) -> None:
    await until(lambda: lock.role == LEADER)


async def holder_pids(dsn: str) -> list[int]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND granted"
            " AND ((classid::bigint << 32) | objid::bigint) = %s"
            # Other tests' databases on the same server use the same key.
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (KEY,),
        )
        return [row[0] for row in await cursor.fetchall()]


async def terminate(dsn: str, pid: int | None) -> None:
    assert pid is not None
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        assert (await cursor.fetchone()) == (True,)


def test_the_key_is_stable_and_per_table() -> None:
    # Changing this number splits a running fleet into two leaders during an
    # upgrade: it must never change.
    assert KEY == -5906339083625785542
    assert lock_key("public", "orders") != KEY
    assert lock_key("shop", "product_orders") != KEY
    assert -(2**63) <= KEY < 2**63


async def test_the_documented_sql_gives_the_same_key(db: str) -> None:
    async with await psycopg.AsyncConnection.connect(db) as conn:
        for schema, table in [("public", "product_orders"), ("shop", "Orders"), ("a", "b")]:
            cursor = await conn.execute(
                "SELECT ('x' || left(md5(%s), 16))::bit(64)::bigint",
                (f"order_monitor:{schema}.{table}",),
            )
            assert (await cursor.fetchone()) == (lock_key(schema, table),)


async def test_a_second_instance_waits_then_takes_over_when_the_first_dies(db: str) -> None:
    first = fast(db)
    second = fast(db)

    async with leading(first):
        await acquired(first)
        assert await holder_pids(db) == [first.backend_pid]

        async with leading(second):
            # Several refused attempts, not one lucky timing: it really waits.
            await until(lambda: second.attempts >= 5)
            assert second.role == STANDBY
            assert not first.lost.is_set()
            assert await holder_pids(db) == [first.backend_pid]

            await terminate(db, first.backend_pid)

            await asyncio.wait_for(first.lost.wait(), WITHIN)
            assert first.role == LOST
            assert first.lost_reason is not None
            assert "lock connection failed" in first.lost_reason
            await acquired(second)
            assert await holder_pids(db) == [second.backend_pid]
            assert not second.lost.is_set()


async def test_leaving_the_block_hands_the_lock_over(db: str) -> None:
    first = fast(db)
    second = fast(db)
    async with leading(first) as first_task:
        await acquired(first)
        async with leading(second):
            await until(lambda: second.attempts >= 2)
            assert second.role == STANDBY
            first_task.cancel()
            await asyncio.wait({first_task})
            assert first.role == RELEASED
            assert not first.lost.is_set()
            await acquired(second)


async def test_a_standby_survives_losing_its_own_connection(db: str) -> None:
    first = fast(db)
    second = fast(db)
    async with leading(first) as first_task:
        await acquired(first)
        async with leading(second):
            await until(lambda: second.attempts >= 2)
            old_pid = second.backend_pid
            await terminate(db, old_pid)
            await until(lambda: second.backend_pid != old_pid and second.connect_failures >= 1)
            await until(lambda: second.attempts >= 5)
            assert second.role == STANDBY
            assert not first.lost.is_set()

            first_task.cancel()
            await asyncio.wait({first_task})
            await acquired(second)


async def test_the_session_is_named_for_pg_stat_activity(db: str) -> None:
    lock = fast(db)
    async with leading(lock):
        await acquired(lock)
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            cursor = await conn.execute(
                "SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                (lock.backend_pid,),
            )
            assert (await cursor.fetchone()) == (f"order-monitor {__version__} (leader lock)",)


async def test_progress_is_reported_while_standby_only(db: str) -> None:
    ticks = {"first": 0, "second": 0}

    def counter(name: str) -> Callable[[], None]:
        def tick() -> None:
            ticks[name] += 1

        return tick

    first = fast(db, on_progress=counter("first"))
    second = fast(db, on_progress=counter("second"))
    async with leading(first):
        await acquired(first)
        after_acquire = ticks["first"]
        # A leader's lock checks must not feed the watchdog: that is the
        # engine's job, or a hung engine would look alive.
        await until(lambda: first.checks >= 3)
        assert ticks["first"] == after_acquire
        async with leading(second):
            await until(lambda: ticks["second"] >= 3)
            assert second.role == STANDBY


async def test_an_unreachable_database_keeps_a_standby_waiting_until_cancelled(db: str) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    # Nothing listens on that port now: every connection attempt is refused.
    dsn = make_conninfo(db, host="127.0.0.1", port=port, connect_timeout=2)
    lock = LeaderLock(dsn, KEY, poll=0.01)
    async with leading(lock) as task:
        await until(lambda: lock.connect_failures >= 3)
        assert lock.role == STANDBY
        assert not task.done()
    assert task.cancelled()
    assert lock.role == RELEASED


async def test_held_is_not_reentrant(db: str) -> None:
    lock = fast(db)
    async with leading(lock):
        await acquired(lock)
        with pytest.raises(RuntimeError, match="already in use"):
            async with lock.held():
                pass


async def test_the_lock_can_be_taken_again_after_release(db: str) -> None:
    lock = fast(db)
    for _ in range(2):
        async with lock.held():
            assert lock.role == LEADER
            assert await holder_pids(db) == [lock.backend_pid]
        assert lock.role == RELEASED
        assert await holder_pids(db) == []


async def test_a_lost_leader_lets_the_standbys_try_first(db: str) -> None:
    """Its handoff notices a cut session at once; without a pause it would win the lock back."""
    waits: list[float] = []
    attempts_when_waiting: list[int] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        attempts_when_waiting.append(lock.attempts)

    lock = fast(db, poll=0.25, sleep=sleep)
    async with lock.held():
        pass
    assert waits == []  # a first term, or one released, starts at once

    async with lock.held():
        await terminate(db, lock.backend_pid)
        lock.session_failed("cut")  # what the handoff reports
        assert lock.lost.is_set()
        tried = lock.attempts
    async with lock.held():
        assert lock.role == LEADER
    assert waits == [0.5]  # two of the standbys' polls
    assert attempts_when_waiting == [tried]  # before any try of the lock
