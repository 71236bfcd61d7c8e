"""ORDER_MONITOR_CAPTURE=decoding on a server with wal_level = logical, as deployed.

install.sql and role.sql as the table's owner and for the daemon's role,
then decoding.sql as a superuser; the daemon runs as the least-privilege
role (no REPLICATION: it reads the slot through decoding.sql's functions).
Its sweep is an hour away in these tests, so only the slot (and the
start-up sweep, for orders from before a start) can bring orders in.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from psycopg import sql
from structlog.testing import capture_logs

from order_monitor import install, schema
from order_monitor.config import Layout
from order_monitor.daemon import Daemon
from order_monitor.decoding.capture import Capture
from order_monitor.embedded import EmbeddedServer
from order_monitor.engine.handoff import OwnSession
from order_monitor.errors import SchemaError
from order_monitor.metrics import Metrics, counter_total
from order_monitor.providers.fake import FakeProvider
from tests.conftest import DAEMON_ROLE, as_daemon, deploy
from tests.daemon_fixtures import FAST_POLICY, App, eventually, running, settings_for
from tests.decoding.conftest import database_with_table, write_past_the_slot
from tests.schema.scripts import as_owner

LAYOUT = Layout(role=DAEMON_ROLE)
NAMES = schema.Names(LAYOUT)


def apply_decoding(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in schema.statements_for("decoding", LAYOUT):
            conn.execute(statement.query)


@pytest.fixture
def db(logical_dsn: str) -> Iterator[str]:
    """A database on the logical server: the table, install.sql, role.sql, decoding.sql."""
    with database_with_table(logical_dsn) as dsn:
        deploy(dsn)
        apply_decoding(dsn)
        yield dsn


def decoding_settings(db: str, fake: FakeProvider, **overrides: Any) -> Any:
    return settings_for(db, fake, capture="decoding", sweep_interval=3600.0, **overrides)


def slot_state(db: str) -> tuple[object, ...] | None:
    with psycopg.connect(db) as conn:
        return conn.execute(sql.SQL("SELECT * FROM {}()").format(NAMES.slot_function)).fetchone()


async def finished(app: App, count: int) -> bool:
    return await app.in_flight() == 0 and len(await app.rows()) == count


def test_no_trigger_is_left_and_the_daemon_role_cannot_decode_by_itself(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as admin:
        triggers = admin.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'product_orders'::regclass"
            " AND NOT tgisinternal"
        ).fetchone()
        assert triggers == (0,)
        roles = dict(
            admin.execute(
                "SELECT rolname, ARRAY[rolreplication, rolcanlogin] FROM pg_roles"
                " WHERE rolname IN (%s, %s)",
                (DAEMON_ROLE, NAMES.decoder_role_name),
            ).fetchall()
        )
        assert roles == {DAEMON_ROLE: [False, True], NAMES.decoder_role_name: [True, False]}
    state = slot_state(db)
    assert state is not None
    assert state[1] == "reserved"
    with psycopg.connect(as_daemon(db), autocommit=True) as daemon:
        slot = str(state[0])
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            daemon.execute(
                "SELECT * FROM pg_logical_slot_peek_binary_changes(%s, NULL, 1,"
                " 'proto_version', '1', 'publication_names', %s)",
                (slot, NAMES.publication_name),
            )
        # Through the function: only what the publication carries.
        assert daemon.execute(
            sql.SQL("SELECT count(data), count(*) FROM {}(10)").format(NAMES.changes_function)
        ).fetchone() == (0, 1)  # no change yet; the position read up to
        # A healthy slot is never recreated (that would skip its changes).
        with pytest.raises(psycopg.errors.RaiseException, match="not lost"):
            daemon.execute(sql.SQL("SELECT {}()").format(NAMES.recreate_function))


def test_decoding_sql_twice_is_harmless(db: str) -> None:
    apply_decoding(db)
    with psycopg.connect(db) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()"
        ).fetchone() == (1,)


async def test_the_daemon_checks_every_order_the_slot_brings_once(
    db: str, app: App, fake: FakeProvider
) -> None:
    async with running(Daemon(decoding_settings(db, fake))) as daemon:
        assert daemon.handoff is None
        assert daemon.capture is not None
        refs = [f"one-{n}" for n in range(20)]
        for ref in refs:  # single commits
            await app.dispatch([ref])
        burst = [f"burst-{n}" for n in range(300)]
        await app.dispatch(burst)  # one commit
        await eventually(lambda: finished(app, 320), within=60, what="every order checked")
        taken = counter_total(daemon.metrics.decoding_orders, result="taken")
        assert taken >= 320
        # Confirmed: the slot holds back little once everything is scheduled.
        await eventually(
            lambda: _lag_below(db, 1 << 20), within=20, what="the slot advanced past them"
        )
    assert {ref: fake.poll_count(ref) for ref in refs + burst} == dict.fromkeys(refs + burst, 1)


async def _lag_below(db: str, limit: int) -> bool:
    state = slot_state(db)
    return state is not None and state[2] is not None and int(str(state[2])) < limit


async def test_orders_dispatched_while_no_daemon_runs_are_found_after_a_restart(
    db: str, app: App, fake: FakeProvider
) -> None:
    async with running(Daemon(decoding_settings(db, fake))):
        await app.dispatch(["before"])
        await eventually(lambda: finished(app, 1), what="the first order")
    await app.dispatch([f"while-down-{n}" for n in range(50)])
    async with running(Daemon(decoding_settings(db, fake))):
        await eventually(lambda: finished(app, 51), what="the orders from while it was down")


async def test_an_invalidated_slot_is_recreated_and_its_orders_swept(
    db: str, app: App, fake: FakeProvider, logical_dsn: str
) -> None:
    """max_slot_wal_keep_size at 1 MB and 2 WAL segments written: the slot is lost."""
    with psycopg.connect(logical_dsn, autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        admin.execute("SELECT pg_reload_conf()")
    try:
        await app.dispatch([f"lost-{n}" for n in range(10)])  # in the WAL the slot loses
        write_past_the_slot(db)
        state = slot_state(db)
        assert state is not None
        assert state[1] == "lost"
        with capture_logs() as logs:
            settings = decoding_settings(db, fake)
            async with running(Daemon(settings)) as daemon:
                await eventually(lambda: finished(app, 10), what="the orders the slot lost")
                after = await app.dispatch(["after-the-new-slot"])
                await eventually(lambda: finished(app, 11), what="an order read from the new slot")
                assert counter_total(daemon.metrics.decoding_slot_recreated) == 1
        assert after
        recreated = [e for e in logs if e["event"] == "capture.slot_recreated"]
        assert len(recreated) == 1
        assert "max_slot_wal_keep_size" in recreated[0]["note"]
        state = slot_state(db)
        assert state is not None
        assert state[1] != "lost"
    finally:
        with psycopg.connect(logical_dsn, autocommit=True) as admin:
            admin.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            admin.execute("SELECT pg_reload_conf()")


async def test_the_daemon_refuses_to_start_without_decoding_sql(
    logical_dsn: str, fake: FakeProvider
) -> None:
    with database_with_table(logical_dsn) as dsn:
        deploy(dsn)
        with pytest.raises(SchemaError, match=r"run sql/decoding\.sql as a superuser"):
            await Daemon(decoding_settings(dsn, fake)).run()


async def test_a_server_restart_loses_nothing(
    db: str, app: App, fake: FakeProvider, logical_server: tuple[str, EmbeddedServer | None]
) -> None:
    _, server = logical_server
    if server is None:
        pytest.skip("ORDER_MONITOR_TEST_LOGICAL_DSN names a server this test may not restart")
    settings = replace(decoding_settings(db, fake))
    async with running(Daemon(settings, lock_check_interval=0.5)):
        await app.dispatch(["before-the-restart"])
        await eventually(lambda: finished(app, 1), what="the first order")
        server.restart()
        # The application reconnects too.
        async with await psycopg.AsyncConnection.connect(db, autocommit=True) as conn:
            again = App(conn)
            await again.dispatch([f"after-{n}" for n in range(20)])
            await eventually(lambda: finished(again, 21), within=60, what="orders after it")


def confirmed_flush(db: str) -> str:
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
            " WHERE database = current_database()"
        ).fetchone()
    assert row is not None
    return str(row[0])


async def test_the_slot_is_advanced_only_once_the_confirmer_has_scheduled_what_it_read(
    db: str, app: App
) -> None:
    taken: list[uuid.UUID] = []
    through = [False]  # the confirmer holds what was read, until the test says otherwise

    def hand_on(ids: list[uuid.UUID]) -> int:
        taken.extend(ids)
        return len(taken)

    capture = _reading(db, hand_on, lambda ticket: through[0] or ticket == 0)
    task = asyncio.create_task(capture.run())
    try:
        await eventually(lambda: _more_reads(capture, 2), what="the first reads")
        before = confirmed_flush(db)
        (order,) = await app.dispatch(["held"])
        await eventually(lambda: _has(taken, order), what="the order read from the slot")
        reads = capture.reads
        await eventually(lambda: _more_reads(capture, reads + 3), what="three more reads")
        # Still with the confirmer: the slot must not have moved past it.
        assert confirmed_flush(db) == before
        through[0] = True
        await eventually(lambda: _moved(db, before), what="the slot advanced")
    finally:
        task.cancel()
        await asyncio.wait({task})
    # Read again each time until then, and handed on each time (the confirmer dedups).
    assert set(taken) == {order}


def _confirmer_on_the_loop() -> tuple[list[uuid.UUID], Any, Any]:
    """What was handed on, and a hand-on/settled pair that is through with each
    hand-over once the event loop has run (as the confirmer task is), not at once."""
    taken: list[uuid.UUID] = []
    through = [0]

    def hand_on(ids: list[uuid.UUID]) -> int:
        taken.extend(ids)
        ticket = len(taken)
        asyncio.get_running_loop().call_soon(through.__setitem__, 0, ticket)
        return ticket

    return taken, hand_on, lambda ticket: ticket <= through[0]


def _reading(db: str, hand_on: Any, settled: Any, **options: Any) -> Capture:
    return Capture(
        LAYOUT,
        session=OwnSession(as_daemon(db), max_backoff=0.2),
        on_orders=hand_on,
        known=lambda order: False,
        settled=settled,
        on_lost=lambda: None,
        metrics=Metrics(),
        clock=asyncio.get_running_loop().time,
        initial_delay=0.5,  # a read every 50 ms
        **options,
    )


async def test_a_change_is_read_from_the_slot_once_when_the_confirmer_keeps_up(
    db: str, app: App
) -> None:
    """The slot is advanced before the next read, not after: a peek decodes from the
    slot's position, so a read before the advance decoded (and handed on) the last
    read's changes again."""
    taken, hand_on, settled = _confirmer_on_the_loop()
    capture = _reading(db, hand_on, settled)
    task = asyncio.create_task(capture.run())
    try:
        dispatched = []
        for n in range(3):
            reads = capture.reads
            dispatched += await app.dispatch([f"once-{n}"])
            await eventually(
                lambda reads=reads: _more_reads(capture, reads + 3),  # type: ignore[misc]
                what="three more reads",
            )
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert sorted(taken) == sorted(dispatched)  # each once (before: twice)


