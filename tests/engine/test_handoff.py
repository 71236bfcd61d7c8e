"""The handoff between NOTIFY and the busy reads, on a real server, switch by switch.

Every test orders the application's transactions and the daemon's lock
calls explicitly, on separate connections; where one of them must be
waiting, the test waits for pg_locks to show it waiting (a condition on
the server, not a sleep). The daemon's side uses the daemon's own
statements (:class:`~order_monitor.db.Queries`), as its role.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

from order_monitor.config import Layout
from order_monitor.daemon import Daemon
from order_monitor.db import ManagedConnection, Queries
from order_monitor.db.changes import ChangeStatements
from order_monitor.db.inbox import InboxStatements
from order_monitor.engine.changes import Mark
from order_monitor.engine.handoff import Handoff, HandoffTiming, Mode, OwnSession
from order_monitor.engine.inbox import Confirmer, Inbox
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.metrics import Metrics, counter_total
from order_monitor.providers.fake import FakeProvider
from tests.conftest import as_daemon
from tests.daemon_fixtures import App, eventually, running, settings_for

AConn = psycopg.AsyncConnection[Any]
#: The daemon's statements: the idle lock, and the busy read.
STATEMENTS = InboxStatements(Layout())
CHANGES = ChangeStatements(Layout())
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


class BusyReads:
    """The daemon's busy reads, as the handoff makes them: a mark, and the ids it knows."""

    def __init__(self, daemon: AConn) -> None:
        self.daemon = daemon
        self.mark = Mark()
        self.known: set[uuid.UUID] = set()

    async def release(self) -> None:
        """Release the idle lock, the mark taken just before, as the handoff goes busy."""
        self.mark.released(await CHANGES.release_idle_lock(self.daemon))

    async def new(self) -> list[uuid.UUID]:
        """The ids a read returns that it had not returned before."""
        changed = await CHANGES.read_from(self.daemon, self.mark)
        fresh = [order for order in changed.ids if order not in self.known]
        self.known.update(fresh)
        return fresh


async def going_busy(daemon: AConn) -> BusyReads:
    """Idle (the idle lock held), then busy: the switch every test starts from."""
    assert await STATEMENTS.take_idle_lock(daemon, wait=5) is True
    reads = BusyReads(daemon)
    await reads.release()
    return reads


async def test_going_idle_waits_for_the_open_unannounced_writer_and_sees_it(
    conns: dict[str, AConn],
) -> None:
    daemon, listener, admin, t1, t2 = (
        conns[k] for k in ("daemon", "listener", "admin", "t1", "t2")
    )
    reads = await going_busy(daemon)
    # Busy: T1's trigger calls nothing, and T1 stays open.
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
    # T1 commits: its shared lock goes, the daemon's request is granted...
    await t1.commit()
    assert await asyncio.wait_for(going_idle, 10) is True
    # ...and the final read, after the grant, sees T1's order (and the
    # notified one, which the daemon drops: it has it already).
    assert set(await reads.new()) == {first, second}
    # Idle: the next dispatch NOTIFYs.
    third = await dispatch(t2, "idle")
    assert await notified(listener) == [str(third)]


async def test_an_order_that_enters_flight_while_the_daemon_waits_to_go_idle_is_read(
    conns: dict[str, AConn],
) -> None:
    """Version 6: the WHEN tries the lock on every write, in flight or not.

    T1 inserts an order not yet dispatched while the daemon is busy: its try
    succeeds and T1 holds the lock shared. The daemon then asks for the lock
    and waits. T1 dispatches the order: its second try succeeds at once (its
    transaction holds the lock already, whoever waits), so nothing is
    NOTIFYed, and the daemon's read after the grant must find the order.
    """
    daemon, listener, admin, t1 = (conns[k] for k in ("daemon", "listener", "admin", "t1"))
    reads = await going_busy(daemon)
    row = await (
        await t1.execute(
            """INSERT INTO product_orders ("providerId", "externalStatus")
               VALUES ('fake', 'not_sent') RETURNING id"""
        )
    ).fetchone()
    assert row is not None
    order = uuid.UUID(str(row[0]))
    going_idle = asyncio.create_task(STATEMENTS.take_idle_lock(daemon, wait=30))
    await eventually(
        lambda: waiting_for_idle_lock(admin, daemon.info.backend_pid),
        within=10,
        what="the daemon's request for the idle lock to be queued behind T1",
    )
    await t1.execute(
        """UPDATE product_orders SET provider_referans = 'entered-while-waiting',
               "externalStatus" = 'sent', "sentAt" = now() WHERE id = %s""",
        (order,),
    )
    assert not going_idle.done()
    await t1.commit()
    assert await asyncio.wait_for(going_idle, 10) is True
    assert await reads.new() == [order]
    assert await notified(listener) == []


