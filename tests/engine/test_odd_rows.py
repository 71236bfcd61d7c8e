"""Issue #19's reproduction: odd rows among good ones, the whole daemon as the least-privilege role.

Before db.dispatch, one in-flight row with "sentAt" = 'infinity' among 300
made every sweep fail (0/300 found), and nine good orders inserted in the
same statement as the bad one were never confirmed: the confirm of their
batch failed with it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from structlog.testing import capture_logs

from order_monitor import schema
from order_monitor.config import Layout, OutcomeWrites
from order_monitor.daemon import Daemon
from order_monitor.db import ColumnLimits, ManagedConnection, Queries
from order_monitor.engine.anchors import DispatchAnchors
from order_monitor.engine.checker import Checker, CheckerLimits
from order_monitor.engine.decisions import Decision
from order_monitor.engine.inbox import Confirmer, Inbox
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.engine.sweep import Sweeper
from order_monitor.metrics import Metrics, counter_total
from order_monitor.providers.base import OrderRef, Outcome
from order_monitor.providers.fake import Behaviour, FakeProvider, Script
from tests.conftest import DAEMON_ROLE, OWNER_ROLE, as_daemon
from tests.daemon_fixtures import App, eventually, running, settings_for
from tests.db.test_dispatch_times import NULLABLE, grant_nullable
from tests.db.test_narrowing import HOSTILE, insert, make_hostile_view
from tests.operator.helpers import environment, invoke_async, providers_file


def _pending_unless_done(reference: str) -> Script:
    return Script.done() if reference.startswith("done") else Script.pending()


def _events(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == event]


async def test_infinite_dispatch_times_among_300_orders(
    db: str, app: App, fake: FakeProvider, tmp_path: Path
) -> None:
    fake.behaviour = Behaviour(default=_pending_unless_done)
    (tmp_path / "empty.env").write_text("")
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO product_orders (provider_referans, "externalStatus", "providerId", "sentAt")
               SELECT 'wait-' || n, 'sent', 'fake',
                      CASE n WHEN 100 THEN 'infinity'::timestamptz
                             WHEN 200 THEN '-infinity'::timestamptz
                             ELSE now() END
               FROM generate_series(1, 300) AS n"""
        )
    with capture_logs() as logs:
        async with running(Daemon(settings_for(db, fake))):
            await eventually(
                lambda: _async(bool(_events(logs, "sweep.finished"))), what="the first sweep"
            )
            # Nine good orders and a bad one, in one statement: one confirm batch.
            cursor = await app.conn.execute(
                """INSERT INTO product_orders (provider_referans, "externalStatus", "providerId",
                       "sentAt")
                   SELECT 'done-' || n, 'sent', 'fake',
                          CASE n WHEN 5 THEN 'infinity'::timestamptz ELSE now() END
                   FROM generate_series(1, 10) AS n
                   RETURNING provider_referans, id"""
            )
            fresh = dict(await cursor.fetchall())
            await eventually(
                lambda: _done(app, [f"done-{n}" for n in range(1, 11)]),
                what="the ten orders of the statement to be checked and written",
            )
            report = await invoke_async(
                ["status"],
                environment(
                    as_daemon(db),
                    tmp_path / "empty.env",
                    providers_file(tmp_path, fake.base_url or ""),
                ),
            )

    (first, *_) = _events(logs, "sweep.finished")
    assert first["found"] == 300
    # Scheduled by the confirmer (the install's inbox) or the sweep, whichever came first.
    assert first["pending"] == 300
    assert not _events(logs, "sweep.failed")
    assert not _events(logs, "listener.confirm_failed")
    for n in range(1, 11):
        assert fake.poll_count(f"done-{n}") >= 1, n
    rows = await _rows(app)
    assert rows["done-5"]["externalStatus"] == "done"
    assert rows["done-5"]["durationMs"] is None  # no finite dispatch time to measure from
    warned = {e["order_id"] for e in _events(logs, "order.dispatch_time_unusable")}
    assert warned == {
        str(rows["wait-100"]["id"]),
        str(rows["wait-200"]["id"]),
        str(fresh["done-5"]),
    }
    assert report.exit_code == 0, report.output
    assert "In flight: 300 orders" in report.stdout
    assert "Dispatch time unusable: 2 in flight" in report.stdout
    assert str(rows["wait-100"]["id"]) in report.stdout
    assert str(rows["wait-200"]["id"]) in report.stdout


async def _async(value: bool) -> bool:
    return value