async def test_a_backlog_read_batch_by_batch_hands_each_change_on_once(db: str, app: App) -> None:
    """Reads that fill their batch follow each other at once, but each waits for
    the confirmer and the advance, so the next starts past it (before: it began
    again from the slot's position, handing on the same changes again)."""
    dispatched = []
    for n in range(12):  # twelve transactions, four messages each: a backlog of six reads
        dispatched += await app.dispatch([f"backlog-{n}"])
    taken, hand_on, settled = _confirmer_on_the_loop()
    capture = _reading(db, hand_on, settled, batch=8)
    task = asyncio.create_task(capture.run())
    try:
        await eventually(lambda: _has_all(taken, dispatched), what="the backlog read")
        reads = capture.reads
        await eventually(lambda: _more_reads(capture, reads + 3), what="three more reads")
    finally:
        task.cancel()
        await asyncio.wait({task})
    assert sorted(taken) == sorted(dispatched)


async def _has_all(taken: list[uuid.UUID], orders: list[uuid.UUID]) -> bool:
    return set(orders) <= set(taken)


async def test_a_steady_stream_of_orders_does_not_hold_the_slot_back(
    db: str, app: App, fake: FakeProvider
) -> None:
    """Each read hands on new orders: the slot still advances as the confirmer catches up."""
    # Reads every 0.2 s, an order every 50 ms: no read finds nothing new.
    policy = replace(FAST_POLICY, initial_delay=2.0)
    async with running(Daemon(decoding_settings(db, fake, policy=policy))):
        positions = {confirmed_flush(db)}
        for n in range(40):
            await app.dispatch([f"stream-{n}"])
            await asyncio.sleep(0.05)
            positions.add(confirmed_flush(db))
        # Before: it moved only once a read found nothing new, i.e. after the stream.
        assert len(positions) >= 5, positions
        await eventually(lambda: finished(app, 40), what="every order of the stream")


