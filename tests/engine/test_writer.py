"""The writer against what production databases do: a held row, a table lock, a failing write.

Each runs the whole daemon as the least-privilege role, against the fake
provider, and counts what the provider was asked: a result the database did
not take is written again later, never asked for again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import psycopg
from psycopg import sql
from structlog.testing import capture_logs

from order_monitor import schema
from order_monitor.config import Layout, OutcomeWrites
from order_monitor.daemon import Daemon
from order_monitor.providers.fake import FakeProvider, Script, default_pin
from tests.conftest import DAEMON_ROLE, OWNER_ROLE
from tests.daemon_fixtures import FAST_POLICY, App, eventually, running, settings_for

AConn = psycopg.AsyncConnection[Any]


def _deferred(daemon: Daemon, reason: str) -> float:
    value = daemon.metrics.registry.get_sample_value(
        "order_monitor_result_writes_deferred_total", {"reason": reason}
    )
    return value or 0.0


def _deferred_at_least(daemon: Daemon, reason: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return _deferred(daemon, reason) >= n

    return check


def _in_flight(app: App, left: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await app.in_flight() == left

    return check


def _logged(logs: list[MutableMapping[str, Any]], event: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(e["event"] == event for e in logs)

    return check


@asynccontextmanager
async def _transaction(db: str) -> AsyncIterator[AConn]:
    """Another session, inside a transaction it leaves open until the block ends."""
    async with await psycopg.AsyncConnection.connect(db) as conn:
        try:
            yield conn
        finally:
            await conn.rollback()


async def test_a_row_held_by_another_transaction_delays_only_itself(
    db: str, app: App, fake: FakeProvider
) -> None:
    # The reproduction: one row locked by an idle-in-transaction
    # session, 50 other orders finishing at the provider.
    refs = [f"fine-{n}" for n in range(50)]
    for ref in [*refs, "held"]:
        fake.set_script(ref, Script.done())
    # Dispatched before the daemon starts, so the row is surely locked
    # before its result comes: the start-up sweep finds all 51.
    await app.dispatch([*refs, "held"])
    held = (await app.rows())["held"]["id"]
    settings = settings_for(db, fake, http_listen="127.0.0.1:0")
    with capture_logs() as logs:
        async with _transaction(db) as other, running(Daemon(settings)) as daemon:
            await other.execute("SELECT FROM product_orders WHERE id = %s FOR UPDATE", (held,))
            # Before: 0/50 written, the writer waiting on the one row for good.
            await eventually(_in_flight(app, 1), within=20, what="the 50 other orders written")
            # Tried at about 1 s and 2 s after the first write, never asked again.
            await eventually(_deferred_at_least(daemon, "locked", 3), what="three tries")
            assert fake.poll_count("held") == 1
            age = daemon.unwritten_age()
            assert age >= 2.5
            gauge = daemon.metrics.registry.get_sample_value(
                "order_monitor_unwritten_result_age_seconds"
            )
            assert gauge is not None
            assert gauge >= age
            assert daemon.http_server is not None
            checks, failed = await daemon.http_server.readiness_checks()
            assert "writes" not in failed  # under the minute /readyz allows
            # The check reports milliseconds; rounding keeps the order, not the value.
            assert checks["writes"]["age_s"] >= round(age, 3)
            assert "oldest unwritten result" in daemon.status_line()
            await other.rollback()
            # The next try is at most 4 s away (the fourth: 1, 2, 4 s).
            await eventually(_in_flight(app, 0), within=15, what="the held order written")
            assert daemon.unwritten_age() == 0.0
    assert fake.poll_count("held") == 1
    assert {ref: fake.poll_count(ref) for ref in refs} == dict.fromkeys(refs, 1)
    rows = await app.rows()
    assert (rows["held"]["externalStatus"], rows["held"]["pinCode"]) == (
        "done",
        default_pin("held"),
    )
    locked = [e for e in logs if e["event"] == "writer.rows_locked"]
    assert [e["order_ids"] for e in locked] == [[str(held)]]  # once, not per try
    assert not [e for e in logs if e["event"] == "writer.row_rejected"]


async def test_a_held_row_beside_a_refused_one_is_never_taken_for_a_refusal(
    db: str, app: App, fake: FakeProvider
) -> None:
    # The batch fails on the refused row's value and is written row by row:
    # the held row, skipped as locked there too, is kept for later and does
    # not count against its policy.
    await app.conn.execute(
        """ALTER TABLE product_orders ADD CONSTRAINT no_bad_pin CHECK ("pinCode" <> 'BAD-PIN')"""
    )
    fake.set_script("refused", Script.done("BAD-PIN"))
    fake.set_script("held", Script.done())
    fake.set_script("fine", Script.done())
    await app.dispatch(["refused", "held", "fine"])
    rows = await app.rows()
    policy = replace(FAST_POLICY, base=5.0, cap=5.0)  # one refusal, then a long wait
    with capture_logs() as logs:
        async with (
            _transaction(db) as other,
            running(Daemon(settings_for(db, fake, policy=policy))) as daemon,
        ):
            await other.execute(
                "SELECT FROM product_orders WHERE id = %s FOR UPDATE", (rows["held"]["id"],)
            )
            await eventually(_logged(logs, "writer.row_rejected"), what="the refusal")
            await eventually(_deferred_at_least(daemon, "locked", 2), what="the held row kept")
            await other.rollback()
            await eventually(_in_flight(app, 1), within=15, what="the held order written")
    rejected = [e["order_id"] for e in logs if e["event"] == "writer.row_rejected"]
    assert set(rejected) == {str(rows["refused"]["id"])}
    after = await app.rows()
    assert after["held"]["pinCode"] == default_pin("held")
    assert after["fine"]["pinCode"] == default_pin("fine")
    assert fake.poll_count("held") == 1


async def test_a_lock_on_the_whole_table_times_out_and_the_results_wait_in_memory(
    db: str, app: App, fake: FakeProvider
) -> None:
    refs = [f"t-{n}" for n in range(5)]
    for ref in refs:
        fake.set_script(ref, Script.done())
    await app.dispatch(refs)
    with capture_logs() as logs:
        async with _transaction(db) as other:
            # What a migration or an install takes: reads go on, writes wait.
            await other.execute("LOCK TABLE product_orders IN EXCLUSIVE MODE")
            async with running(Daemon(settings_for(db, fake))) as daemon:
                # Before: no lock_timeout, the writer waited as long as the lock lasted.
                await eventually(
                    _deferred_at_least(daemon, "database", len(refs)),
                    within=15,
                    what="the write to give up waiting",
                )
                assert daemon.unwritten_age() >= 2.0  # the 2 s lock_timeout
                await other.rollback()
                await eventually(_in_flight(app, 0), within=15, what="the orders written")
    failed = [e for e in logs if e["event"] == "writer.failed"]
    assert failed
    assert "LockNotAvailable 55P03" in failed[0]["error"]
    assert not [e for e in logs if e["event"] == "writer.row_rejected"]
    assert {ref: fake.poll_count(ref) for ref in refs} == dict.fromkeys(refs, 1)


#: A test-only fault in the application's table: every UPDATE fails with an
#: OperationalError-class SQLSTATE (53000, insufficient resources, as a full
#: disk would) while write_fault.failing is true. Installed as the superuser.
FAULT = """
CREATE TABLE public.write_fault (failing boolean NOT NULL);
INSERT INTO public.write_fault VALUES (true);
GRANT SELECT ON public.write_fault TO PUBLIC;
CREATE FUNCTION public.write_fault() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT failing FROM public.write_fault) THEN
        RAISE EXCEPTION 'a test fault' USING ERRCODE = '53000';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER write_fault BEFORE UPDATE ON public.product_orders
    FOR EACH ROW EXECUTE FUNCTION public.write_fault();