async def test_a_mark_too_old_for_32_bit_ages_reads_every_order_in_flight(
    conns: dict[str, AConn], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read whose snapshot shows the mark older than MAX_MARK_AGE may have left
    rows out (age() wraps at 2^31): every order in flight is read instead. A
    billion transactions cannot be spent in a test; the limit is lowered."""
    daemon, t2 = conns["daemon"], conns["t2"]
    before = await dispatch(t2, "before-the-mark")
    await t2.commit()
    reads = await going_busy(daemon)
    assert await reads.new() == []  # older than the mark: not read
    # Below zero: every mark is too old, even one no transaction has passed yet.
    monkeypatch.setattr("order_monitor.engine.changes.MAX_MARK_AGE", -1)
    assert await reads.new() == [before]
    assert reads.mark.value is not None  # and the mark moved on with that read


async def test_going_busy_while_a_notifying_transaction_is_open_loses_nothing(
    conns: dict[str, AConn],
) -> None:
    daemon, listener, t1, t2 = (conns[k] for k in ("daemon", "listener", "t1", "t2"))
    assert await STATEMENTS.take_idle_lock(daemon, wait=5) is True
    # Idle: T1's trigger NOTIFYs (delivered at its commit); T1 stays open.
    first = await dispatch(t1, "notify-chosen-before-the-switch")
    reads = BusyReads(daemon)
    await reads.release()  # busy from here on
    second = await dispatch(t2, "after-the-switch")
    assert await reads.new() == [second]
    assert await notified(listener) == []  # T1 not committed yet; T2 announced nothing
    await t1.commit()
    assert await notified(listener) == [str(first)]
    # Read as well (it committed after the mark): the daemon has it already.
    assert await reads.new() == [first]


async def test_a_transaction_older_than_the_switch_that_dispatches_after_it_is_read(
    conns: dict[str, AConn],
) -> None:
    """Its transaction id predates the release: the mark is older still (engine.changes)."""
    daemon, listener, t1 = (conns[k] for k in ("daemon", "listener", "t1"))
    assert await STATEMENTS.take_idle_lock(daemon, wait=5) is True
    # Idle: T1 writes something else first, so it has its transaction id now.
    await t1.execute("""INSERT INTO product_orders ("externalStatus") VALUES ('not_sent')""")
    reads = BusyReads(daemon)
    await reads.release()
    assert await reads.new() == []
    # Busy: T1 dispatches (nothing announced), in a savepoint, and commits.
    await t1.execute("SAVEPOINT s")
    order = await dispatch(t1, "old-transaction")
    await t1.execute("RELEASE SAVEPOINT s")
    await t1.execute("SAVEPOINT gone")
    await dispatch(t1, "rolled-back")
    await t1.execute("ROLLBACK TO SAVEPOINT gone")
    await t1.commit()
    assert await reads.new() == [order]
    assert await notified(listener) == []


async def test_a_lock_wait_that_times_out_leaves_the_daemon_busy_and_reading(
    conns: dict[str, AConn],
) -> None:
    daemon, listener, t1, t2 = (conns[k] for k in ("daemon", "listener", "t1", "t2"))
    reads = await going_busy(daemon)
    first = await dispatch(t1, "long-transaction")
    assert await STATEMENTS.take_idle_lock(daemon, wait=0.05) is False
    # Still busy: a new dispatch is read, not NOTIFYed.
    second = await dispatch(t2, "after-the-timeout")
    assert await reads.new() == [second]
    await t1.commit()
    assert await reads.new() == [first]
    assert await notified(listener) == []


async def test_a_long_transaction_holds_the_mark_back_and_known_orders_are_dropped(
    conns: dict[str, AConn],
) -> None:
    daemon, t1, t2 = (conns[k] for k in ("daemon", "t1", "t2"))
    reads = await going_busy(daemon)
    await t1.execute("SELECT pg_catalog.pg_current_xact_id()")  # running, with an id
    orders = [await dispatch(t2, f"during-{n}") for n in range(3)]
    assert await reads.new() == orders
    # The mark cannot pass T1: each read returns those rows again...
    again = await CHANGES.read(daemon, reads.mark.since())
    assert set(again.ids) == set(orders)
    # ...and the daemon, which knows them, takes nothing twice.
    assert await reads.new() == []
    await t1.commit()
    later = await dispatch(t2, "after")
    assert await reads.new() == [later]
    assert (await CHANGES.read(daemon, reads.mark.since())).ids == []


async def test_the_lock_goes_with_the_daemons_session(conns: dict[str, AConn]) -> None:
    daemon, listener, admin, t2 = (conns[k] for k in ("daemon", "listener", "admin", "t2"))
    assert await STATEMENTS.take_idle_lock(daemon, wait=5) is True
    kept = Mark()
    kept.read(int(await _snapshot_xmin(admin)))  # from an earlier busy read
    pid = daemon.info.backend_pid
    await admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    await eventually(lambda: _gone(admin, pid), within=10, what="the daemon's session to end")
    # Nobody holds the lock: nothing is announced...
    order = await dispatch(t2, "while-the-daemon-is-away")
    assert await notified(listener) == []
    # ...and a read from the mark kept from before the loss finds it.
    assert (await CHANGES.read(admin, kept.since())).ids == [order]


async def _snapshot_xmin(conn: AConn) -> str:
    row = await (
        await conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
    ).fetchone()
    assert row is not None
    return str(row[0])


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
        taken = metrics.busy_read_orders.labels("taken")
        assert taken._value.get() == 0  # it came by NOTIFY
        # A burst of single-order commits: the daemon goes busy and reads changes.
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as burst:
            for n in range(300):
                await dispatch(burst, f"burst-{n}")
        await eventually(
            lambda: _finished(app, 301), within=60, what="every burst order to be checked"
        )
        assert metrics.handoff_switches.labels("busy")._value.get() >= 1
        assert taken._value.get() > 0
        await eventually(idle, within=20, what="the daemon to go idle again")
    assert quiet is not None
    assert fake.references >= {"quiet", *(f"burst-{n}" for n in range(300))}


async def _finished(app: App, count: int) -> bool:
    return await app.in_flight() == 0 and len(await app.rows()) == count


# Upgrading a running version 1 install is no longer a path a current daemon
# can be on: it refuses at start an install without the version 3 write
# function, so installs are upgraded before daemons (the v2 -> v3 upgrade under
# load is tested in tests/schema/).


async def test_a_busy_read_hands_on_every_new_order_however_full_the_confirmer_is(db: str) -> None:
    """Leaving some for later kept the mark back, and every read after returned more."""
    taken: list[list[uuid.UUID]] = []
    handoff = Handoff(
        "",
        Queries(Layout()),
        on_orders=taken.append,
        on_rows=lambda rows: taken.append([row.id for row in rows]),
        room=lambda: 0,  # the confirmer is full
        listening=lambda: False,  # stays busy
        metrics=Metrics(),
        clock=asyncio.get_running_loop().time,
        initial_delay=1.0,  # a read every 0.1 s
        session=OwnSession(as_daemon(db), max_backoff=0.2),
    )
    task = asyncio.create_task(handoff.run())
    try:
        await eventually(lambda: _read_once(handoff), what="the first read")
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as app:
            orders = [await dispatch(app, f"full-{n}") for n in range(50)]
        await eventually(lambda: _all_taken(taken, orders), what="all 50 handed on")
    finally:
        task.cancel()
        await asyncio.wait({task})
    handed = [order for batch in taken for order in batch]
    assert sorted(handed) == sorted(orders)  # each once: the mark moved on


async def _read_once(handoff: Handoff) -> bool:
    return handoff.mark.value is not None


async def _all_taken(taken: list[list[uuid.UUID]], orders: list[uuid.UUID]) -> bool:
    return set(orders) <= {order for batch in taken for order in batch}


class Handed:
    """What a handoff hands on, and how: rows (scheduled as read) or ids (confirmed first)."""

    def __init__(self) -> None:
        self.rows: list[uuid.UUID] = []
        self.ids: list[uuid.UUID] = []
        self.metrics = Metrics()

    def handoff(self, db: str, **options: Any) -> Handoff:
        """A handoff as the daemon's role, busy throughout, reading every 0.1 s."""
        return Handoff(
            "",
            Queries(Layout()),
            on_orders=self.ids.extend,
            on_rows=lambda rows: self.rows.extend(row.id for row in rows),
            room=lambda: 1000,
            listening=lambda: False,
            metrics=self.metrics,
            clock=asyncio.get_running_loop().time,
            initial_delay=1.0,
            session=OwnSession(as_daemon(db), max_backoff=0.2),
            **options,
        )


@contextlib.asynccontextmanager
async def handing_on(handoff: Handoff) -> AsyncIterator[Handoff]:
    task = asyncio.create_task(handoff.run())
    try:
        await eventually(lambda: _read_once(handoff), what="the first read")
        yield handoff
    finally:
        task.cancel()
        await asyncio.wait({task})


async def test_new_orders_come_as_rows_and_as_ids_while_a_long_transaction_holds_the_mark(
    db: str,
) -> None:
    """Rows save a confirm per new order; while every read returns the same known rows
    again (a writing transaction older than them is open), ids cost less."""
    handed = Handed()
    known: set[uuid.UUID] = set()
    handoff = handed.handoff(db, known=lambda order: order in known)
    async with (
        handing_on(handoff),
        await psycopg.AsyncConnection.connect(db) as long,
        await psycopg.AsyncConnection.connect(db, autocommit=True) as app,
    ):
        await long.execute("SELECT pg_catalog.pg_current_xact_id()")  # running, with an id
        first = [await dispatch(app, f"first-{n}") for n in range(10)]
        await eventually(lambda: _has(handed.rows, first), what="the first orders, as rows")
        assert handed.ids == []
        known.update(first)  # scheduled, as the confirmer would have them
        counts = handed.metrics.busy_read_orders
        await eventually(
            lambda: _async(counts.labels("known")._value.get() >= 10),
            what="a read returning them again (the mark held back)",
        )
        later = [await dispatch(app, f"later-{n}") for n in range(3)]
        # Mostly known: read as ids, and the confirmer reads these three back.
        await eventually(lambda: _has(handed.ids, later), what="the later orders, as ids")
        known.update(later)
        await long.commit()
        # The mark moves past the known rows: a read that may have begun
        # before the commit, one from its mark, one from a mark past them
        # (which returns no known order: rows again).
        reads = _reads_made(handed.metrics) + 3
        await eventually(
            lambda: _async(_reads_made(handed.metrics) >= reads), what="three more reads"
        )
        last = [await dispatch(app, f"last-{n}") for n in range(3)]
        await eventually(lambda: _has(handed.rows, last), what="the last orders, as rows")
    assert sorted(handed.rows) == sorted(first + last)
    assert sorted(handed.ids) == sorted(later)


# A provider id column of the application's own type, whose cast to text
# fails for one value: the busy read's rows cannot be read while the ids can.
ODD_PROVIDER_TYPE = """
CREATE TYPE provider_code AS ENUM ('fake', 'odd');
CREATE FUNCTION provider_code_text(code provider_code) RETURNS text
    LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF code = 'odd' THEN
        RAISE EXCEPTION 'no text for this provider' USING ERRCODE = 'data_exception';
    END IF;
    RETURN pg_catalog.enum_out(code)::text;
END $$;
CREATE CAST (provider_code AS text) WITH FUNCTION provider_code_text(provider_code);
ALTER TABLE product_orders ALTER COLUMN "providerId" TYPE provider_code
    USING "providerId"::text::provider_code;
"""


async def test_a_row_the_busy_read_cannot_read_delays_only_itself(db: str) -> None:
    """The read falls back to ids; the confirmer narrows its confirm down to the odd row,
    reports it, and schedules the others. The next read returns rows again."""
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as admin:
        await admin.execute(ODD_PROVIDER_TYPE)  # type: ignore[arg-type]
    scheduler = Scheduler()
    metrics = Metrics()
    conn = ManagedConnection(as_daemon(db), "test")
    clock = asyncio.get_running_loop().time
    confirmer = Confirmer(
        Inbox(100),
        conn,
        Queries(Layout()),
        scheduler,
        policy=BackoffPolicy(),
        batch_size=100,
        metrics=metrics,
        clock=clock,
        on_scheduled=lambda: None,
        on_lost=lambda: pytest.fail("nothing is left to a sweep"),
    )
    handoff = Handoff(
        "",
        Queries(Layout()),
        on_orders=confirmer.taken,
        on_rows=confirmer.found,
        room=confirmer.room,
        known=lambda order: order.int in scheduler,
        listening=lambda: False,
        metrics=metrics,
        clock=clock,
        initial_delay=1.0,
        session=OwnSession(as_daemon(db), max_backoff=0.2),
    )
    confirming = asyncio.create_task(confirmer.run())
    try:
        with capture_logs() as logs:
            async with (
                handing_on(handoff),
                await psycopg.AsyncConnection.connect(db, autocommit=True) as app,
            ):
                rows = await (
                    await app.execute(
                        """INSERT INTO product_orders (provider_referans, "providerId",
                               "externalStatus", "sentAt")
                           SELECT 'R' || n, CASE n WHEN 3 THEN 'odd' ELSE 'fake' END::provider_code,
                                  'sent', now()
                           FROM generate_series(1, 6) AS n RETURNING provider_referans, id"""
                    )
                ).fetchall()
                ids = {ref: uuid.UUID(str(order)) for ref, order in rows}
                good = [order for ref, order in ids.items() if ref != "R3"]
                await eventually(
                    lambda: _async(all(order.int in scheduler for order in good)),
                    what="the five good orders scheduled",
                )
                later = await dispatch(app, "later")
                await eventually(lambda: _async(later.int in scheduler), what="a later order")
    finally:
        confirming.cancel()
        await asyncio.wait({confirming})
        await conn.close()
    assert ids["R3"].int not in scheduler  # the sweep meets it again
    (warning,) = [e for e in logs if e["event"] == "listener.row_unreadable"]
    assert warning["order_id"] == str(ids["R3"])
    assert warning["sqlstate"] == "22000"
    fallbacks = [e for e in logs if e["event"] == "handoff.rows_unreadable"]
    assert len(fallbacks) == 1  # the later read returned rows: the mark had moved past R3
    assert counter_total(metrics.rows_unreadable, where="confirm") == 1


def _reads_made(metrics: Metrics) -> float:
    (histogram,) = metrics.busy_reads.collect()
    (count,) = [s.value for s in histogram.samples if s.name.endswith("_count")]
    return count


async def _has(handed: list[uuid.UUID], orders: list[uuid.UUID]) -> bool:
    return set(orders) <= set(handed)


async def _async(value: bool) -> bool:
    return value


@pytest.mark.parametrize("rows", [False, True], ids=["ids", "rows"])
async def test_a_dispatch_given_its_id_after_age_was_first_called_is_read(
    db: str, rows: bool
) -> None:
    """age() measures from the next transaction id as of its first call in the
    transaction, and the planner makes that call (estimating age(<the mark>))
    before the statement's snapshot is taken. A dispatch that gets its id after
    that and commits before the snapshot has a negative age: a lower bound of 0
    left it out while the mark moved past it, and it was lost (bench/trigger.py,
    5 of 141,000 at full speed). A transaction block makes the gap as wide as
    the test needs: the first age() call caches the reference, later
    statements take new snapshots."""
    async with (
        await psycopg.AsyncConnection.connect(as_daemon(db)) as daemon,
        await psycopg.AsyncConnection.connect(db, autocommit=True) as app,
    ):
        row = await (
            await daemon.execute(
                "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text,"
                " pg_catalog.age('3'::xid)"
            )
        ).fetchone()
        assert row is not None
        since = int(row[0]) % 2**32
        # The first takes the reference id itself (age 0), the second the next (age -1).
        late = [await dispatch(app, f"given-its-id-after-the-reference-{n}") for n in range(2)]
        changed = await CHANGES.read(daemon, since, rows=rows)
        await daemon.rollback()
    assert sorted(changed.ids) == sorted(late)
    assert (changed.rows is not None) is rows
