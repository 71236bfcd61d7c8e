"""A leader change loses no order: the busy reads run on the leader lock's own session.

The old leader's lock session is terminated (pg_terminate_backend, as a DBA or
a network cut would); orders then arrive unannounced (nobody holds the idle
lock). Before the old leader has even noticed, its handoff must take none of
them: each one it took would die with its engine and wait for the next sweep
(5 minutes). The new leader's handoff takes them all.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from structlog.testing import capture_logs

from order_monitor import schema
from order_monitor.config import Layout
from order_monitor.db import Queries
from order_monitor.db.inbox import InboxStatements
from order_monitor.engine.handoff import Handoff, HandoffTiming, LeaderSession, Mode
from order_monitor.metrics import Metrics
from order_monitor.ops.leader import LEADER, LOST, LeaderLock, lock_key
from tests.conftest import as_daemon
from tests.daemon_fixtures import eventually

KEY = lock_key("public", "product_orders")
DISPATCH = """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus", "sentAt")
              SELECT 'R' || n, 'fake', 'sent', now() FROM generate_series(1, %s) n RETURNING id"""


class Taker:
    """A handoff on a leader lock's session, recording what it takes."""

    def __init__(self, lock: LeaderLock) -> None:
        self.taken: list[uuid.UUID] = []
        self.handoff = Handoff(
            "",
            Queries(Layout()),
            on_orders=self.taken.extend,
            on_rows=lambda rows: self.taken.extend(row.id for row in rows),
            room=lambda: 1000,
            listening=lambda: False,  # stays busy: reads what changed every second
            metrics=Metrics(),
            clock=asyncio.get_running_loop().time,
            session=LeaderSession(lock),
        )


@asynccontextmanager
async def leading(dsn: str) -> AsyncIterator[tuple[LeaderLock, Taker]]:
    """A leader (its lock checked only every 60 s: the handoff must not rely on the check)."""
    lock = LeaderLock(dsn, KEY, poll=0.05, check_interval=60.0)
    async with lock.held():
        taker = Taker(lock)
        task = asyncio.create_task(taker.handoff.run())
        try:
            yield lock, taker
        finally:
            task.cancel()
            await asyncio.wait({task})


async def test_the_old_leader_takes_nothing_once_its_lock_session_is_gone(db: str) -> None:
    dsn = as_daemon(db)
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as admin:
        with capture_logs() as logs:
            async with leading(dsn) as (old_lock, old):
                assert old_lock.role == LEADER
                first = [r[0] for r in await (await admin.execute(DISPATCH, (5,))).fetchall()]
                await eventually(lambda: _took(old, first), within=10, what="the leader to read")

                await admin.execute("SELECT pg_terminate_backend(%s)", (old_lock.backend_pid,))
                await eventually(lambda: _gone(admin, old_lock.backend_pid), what="the backend")
                after = [r[0] for r in await (await admin.execute(DISPATCH, (50,))).fetchall()]

                # The first read on the dead session says the lock is lost,
                # long before the lock's own check would (60 s here).
                await eventually(lambda: _is(old_lock, LOST), within=10, what="lost")
                assert old.taken == first

                async with leading(dsn) as (new_lock, new):
                    assert new_lock.role == LEADER
                    # Its first read takes every order in flight: those too.
                    await eventually(
                        lambda: _took(new, first + after), within=10, what="the new leader"
                    )
    lost = [e for e in logs if e["event"] == "leader.lost"]
    assert len(lost) == 1
    assert "session failed" in lost[0]["reason"]


async def _took(taker: Taker, ids: list[uuid.UUID]) -> bool:
    return sorted(taker.taken) == sorted(ids)


async def _is(lock: LeaderLock, role: str) -> bool:
    return lock.role == role


async def _gone(admin: psycopg.AsyncConnection[Any], pid: int | None) -> bool:
    cursor = await admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
    row = await cursor.fetchone()
    return row is not None and row[0] == 0


async def test_a_stopping_handoff_gives_the_idle_lock_back_on_the_live_session(db: str) -> None:
    """The engine drains after the handoff stops; the lock's session lives on meanwhile."""
    lock = LeaderLock(as_daemon(db), KEY, poll=0.05, check_interval=60.0)
    idle_key = schema.advisory_key_parts(schema.idle_lock_key(Layout()))
    async with (
        lock.held(),
        await psycopg.AsyncConnection.connect(db, autocommit=True) as admin,
    ):
        handoff = Handoff(
            "",
            Queries(Layout()),
            on_orders=lambda ids: None,
            on_rows=lambda rows: None,
            room=lambda: 100,
            listening=lambda: True,
            metrics=Metrics(),
            clock=asyncio.get_running_loop().time,
            timing=HandoffTiming(calm_window=0.2, burst_window=0.1, idle_retry=0.1),
            session=LeaderSession(lock),
        )
        task = asyncio.create_task(handoff.run())
        await eventually(lambda: _mode(handoff, Mode.IDLE), what="idle")
        assert await _idle_lock_holders(admin, idle_key) == [lock.backend_pid]

        task.cancel()
        await asyncio.wait({task})
        assert await _idle_lock_holders(admin, idle_key) == []
        assert lock.role == LEADER  # the session itself is untouched


