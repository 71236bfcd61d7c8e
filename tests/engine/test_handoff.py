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
from psycopg import sql
from psycopg.conninfo import make_conninfo

from order_monitor import install, schema
from order_monitor.config import Layout
from order_monitor.daemon import Daemon
from order_monitor.db.inbox import InboxStatements
from order_monitor.engine.handoff import HandoffTiming, Mode
from order_monitor.providers.fake import FakeProvider
from tests.conftest import DAEMON_ROLE, OWNER_ROLE, as_daemon
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


# --- upgrading a version 1 install ---------------------------------------------------------


def statements(script: str) -> list[str]:
    """The statements of one of our SQL files (their bodies are dollar-quoted)."""
    found, current, quoted = [], [], False
    for line in script.splitlines():
        current.append(line)
        quoted ^= line.count("$om$") % 2 == 1
        if not quoted and line.rstrip().endswith(";"):
            found.append("\n".join(current))
            current = []
    return found


def apply_version_1(dsn: str) -> None:
    """What the last version 1 release shipped: its install as the table's owner, its grants."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER TABLE product_orders OWNER TO {}").format(sql.Identifier(OWNER_ROLE))
        )
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(OWNER_ROLE)))
        for statement in statements(V1_INSTALL.read_text()):
            conn.execute(statement)  # type: ignore[call-overload]
        conn.execute("RESET ROLE")
        for statement in schema.role_statements(Layout(role=DAEMON_ROLE)):
            if "inbox" not in statement.text():  # version 1's role.sql: no inbox
                conn.execute(statement.query)


async def install_waits_for_a_transaction(admin: AConn) -> bool:
    cursor = await admin.execute(
        "SELECT count(*) FROM pg_locks WHERE relation = 'product_orders'::regclass AND NOT granted"
    )
    row = await cursor.fetchone()
    return row is not None and row[0] >= 1


async def test_upgrading_a_running_version_1_install_leaves_no_gap(
    db: str, app: App, fake: FakeProvider
) -> None:
    # The db fixture has version 2: take it off, and put version 1 in its place.
    list(install.apply(db, "uninstall", Layout()))
    apply_version_1(db)
    as_owner = make_conninfo(db, options=f"-c role={OWNER_ROLE}")
    settings = settings_for(db, fake)
    async with running(Daemon(settings, handoff_timing=QUICK)) as daemon:
        assert daemon.handoff is not None
        handoff = daemon.handoff

        async def holds_for_version_1() -> bool:
            return handoff.inbox_installed is False and handoff.mode is Mode.IDLE

        await eventually(holds_for_version_1, within=20, what="the daemon to hold the idle lock")
        await app.dispatch(["under-version-1"])
        # A transaction open across the install: dispatched under version 1's
        # trigger, committed while the install waits for it.
        async with (
            await psycopg.AsyncConnection.connect(db) as open_txn,
            await psycopg.AsyncConnection.connect(db, autocommit=True) as admin,
        ):
            await dispatch(open_txn, "open-across-the-install")
            upgrade = asyncio.create_task(
                asyncio.to_thread(lambda: list(install.apply(as_owner, "install", Layout())))
            )
            await eventually(
                lambda: install_waits_for_a_transaction(admin),
                within=10,
                what="the install's trigger swap to wait for the open transaction",
            )
            await open_txn.commit()
            await asyncio.wait_for(upgrade, 30)
        # Installed, not yet granted: the daemon keeps its lock, the trigger NOTIFYs.
        await app.dispatch(["before-role-sql"])
        with psycopg.connect(db, autocommit=True) as conn:
            for statement in schema.role_statements(Layout(role=DAEMON_ROLE)):
                conn.execute(statement.query)
        await app.dispatch(["under-version-2"])
        await eventually(lambda: _finished(app, 4), within=30, what="every order to be checked")

        async def upgraded() -> bool:
            return handoff.inbox_installed is True

        await eventually(upgraded, within=20, what="the daemon to see version 2")
    assert fake.references == {
        "under-version-1",
        "open-across-the-install",
        "before-role-sql",
        "under-version-2",
    }
    with psycopg.connect(db) as conn:
        triggers = conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'product_orders'::regclass"
            " AND NOT tgisinternal ORDER BY 1"
        ).fetchall()
    assert triggers == [("order_monitor_insert_v2",), ("order_monitor_update_v2",)]