async def _rows(app: App) -> dict[str, dict[str, Any]]:
    """App.rows() less "sentAt", which Python's datetime cannot hold when it is infinite."""
    cursor = await app.conn.execute(
        'SELECT provider_referans, id, "externalStatus", "durationMs" FROM product_orders'
    )
    return {
        ref: {"id": id_, "externalStatus": ext, "durationMs": ms}
        for ref, id_, ext, ms in await cursor.fetchall()
    }


async def _done(app: App, references: list[str]) -> bool:
    rows = await _rows(app)
    return all(rows[ref]["externalStatus"] == "done" for ref in references)


async def test_the_sweep_skips_an_unreadable_row_by_id_and_warns_once_an_interval(
    db: str,
) -> None:
    make_hostile_view(db)
    ids = insert(db, [f"R{n}" for n in range(7)] + ["BAD-1"])
    metrics = Metrics()
    clock = [1000.0]
    scheduler = Scheduler()
    conn = ManagedConnection(as_daemon(db), "test")
    sweeper = Sweeper(
        conn,
        Queries(HOSTILE),
        scheduler,
        policy=BackoffPolicy(),
        interval=300.0,
        page_size=3,
        metrics=metrics,
        clock=lambda: clock[0],
        on_scheduled=lambda: None,
        anchors=DispatchAnchors(HOSTILE, metrics),
    )
    try:
        with capture_logs() as logs:
            first = await sweeper.sweep()
            clock[0] += 60.0  # within the interval: counted, not warned again
            await sweeper.sweep()
            clock[0] += 300.0
            await sweeper.sweep()
    finally:
        await conn.close()
    assert first is not None
    assert first.found == 7
    assert len(scheduler) == 7
    assert ids["BAD-1"].int not in scheduler
    warned = _events(logs, "sweep.row_unreadable")
    assert len(warned) == 2
    assert warned[0]["order_id"] == str(ids["BAD-1"])
    assert warned[0]["error_class"] == "DivisionByZero"
    assert warned[0]["error"] == "division by zero"
    assert warned[0]["log_level"] == "warning"
    assert not _events(logs, "sweep.failed")
    assert counter_total(metrics.rows_unreadable, where="sweep") == 3
    assert all(uuid.UUID(e["order_id"]) == ids["BAD-1"] for e in warned)


class _Asked:
    """A provider that answers pending and remembers what it was asked."""

    name = "fake"
    batch_size = 1

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def check(self, orders: Sequence[OrderRef]) -> dict[uuid.UUID, Outcome]:
        self.asked += [order.reference for order in orders]
        return {order.order_id: Outcome.pending() for order in orders}


class _Decisions:
    """The writer's inbox, as the checker sees it."""

    def __init__(self) -> None:
        self.submitted: list[Decision] = []
        #: Results waiting for the database: none here.
        self.held = 0

    def submit(self, decision: Decision) -> None:
        self.submitted.append(decision)