"""


async def test_a_failing_write_is_written_again_without_asking_the_provider_again(
    db: str, app: App, fake: FakeProvider
) -> None:
    done = [f"done-{n}" for n in range(20)]
    waiting = [f"pending-{n}" for n in range(3)]
    for ref in done:
        fake.set_script(ref, Script.done())
    for ref in waiting:
        fake.set_script(ref, Script.pending())
    await app.conn.execute(FAULT)
    await app.dispatch([*done, *waiting])
    with capture_logs() as logs:
        async with running(Daemon(settings_for(db, fake))) as daemon:
            # Four tries of each finished result (1 + 2 + 4 s): before, the
            # provider was asked again 5 s after each failed write.
            await eventually(
                _deferred_at_least(daemon, "database", 4 * len(done)),
                within=30,
                what="four tries of each result",
            )
            assert await app.in_flight() == len(done) + len(waiting)
            assert {ref: fake.poll_count(ref) for ref in done} == dict.fromkeys(done, 1)
            # The writer's session is lost too: the results are written over a
            # new one, which gets its lock_timeout like the first.
            await app.conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE %s",
                ("order-monitor % (writer)",),
            )
            await app.conn.execute("UPDATE public.write_fault SET failing = false")
            await eventually(_in_flight(app, len(waiting)), within=30, what="the results written")
    assert {ref: fake.poll_count(ref) for ref in done} == dict.fromkeys(done, 1)
    rows = await app.rows()
    assert all(rows[ref]["pinCode"] == default_pin(ref) for ref in done)
    # A pending answer only refreshes lastSyncAt: not held past the order's
    # next slot, and the next check comes no earlier than that slot.
    earliest = [
        s.offset * (1 - FAST_POLICY.jitter) for s in replace(FAST_POLICY, jitter=0.0).slots(0)
    ]
    for ref in waiting:
        dispatched = rows[ref]["sentAt"].timestamp()
        for k, polled_at in enumerate(fake.polls(ref)):
            assert polled_at - dispatched >= earliest[k] - 0.005, (ref, k)
    assert any(e["event"] == "writer.pending_results_dropped" for e in logs)
    failed = [e for e in logs if e["event"] == "writer.failed"]
    assert "InsufficientResources 53000" in failed[0]["error"]
    # The first session, and the one after the termination.
    sessions = [e for e in logs if e["event"] == "writer.session_configured"]
    assert [e["lock_timeout"] for e in sessions] == ["2s", "2s"]
    assert not [e for e in logs if e["event"] == "writer.row_rejected"]


async def test_results_written_unannounced_are_counted_and_logged_once_per_interval(
    db: str, app: App, fake: FakeProvider
) -> None:
    # The queue cannot be filled in a test: the write function is replaced,
    # while the daemon runs, by the same one with the limit at 0 (see
    # test_write_function for the switch itself).
    refs = [f"quiet-{n}" for n in range(10)]
    for ref in refs:
        fake.set_script(ref, Script.done())
    with capture_logs() as logs:
        async with running(Daemon(settings_for(db, fake))) as daemon:
            statement = schema.write_function_statement(
                Layout(role=DAEMON_ROLE), OutcomeWrites(), queue_limit=0.0
            )
            await app.conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(OWNER_ROLE)))
            await app.conn.execute(statement.query)
            await app.conn.execute("RESET ROLE")
            await app.dispatch(refs[:5])
            await eventually(_in_flight(app, 0), what="the first five written")
            await app.dispatch(refs[5:])
            await eventually(_in_flight(app, 0), what="the next five written")
            skipped = daemon.metrics.registry.get_sample_value(
                "order_monitor_result_announcements_skipped_total"
            )
    assert skipped == len(refs)
    said = [e for e in logs if e["event"] == "writer.announcements_skipped"]
    assert len(said) == 1
    assert said[0]["results"] >= 1
    rows = await app.rows()
    assert all(rows[ref]["pinCode"] == default_pin(ref) for ref in refs)


async def test_results_held_for_locked_rows_leave_the_checker_its_budget(
    db: str, app: App, fake: FakeProvider
) -> None:
    # An admin's SELECT ... FOR UPDATE over more in-flight rows than the
    # checker's budget (here max(4 x 5, 50 x 1) = 50): their results wait in
    # the writer, and must not stop every other order from being checked.
    held = [f"held-{n}" for n in range(55)]
    for ref in [*held, "free"]:
        fake.set_script(ref, Script.done())
    await app.dispatch(held)
    settings = settings_for(db, fake, batch_size=5, concurrency=1)
    async with _transaction(db) as other:
        await other.execute(
            "SELECT FROM product_orders WHERE provider_referans = ANY(%s) FOR UPDATE", (held,)
        )
        async with running(Daemon(settings)) as daemon:
            await eventually(
                _deferred_at_least(daemon, "locked", len(held)), what="every held result kept"
            )
            await app.dispatch(["free"])
            await eventually(_in_flight(app, len(held)), what="the free order checked and written")
            assert {ref: fake.poll_count(ref) for ref in held} == dict.fromkeys(held, 1)