async def test_an_order_gone_before_it_is_confirmed_does_not_stall_the_slot(
    db: str, app: App, fake: FakeProvider
) -> None:
    """Its insert is read, its delete is not published: the confirmer drops it, once."""
    async with running(Daemon(decoding_settings(db, fake))) as daemon:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(
                """WITH gone AS (
                       INSERT INTO product_orders (provider_referans, "externalStatus")
                       VALUES ('gone', 'sent') RETURNING id)
                   SELECT id FROM gone"""
            )
            conn.execute("DELETE FROM product_orders WHERE provider_referans = 'gone'")
            before = confirmed_flush(db)
        await eventually(lambda: _moved(db, before), what="the slot advanced past it")
        assert daemon.capture is not None
        reads = daemon.capture.reads
        await eventually(lambda: _more_reads(daemon.capture, reads + 5), what="more reads")
        # Handed on once or twice (before the advance), not at every read.
        assert counter_total(daemon.metrics.decoding_orders, result="taken") <= 2


async def _has(taken: list[uuid.UUID], order: uuid.UUID) -> bool:
    return order in taken


async def _more_reads(capture: Capture, reads: int) -> bool:
    return capture.reads >= reads


async def _moved(db: str, before: str) -> bool:
    return confirmed_flush(db) != before


