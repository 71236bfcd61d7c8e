"""The handoff between NOTIFY and the inbox, on a real server, switch by switch.

Every test orders the application's transactions and the daemon's lock
calls explicitly, on separate connections; where one of them must be
waiting, the test waits for pg_locks to show it waiting (a condition on
the server, not a sleep). The daemon's side uses the daemon's own
statements (:class:`~order_monitor.db.Queries`), as its role.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from order_monitor import schema
from order_monitor.config import Layout
from order_monitor.daemon import Daemon
from order_monitor.db.inbox import InboxStatements
from order_monitor.engine.handoff import HandoffTiming, Mode
from order_monitor.providers.fake import FakeProvider
from tests.conftest import as_daemon
from tests.daemon_fixtures import App, eventually, running, settings_for

AConn = psycopg.AsyncConnection[Any]
#: The daemon's statements on the inbox; each test's reads start afresh.
STATEMENTS = InboxStatements(Layout())
INBOX = schema.Names(Layout()).inbox.as_string(None)
V1_INSTALL = Path(__file__).parents[1] / "integration" / "fixtures" / "install_v1.sql"

DISPATCH = """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus", "sentAt")
              VALUES (%s, 'fake', 'sent', now()) RETURNING id"""


async def dispatch(conn: AConn, ref: str) -> uuid.UUID:
    row = await (await conn.execute(DISPATCH, (ref,))).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


async def notified(listener: AConn) -> list[str]:
    """The notifications delivered so far (they arrive at the writer's COMMIT)."""
    return [n.payload async for n in listener.notifies(timeout=0.3, stop_after=100)]


async def in_inbox(admin: AConn) -> set[str]:
    cursor = await admin.execute(f"SELECT order_id::text FROM {INBOX}")  # type: ignore[arg-type]
    return {str(r[0]) for r in await cursor.fetchall()}


async def count(admin: AConn, query: str, params: tuple[object, ...] = ()) -> int:
    row = await (await admin.execute(query, params)).fetchone()  # type: ignore[arg-type]
    assert row is not None
    return int(row[0])


async def waiting_for_idle_lock(admin: AConn, pid: int) -> bool:
    query = "SELECT count(*) FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND NOT granted"
    return await count(admin, query, (pid,)) == 1


@pytest.fixture
async def conns(db: str) -> AsyncIterator[dict[str, AConn]]:
    """daemon (the daemon role, its handoff statements), listener, admin, and two app sessions."""
    opened = {
        "daemon": await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True),
        "listener": await psycopg.AsyncConnection.connect(as_daemon(db), autocommit=True),
        "admin": await psycopg.AsyncConnection.connect(db, autocommit=True),
        "t1": await psycopg.AsyncConnection.connect(db),  # a transaction, left open
        "t2": await psycopg.AsyncConnection.connect(db, autocommit=True),
    }
    await opened["listener"].execute("LISTEN order_monitor")
    try:
        yield opened
    finally:
        for conn in opened.values():
            await conn.close()


async def test_going_idle_waits_for_the_open_inbox_writer_and_sees_it(
    conns: dict[str, AConn],
) -> None:
    daemon, listener, admin, t1, t2 = (
        conns[k] for k in ("daemon", "listener", "admin", "t1", "t2")
    )
    # Busy (nobody holds the idle lock): T1 writes the inbox and stays open.
    first = await dispatch(t1, "open-across-the-switch")
    # The daemon asks for the idle lock; it must wait for T1.
    going_idle = asyncio.create_task(STATEMENTS.take_idle_lock(daemon, wait=30))
    await eventually(
        lambda: waiting_for_idle_lock(admin, daemon.info.backend_pid),
        within=10,
        what="the daemon's request for the idle lock to be queued behind T1",
    )
    assert not going_idle.done()
    # While the daemon waits, a new dispatch cannot take the lock shared: it NOTIFYs.
    second = await dispatch(t2, "while-the-daemon-waits")
    assert await notified(listener) == [str(second)]
    assert await in_inbox(admin) == set()  # T1's row is not committed yet
    # T1 commits: its shared lock goes, the daemon's request is granted...
    await t1.commit()
    assert await asyncio.wait_for(going_idle, 10) is True
    # ...and the final read of the inbox, after the grant, sees T1's order.
    assert await STATEMENTS.take(daemon, 100) == [first]
    # Idle: the next dispatch NOTIFYs, the inbox stays empty.
    third = await dispatch(t2, "idle")
    assert await notified(listener) == [str(third)]
    assert await in_inbox(admin) == set()