async def _mode(handoff: Handoff, mode: Mode) -> bool:
    return handoff.mode is mode


async def _idle_lock_holders(
    admin: psycopg.AsyncConnection[Any], parts: tuple[int, int]
) -> list[int]:
    cursor = await admin.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        " AND classid::bigint = %s AND objid::bigint = %s"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        parts,
    )
    return [row[0] for row in await cursor.fetchall()]


async def test_a_filling_notify_queue_keeps_the_handoff_on_the_inbox(db: str) -> None:
    """A stuck listener anywhere fills the queue; then every NOTIFYing COMMIT fails."""
    usage = [0.6]
    asked: list[float] = []

    async def queue_usage(conn: psycopg.AsyncConnection[Any]) -> float:
        asked.append(usage[0])
        return usage[0]

    handoff = Handoff(
        as_daemon(db),
        Queries(Layout()),
        on_orders=lambda ids: None,
        on_rows=lambda rows: None,
        room=lambda: 100,
        listening=lambda: True,
        metrics=Metrics(),
        clock=asyncio.get_running_loop().time,
        timing=HandoffTiming(calm_window=0.2, burst_window=0.1, idle_retry=0.1, idle_check=0.1),
        queue_usage=queue_usage,
    )
    with capture_logs() as logs:
        task = asyncio.create_task(handoff.run())
        try:
            # Calm, listener up: only the queue keeps it busy.
            await eventually(lambda: _logged(logs, "handoff.notify_queue_filling"), what="filling")
            await eventually(lambda: _asked(asked, 3), what="three looks at a full queue")
            assert handoff.mode is Mode.BUSY

            usage[0] = 0.01
            await eventually(lambda: _mode(handoff, Mode.IDLE), what="idle once drained")

            usage[0] = 0.3
            await eventually(lambda: _mode(handoff, Mode.BUSY), what="busy again")
        finally:
            task.cancel()
            await asyncio.wait({task})
    modes = [(e["mode"], e["reason"]) for e in logs if e["event"] == "handoff.mode"]
    assert modes[-2:] == [("idle", "orders arriving slowly"), ("busy", "NOTIFY queue filling")]
    filling = [e for e in logs if e["event"] == "handoff.notify_queue_filling"]
    assert len(filling) == 2  # once each time it fills, not once a check


async def _logged(logs: list[dict[str, Any]], event: str) -> bool:
    return any(e["event"] == event for e in logs)


async def _asked(asked: list[float], times: int) -> bool:
    return len(asked) >= times


async def test_the_lock_check_sharing_the_session_never_lands_in_a_failed_idle_lock_wait(
    db: str,
) -> None:
    """The leader's check and the handoff share one session; psycopg lets their statements
    interleave. A wait for the idle lock that times out must leave no aborted transaction
    for the check to run in (it would read that as a lost lock)."""
    statements = InboxStatements(Layout())
    async with (
        await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True) as session,
        await psycopg.AsyncConnection.connect(db) as app,  # a transaction, left open
        await psycopg.AsyncConnection.connect(db, autocommit=True) as admin,
    ):
        # The application's trigger holds the idle lock shared until it commits.
        key = schema.idle_lock_key(Layout())
        await app.execute("SELECT pg_try_advisory_xact_lock_shared(%s)", (key,))
        pid = session.info.backend_pid
        going_idle = asyncio.create_task(statements.take_idle_lock(session, wait=0.5))
        await eventually(lambda: _waiting(admin, pid), what="the idle lock request to wait")
        check = asyncio.create_task(session.execute("SELECT pg_catalog.pg_backend_pid()"))
        assert await going_idle is False
        row = await (await check).fetchone()
        assert row == (pid,)
        assert session.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        # The wait's timeout went with its statement.
        assert await (await session.execute("SHOW lock_timeout")).fetchone() == ("0",)
        await app.rollback()


async def _waiting(admin: psycopg.AsyncConnection[Any], pid: int) -> bool:
    cursor = await admin.execute(
        "SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND NOT granted",
        (pid,),
    )
    row = await cursor.fetchone()
    return row is not None and row[0] == 1