async def test_a_quiet_orders_table_does_not_hold_back_the_wal_of_others(
    db: str, fake: FakeProvider
) -> None:
    """No order dispatched, another table busy: the slot still confirms what it read."""
    async with running(Daemon(decoding_settings(db, fake))):
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute("CREATE TABLE other (x text)")
            before = confirmed_flush(db)
            conn.execute("INSERT INTO other SELECT repeat('x', 100) FROM generate_series(1, 5000)")
        await eventually(lambda: _moved(db, before), what="the slot advanced past it")


async def test_a_read_that_keeps_failing_is_logged_once_a_minute_and_its_end_once(
    logical_dsn: str,
) -> None:
    """decoding.sql not applied: every read fails, retried every second by the leader."""
    now = [0.0]
    failures = [0]

    class EverySecond(OwnSession):
        async def failed(self, conn: Any, error: str) -> None:
            failures[0] += 1
            now[0] += 1.0  # the leader's session retries a second later
            await super().failed(conn, error)

    with database_with_table(logical_dsn) as dsn:
        deploy(dsn)
        capture = Capture(
            LAYOUT,
            session=EverySecond(as_daemon(dsn), max_backoff=0.2),
            on_orders=lambda ids: 0,
            known=lambda order: False,
            settled=lambda ticket: True,
            on_lost=lambda: None,
            metrics=Metrics(),
            clock=lambda: now[0],
            initial_delay=0.5,
        )
        with capture_logs() as logs:
            task = asyncio.create_task(capture.run())
            try:
                await eventually(
                    lambda: _at_least(failures, 130), within=60, what="130 failed reads"
                )
                apply_decoding(dsn)
                await eventually(lambda: _more_reads(capture, 1), what="a read that works")
            finally:
                task.cancel()
                await asyncio.wait({task})
    failed = [e for e in logs if e["event"] == "capture.read_failed"]
    # At the first failure, then a minute and two minutes later (before: 130 lines).
    assert [e["failed_reads"] for e in failed] == [1, 61, 121]
    assert "does not exist" in failed[0]["error"]
    (recovered,) = [e for e in logs if e["event"] == "capture.read_recovered"]
    assert recovered["failed_reads"] == failures[0]