async def test_going_busy_while_a_notifying_transaction_is_open_loses_nothing(
    conns: dict[str, AConn],
) -> None:
    daemon, listener, admin, t1, t2 = (
        conns[k] for k in ("daemon", "listener", "admin", "t1", "t2")
    )
    assert await STATEMENTS.take_idle_lock(daemon, wait=5) is True
    # Idle: T1's trigger chose NOTIFY; T1 stays open.
    first = await dispatch(t1, "notify-chosen-before-the-switch")
    await STATEMENTS.give_idle_lock(daemon)  # busy from here on
    second = await dispatch(t2, "after-the-switch")
    assert await in_inbox(admin) == {str(second)}
    assert await notified(listener) == []  # T1 not committed yet
    await t1.commit()
    assert await notified(listener) == [str(first)]
    assert await STATEMENTS.take(daemon, 100) == [second]


async def test_a_lock_wait_that_times_out_leaves_the_daemon_busy_and_reading(
    conns: dict[str, AConn],
) -> None:
    daemon, listener, admin, t1, t2 = (
        conns[k] for k in ("daemon", "listener", "admin", "t1", "t2")
    )
    first = await dispatch(t1, "long-transaction")
    assert await STATEMENTS.take_idle_lock(daemon, wait=0.05) is False
    # Still busy: a new dispatch goes to the inbox, not to NOTIFY.
    second = await dispatch(t2, "after-the-timeout")
    assert await in_inbox(admin) == {str(second)}
    await t1.commit()
    assert sorted(map(str, await STATEMENTS.take(daemon, 100))) == sorted([str(first), str(second)])
    assert await notified(listener) == []


async def test_the_lock_goes_with_the_daemons_session(conns: dict[str, AConn]) -> None:
    daemon, listener, admin, t2 = (conns[k] for k in ("daemon", "listener", "admin", "t2"))
    assert await STATEMENTS.take_idle_lock(daemon, wait=5) is True
    pid = daemon.info.backend_pid
    await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    await eventually(lambda: _gone(admin, pid), within=10, what="the daemon's session to end")
    # Nobody holds the lock: the order waits in the inbox for the next connection.
    order = await dispatch(t2, "while-the-daemon-is-away")
    assert await in_inbox(admin) == {str(order)}
    assert await notified(listener) == []


async def _gone(admin: AConn, pid: int) -> bool:
    return await count(admin, "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)) == 0


# --- the daemon itself -----------------------------------------------------------------

QUICK = HandoffTiming(calm_window=0.5, burst_window=0.2, idle_check=0.2, idle_retry=0.2)


async def test_the_daemon_switches_with_the_rate_and_checks_every_order_once(
    db: str, app: App, fake: FakeProvider
) -> None:
    settings = settings_for(db, fake)
    async with running(Daemon(settings, handoff_timing=QUICK)) as daemon:
        assert daemon.handoff is not None
        handoff = daemon.handoff
        metrics = daemon.metrics

        async def idle() -> bool:
            return handoff.mode is Mode.IDLE

        await eventually(idle, within=20, what="the daemon to go idle with nothing arriving")
        (quiet,) = await app.dispatch(["quiet"])
        await eventually(lambda: _finished(app, 1), within=20, what="the quiet order to be checked")
        assert metrics.inbox_taken._value.get() == 0  # it came by NOTIFY
        # A burst of single-order commits: the daemon goes busy and reads the inbox.
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as burst:
            for n in range(300):
                await dispatch(burst, f"burst-{n}")
        await eventually(
            lambda: _finished(app, 301), within=60, what="every burst order to be checked"
        )
        assert metrics.handoff_switches.labels("busy")._value.get() >= 1
        assert metrics.inbox_taken._value.get() > 0
        await eventually(idle, within=20, what="the daemon to go idle again")
    assert quiet is not None
    assert fake.references >= {"quiet", *(f"burst-{n}" for n in range(300))}


async def _finished(app: App, count: int) -> bool:
    return await app.in_flight() == 0 and len(await app.rows()) == count


# Upgrading a running version 1 install is no longer a path a current daemon
# can be on: it refuses at start an install without the version 3 write
# function, so installs are upgraded before daemons (the v2 -> v3 upgrade under
# load is tested in tests/schema/).