async def test_the_confirm_and_the_re_read_skip_an_unreadable_row_and_go_on(db: str) -> None:
    """One bad row among a notified batch: before, the confirm failed for all of them
    (listener.confirm_failed) and so did the checker's re-read (checker.reread_failed)."""
    make_hostile_view(db)
    ids = insert(db, ["G1", "G2", "BAD-1", "G3"])
    metrics = Metrics()
    scheduler = Scheduler()
    conn = ManagedConnection(as_daemon(db), "test")
    now = 1000.0
    anchors = DispatchAnchors(HOSTILE, metrics)
    lost: list[None] = []
    confirmer = Confirmer(
        Inbox(100),
        conn,
        Queries(HOSTILE),
        scheduler,
        policy=BackoffPolicy(initial_delay=0.0),
        batch_size=10,
        metrics=metrics,
        clock=lambda: now,
        on_scheduled=lambda: None,
        on_lost=lambda: lost.append(None),
        anchors=anchors,
    )
    provider = _Asked()
    decisions = _Decisions()
    checker = Checker(
        conn=conn,
        queries=Queries(HOSTILE),
        providers=lambda pid: provider,  # type: ignore[arg-type,return-value]
        scheduler=scheduler,
        writer=decisions,  # type: ignore[arg-type]
        policy=BackoffPolicy(initial_delay=0.0),
        writes=OutcomeWrites(),
        columns=ColumnLimits(120, None, 250),
        limits=CheckerLimits(batch_size=10, max_in_flight=100, max_in_flight_per_provider=100),
        metrics=metrics,
        clock=lambda: now,
        anchors=anchors,
    )
    try:
        with capture_logs() as logs:
            for order in ids.values():
                confirmer.notified(order)
            task = asyncio.create_task(confirmer.run())
            await eventually(lambda: _async(len(scheduler) == 3), what="the good ones scheduled")
            task.cancel()
            # The confirm skipped the bad row. Offered by hand, as an order
            # scheduled before its row went bad would be: the re-read skips it too.
            scheduler.offer(ids["BAD-1"].int, now)
            checking = asyncio.create_task(checker.run())
            await eventually(lambda: _async(len(decisions.submitted) == 3), what="three checks")
            checker.stop()
            await checking
            await checker.drain(5)
    finally:
        await conn.close()
    assert sorted(provider.asked) == ["G1", "G2", "G3"]
    assert ids["BAD-1"].int not in scheduler  # skipped: the sweep meets it again
    assert not lost
    assert not _events(logs, "listener.confirm_failed")
    assert not _events(logs, "checker.reread_failed")
    (confirm_warning,) = _events(logs, "listener.row_unreadable")
    (reread_warning,) = _events(logs, "checker.row_unreadable")
    for warning in (confirm_warning, reread_warning):
        assert warning["order_id"] == str(ids["BAD-1"])
        assert warning["error_class"] == "DivisionByZero"
        assert warning["sqlstate"] == "22012"
    assert counter_total(metrics.rows_unreadable, where="confirm") == 1
    assert counter_total(metrics.rows_unreadable, where="reread") == 1


async def test_an_order_sent_in_the_future_is_checked_now_and_warned_about(
    db: str, app: App, fake: FakeProvider
) -> None:
    """A shop storing local time as UTC: before, the order was parked until its "sentAt"."""
    fake.set_script("AHEAD", Script.done("PIN-A"))
    with capture_logs() as logs:
        async with running(Daemon(settings_for(db, fake))) as daemon:
            cursor = await app.conn.execute(
                """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus",
                       "sentAt")
                   VALUES ('AHEAD', 'fake', 'sent', now() + interval '3 hours') RETURNING id"""
            )
            row = await cursor.fetchone()
            assert row is not None
            await eventually(lambda: _done(app, ["AHEAD"]), what="the order to be checked")
            counted = counter_total(daemon.metrics.dispatch_time_unusable, reason="future")
    (warning,) = _events(logs, "order.dispatch_time_in_future")
    assert warning["order_id"] == str(row[0])
    assert 3 * 3600 - 60 < warning["seconds_ahead"] <= 3 * 3600
    assert counted == 1
    assert fake.poll_count("AHEAD") == 1
    assert (await _rows(app))["AHEAD"]["durationMs"] == 0  # never negative


async def test_an_order_with_no_dispatch_time_at_all_is_given_up_like_any_other(
    db: str, app: App, fake: FakeProvider
) -> None:
    """Both time columns NULL (a layout whose created-at column is nullable): before, the
    order read as dispatched now at every check, so its schedule never advanced and it was
    polled every initial_delay for ever."""
    install_for(db, replace(NULLABLE, role=DAEMON_ROLE))
    grant_nullable(db)
    fake.set_script("NONE", Script.pending())
    policy = BackoffPolicy(initial_delay=0.0, base=0.05, cap=0.2, jitter=0.1, max_attempts=4)
    settings = settings_for(db, fake, policy=policy)
    settings = replace(settings, layout=replace(settings.layout, columns=NULLABLE.columns))
    with capture_logs() as logs:
        async with running(Daemon(settings)):
            await app.conn.execute(
                """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus")
                   VALUES ('NONE', 'fake', 'sent')"""
            )
            await eventually(
                lambda: _status_is(app, "NONE", settings.writes.gave_up_external_status),
                what="the order to be given up",
            )
    assert fake.poll_count("NONE") == policy.max_attempts
    (warning,) = _events(logs, "order.dispatch_time_unusable")
    assert warning["why"] == "sentAt and approvedAt are both NULL"


def install_for(dsn: str, layout: Layout) -> None:
    """Our install again for *layout*, as the table's owner (its write function names the
    created-at column, for durationMs)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(OWNER_ROLE)))
        for statement in schema.install_statements(layout):
            conn.execute(statement.query)


async def _status_is(app: App, reference: str, status: str) -> bool:
    return (await _rows(app))[reference]["externalStatus"] == status