async def _at_least(count: list[int], n: int) -> bool:
    return count[0] >= n


def test_uninstall_drops_the_slot_the_publication_and_the_functions(db: str) -> None:
    # As the table's owner: refused before anything changes (the slot needs a superuser).
    with pytest.raises(SchemaError, match="need a superuser"):
        list(install.apply(as_owner(db), "uninstall", LAYOUT))
    assert slot_state(db) is not None
    list(install.apply(db, "uninstall", LAYOUT))
    with psycopg.connect(db) as conn:
        left = conn.execute(
            "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()),"
            " (SELECT count(*) FROM pg_publication),"
            " (SELECT count(*) FROM pg_proc WHERE proname LIKE 'order_monitor%')"
        ).fetchone()
    assert left == (0, 0, 0)


EVIL_TABLE = 'orders"; DROP TABLE victims; --'


def test_a_hostile_table_name_is_only_ever_a_name(logical_dsn: str) -> None:
    layout = Layout(table=EVIL_TABLE, role=DAEMON_ROLE)
    with database_with_table(logical_dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('ALTER TABLE product_orders ADD COLUMN "provider_referans" varchar(255)')
        conn.execute(
            sql.SQL("ALTER TABLE product_orders RENAME TO {}").format(sql.Identifier(EVIL_TABLE))
        )
        conn.execute("CREATE TABLE victims (x int)")
        for kind in ("install", "role", "decoding"):
            for statement in schema.statements_for(kind, layout):
                conn.execute(statement.query)
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (provider_referans, \"externalStatus\") VALUES ('r', 'sent')"
            ).format(sql.Identifier(EVIL_TABLE))
        )
        names = schema.Names(layout)
        changes = conn.execute(
            sql.SQL("SELECT count(data) FROM {}(100)").format(names.changes_function)
        ).fetchone()
        assert changes is not None
        assert int(str(changes[0])) >= 3  # begin, relation, insert, commit
        assert conn.execute("SELECT to_regclass('victims')").fetchone() == ("victims",)
        for statement in schema.statements_for("uninstall", layout):
            conn.execute(statement.query)


def test_default_privileges_do_not_reach_the_slots_functions(logical_dsn: str, db: str) -> None:
    """A role the superuser's default privileges would give EXECUTE gets none."""
    stranger = f"om_reporting_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(stranger)))
        try:
            conn.execute(
                sql.SQL("ALTER DEFAULT PRIVILEGES GRANT EXECUTE ON FUNCTIONS TO {}").format(
                    sql.Identifier(stranger)
                )
            )
            for function, arguments in NAMES.decoding_functions:
                conn.execute(sql.SQL("DROP FUNCTION {}({})").format(function, sql.SQL(arguments)))
            apply_decoding(db)  # creates them again: the default privileges apply
            granted = conn.execute(
                "SELECT count(*) FROM pg_proc p CROSS JOIN LATERAL aclexplode(p.proacl) a"
                " JOIN pg_roles r ON r.oid = a.grantee"
                " WHERE p.proname LIKE 'order_monitor%%' AND r.rolname = %s",
                (stranger,),
            ).fetchone()
            assert granted == (0,)
        finally:
            conn.execute(
                sql.SQL("ALTER DEFAULT PRIVILEGES REVOKE EXECUTE ON FUNCTIONS FROM {}").format(
                    sql.Identifier(stranger)
                )
            )
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(stranger)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(stranger)))
