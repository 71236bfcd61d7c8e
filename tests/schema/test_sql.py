"""The SQL a DBA applies: trigger behaviour, idempotence, uninstall, role, quoting."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql

from order_monitor import install, schema
from order_monitor.config import Columns, Layout, OutcomeWrites
from order_monitor.db import Queries
from order_monitor.db.changes import ChangeStatements
from order_monitor.db.inbox import InboxStatements
from order_monitor.engine.changes import Mark
from tests.conftest import (
    DAEMON_PASSWORD,
    DAEMON_ROLE,
    Server,
    as_daemon,
    deploy,
    password_required,
)

SQL_DIR = Path(__file__).parents[2] / "sql"
Conn = psycopg.Connection[tuple[object, ...]]


@pytest.fixture
def app(db: str) -> Iterator[Conn]:
    """A connection acting as the application (writes rows, autocommit)."""
    with psycopg.connect(db, autocommit=True) as conn:
        yield conn


IDLE_LOCK = schema.idle_lock_key(Layout())


class DaemonSide:
    """What the daemon sees of the trigger, in one of its two modes.

    idle: it holds the idle lock, so the trigger must NOTIFY. busy: it does
    not, so the trigger must announce nothing, and the daemon's busy read
    (from a mark taken before the first order) must return the order, once:
    the ids it already returned are known, as the daemon's schedule knows
    them. Either way :meth:`announced` is every order id announced (idle) or
    newly read (busy) since the last call, in order.
    """

    def __init__(self, conn: Conn, mode: str) -> None:
        self.conn = conn
        self.mode = mode
        self.mark = Mark()
        self.known: set[uuid.UUID] = set()
        self._changes = ChangeStatements(Layout())
        xmin = conn.execute(
            "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())::text"
        ).fetchone()
        assert xmin is not None
        self.mark.released(int(str(xmin[0])))

    def announced(self) -> list[str]:
        # Notifications already delivered (they arrive at the writer's COMMIT).
        notified = [n.payload for n in self.conn.notifies(timeout=0.2, stop_after=100)]
        if self.mode == "idle":
            return notified
        assert notified == [], "the daemon does not hold the idle lock: no NOTIFY"
        return [str(order) for order in self.read()]

    def read(self) -> list[uuid.UUID]:
        """The busy read, synchronously, as the handoff makes it."""
        since = self.mark.since()
        statement = self._changes._everything if since is None else self._changes._since
        row = self.conn.execute(statement, () if since is None else (str(since),)).fetchone()
        assert row is not None
        xmin, _, ids = row
        self.mark.read(int(str(xmin)))
        new = [order for order in ids if order not in self.known]  # type: ignore[union-attr]
        self.known.update(new)
        return new


@pytest.fixture(params=["idle", "busy"])
def daemon(db: str, request: pytest.FixtureRequest) -> Iterator[DaemonSide]:
    """The daemon's side of the trigger, in each mode in turn, as the daemon's role."""
    with psycopg.connect(as_daemon(db), autocommit=True) as conn:
        conn.execute("LISTEN order_monitor")
        if request.param == "idle":
            conn.execute("SELECT pg_advisory_lock(%s)", (IDLE_LOCK,))
        yield DaemonSide(conn, request.param)


def insert(app: Conn, **values: object) -> uuid.UUID:
    columns = sql.SQL(", ").join(sql.Identifier(k) for k in values)
    placeholders = sql.SQL(", ").join(sql.Placeholder() for _ in values)
    row = app.execute(
        sql.SQL("INSERT INTO product_orders ({}) VALUES ({}) RETURNING id").format(
            columns, placeholders
        ),
        tuple(values.values()),
    ).fetchone()
    assert row is not None
    return row[0]  # type: ignore[return-value]


def test_committed_files_are_the_default_rendering() -> None:
    for kind in ("install", "uninstall", "role", "decoding"):
        committed = (SQL_DIR / f"{kind}.sql").read_text()
        assert committed == schema.render(kind, Layout(), OutcomeWrites()), (
            f"sql/{kind}.sql drifted: regenerate with `order-monitor sql print {kind}`"
        )


def test_insert_with_referans_notifies_the_id(app: Conn, daemon: DaemonSide) -> None:
    order = insert(app, provider_referans="R1", externalStatus="sent")
    assert daemon.announced() == [str(order)]


def test_insert_without_referans_is_silent(app: Conn, daemon: DaemonSide) -> None:
    insert(app, externalStatus="not_sent")
    assert daemon.announced() == []


def test_setting_referans_later_notifies(app: Conn, daemon: DaemonSide) -> None:
    order = insert(app, externalStatus="not_sent")
    app.execute(
        """UPDATE product_orders SET provider_referans = 'R2', "externalStatus" = 'sent' WHERE id = %s""",
        (order,),
    )
    assert daemon.announced() == [str(order)]


def test_referans_set_before_status_notifies_when_the_order_enters_flight(
    app: Conn, daemon: DaemonSide
) -> None:
    order = insert(app, externalStatus="not_sent")
    app.execute("UPDATE product_orders SET provider_referans = 'R3' WHERE id = %s", (order,))
    assert daemon.announced() == []  # not dispatched yet
    app.execute("""UPDATE product_orders SET "externalStatus" = 'SENT' WHERE id = %s""", (order,))
    assert daemon.announced() == [str(order)]


def test_changing_the_referans_notifies_again(app: Conn, daemon: DaemonSide) -> None:
    order = insert(app, provider_referans="R4", externalStatus="sent")
    assert daemon.announced() == [str(order)]
    app.execute("UPDATE product_orders SET provider_referans = 'R5' WHERE id = %s", (order,))
    # Busy: the read returns the row again, and the daemon, which has it
    # scheduled, keeps its slot (its check re-reads the row's reference).
    assert daemon.announced() == ([str(order)] if daemon.mode == "idle" else [])


def test_updates_that_do_not_touch_the_referans_are_silent(app: Conn, daemon: DaemonSide) -> None:
    order = insert(app, provider_referans="R6", externalStatus="sent")
    assert daemon.announced() == [str(order)]
    app.execute(
        """UPDATE product_orders SET notes = '{"a": 1}', "lastSyncAt" = now() WHERE id = %s""",
        (order,),
    )
    app.execute("UPDATE product_orders SET provider_referans = 'R6' WHERE id = %s", (order,))
    app.execute(
        """UPDATE product_orders SET "externalStatus" = 'processing' WHERE id = %s""", (order,)
    )
    assert daemon.announced() == []


def test_terminal_rows_are_silent(app: Conn, daemon: DaemonSide) -> None:
    insert(app, provider_referans="R7", externalStatus="done")
    insert(app, provider_referans="R8", externalStatus="sent", status="approved")
    insert(app, provider_referans="R9", externalStatus="manual_required")
    rejected = insert(app, provider_referans="R10", externalStatus="sent", status="Rejected")
    app.execute("UPDATE product_orders SET provider_referans = 'R11' WHERE id = %s", (rejected,))
    assert daemon.announced() == []


def test_notify_is_delivered_only_on_commit(db: str, daemon: DaemonSide) -> None:
    with psycopg.connect(db) as writer:
        insert(writer, provider_referans="R12", externalStatus="sent")
        assert daemon.announced() == []
        writer.rollback()
    assert daemon.announced() == []


def conn_functions(db: str) -> list[str]:
    with psycopg.connect(db) as conn:
        return [
            str(name)
            for (name,) in conn.execute(
                "SELECT proname FROM pg_proc WHERE proname LIKE 'order_monitor%' ORDER BY 1"
            ).fetchall()
        ]


def test_install_twice_is_harmless(db: str) -> None:
    lines = list(install.apply(db, "install", Layout()))
    assert len(lines) == len(schema.install_statements(Layout()))
    with psycopg.connect(db) as conn:
        triggers = conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'product_orders'::regclass"
            " AND NOT tgisinternal ORDER BY 1"
        ).fetchall()
        indexes = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE indexname LIKE 'order_monitor%'"
        ).fetchall()
    assert triggers == [("order_monitor_insert_v3",), ("order_monitor_update_v3",)]
    assert conn_functions(db) == [
        "order_monitor_product_orders_notify_v3",
        "order_monitor_product_orders_write_v2",
    ]
    assert sorted(indexes) == [
        ("order_monitor_product_orders_inflight_v1",),
        ("order_monitor_product_orders_outbox_due_v1",),
        ("order_monitor_product_orders_outbox_v1_pkey",),
    ]


def test_uninstall_keeps_every_row_and_column(db: str, app: Conn, daemon: DaemonSide) -> None:
    for i in range(5):
        insert(app, provider_referans=f"U{i}", externalStatus="sent", pinCode=f"PIN{i}")
    daemon.announced()
    before = app.execute("SELECT * FROM product_orders ORDER BY id").fetchall()
    columns_before = app.execute(
        "SELECT column_name, data_type FROM information_schema.columns"
        " WHERE table_name = 'product_orders' ORDER BY ordinal_position"
    ).fetchall()

    list(install.apply(db, "uninstall", Layout()))
    list(install.apply(db, "uninstall", Layout()))  # idempotent too

    assert app.execute("SELECT * FROM product_orders ORDER BY id").fetchall() == before
    assert (
        app.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_name = 'product_orders' ORDER BY ordinal_position"
        ).fetchall()
        == columns_before
    )
    assert app.execute(
        "SELECT count(*) FROM pg_proc WHERE proname LIKE 'order_monitor%'"
    ).fetchone() == (0,)
    insert(app, provider_referans="after", externalStatus="sent")
    # No trigger: no NOTIFY (the busy read reads the table, trigger or not).
    assert [n.payload for n in daemon.conn.notifies(timeout=0.2, stop_after=1)] == []


def test_install_on_a_bare_table_adds_the_column_without_losing_rows(bare_db: str) -> None:
    with psycopg.connect(bare_db, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO product_orders ("externalStatus") SELECT 'sent' FROM generate_series(1, 50)"""
        )
        list(install.apply(bare_db, "install", Layout()))
        assert conn.execute(
            "SELECT count(*), count(provider_referans) FROM product_orders"
        ).fetchone() == (50, 0)


def test_sweep_query_uses_the_partial_index(db: str, app: Conn) -> None:
    app.execute(
        """INSERT INTO product_orders (provider_referans, "externalStatus")
           SELECT 'ref' || g, CASE WHEN g % 100 = 0 THEN 'sent' ELSE 'done' END
           FROM generate_series(1, 20000) g"""
    )
    app.execute("ANALYZE product_orders")
    predicate = schema.in_flight_predicate(Layout())
    plan = app.execute(
        sql.SQL("EXPLAIN SELECT id FROM product_orders WHERE {} ORDER BY id LIMIT 100").format(
            predicate
        )
    ).fetchall()
    assert "order_monitor_product_orders_inflight_v1" in "\n".join(str(r[0]) for r in plan)


# --- the least-privilege role -----------------------------------------------------------


@pytest.fixture
def role_dsn(db: str) -> str:
    """DSN of the daemon role that tests/conftest.py created with our role.sql."""
    return as_daemon(db)


def write(conn: Conn, *rows: tuple[object, ...]) -> list[tuple[object, ...]]:
    """Call the write function with rows of (id, reference, provider id, kind, pin, messages)."""
    columns = list(zip(*rows, strict=True)) if rows else [[]] * 7
    return conn.execute(
        sql.SQL("SELECT order_id, outcome FROM {}(%s, %s, %s, %s, %s, %s, %s)").format(
            schema.Names(Layout()).write_function
        ),
        [list(c) for c in columns],
    ).fetchall()


def row_of(app: Conn, order: uuid.UUID) -> tuple[object, ...]:
    found = app.execute(
        'SELECT status, "externalStatus", "pinCode", "providerMessage", "lastMessage",'
        ' "completedAt" IS NOT NULL, "durationMs" IS NOT NULL FROM product_orders WHERE id = %s',
        (order,),
    ).fetchone()
    assert found is not None
    return found


def test_role_can_do_what_the_daemon_needs(role_dsn: str, app: Conn) -> None:
    order = insert(app, provider_referans="P1", externalStatus="sent", providerId="fake")
    with psycopg.connect(role_dsn, autocommit=True) as daemon:
        daemon.execute("LISTEN order_monitor")
        queries = Queries(Layout())
        assert daemon.execute(queries._reread, ([order],)).fetchall()
        assert daemon.execute(queries._sweep_first, (10,)).fetchall()
        listen = psycopg.connect(role_dsn, autocommit=True)
        listen.execute("LISTEN order_monitor_result")
        assert write(daemon, (order, "P1", "fake", "done", "PIN-1", "ok", "ok")) == [
            (order, "done")
        ]
        assert daemon.execute("SELECT pg_try_advisory_lock(42)").fetchone() == (True,)
        # The handoff: the busy read (xmin is granted; the order above was
        # written before the write, so only an earlier mark returns it: the
        # written order has left flight), taking and releasing the idle lock.
        changes = ChangeStatements(Layout())
        (installed,) = daemon.execute(changes._install, changes._install_params).fetchall()
        assert installed == (True, True, False)  # version 5, xmin granted, no inbox
        (read,) = daemon.execute(changes._everything).fetchall()
        assert read[2] == []  # written: out of flight
        inbox = InboxStatements(Layout())
        daemon.execute(inbox._take_idle_lock, ("200ms",))
        daemon.execute(changes._release)
        announced = [n.payload for n in listen.notifies(timeout=1, stop_after=1)]
        listen.close()
    assert row_of(app, order) == ("pending", "done", "PIN-1", "ok", "ok", True, True)
    assert len(announced) == 1
    assert json.loads(announced[0]) == {
        "id": str(order),
        "outcome": "done",
        "reference": "P1",
        "externalStatus": "done",
        "status": "pending",
    }


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM product_orders",
        """UPDATE product_orders SET "sellPriceAmount" = 0""",
        "UPDATE product_orders SET status = 'approved'",
        """UPDATE product_orders SET "pinCode" = 'X'""",
        """UPDATE product_orders SET "externalStatus" = 'done'""",
        """UPDATE product_orders SET "lastSyncAt" = now()""",
        "INSERT INTO product_orders DEFAULT VALUES",
        'SELECT "userId" FROM product_orders',
        'SELECT "pinCode" FROM product_orders',
        'SELECT "providerMessage" FROM product_orders',
        "SELECT * FROM product_orders",
        "TRUNCATE product_orders",
        "CREATE TABLE stolen (x int)",
        "SELECT xmax FROM product_orders",
        "SELECT ctid FROM product_orders",
    ],
)
def test_role_can_do_nothing_more(role_dsn: str, statement: str) -> None:
    with (
        psycopg.connect(role_dsn, autocommit=True) as daemon,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        daemon.execute(statement)  # type: ignore[call-overload]


def test_a_finished_row_is_out_of_the_roles_reach(role_dsn: str, app: Conn) -> None:
    done = insert(
        app, provider_referans="F1", externalStatus="done", pinCode="REAL", providerId="p"
    )
    approved = insert(app, provider_referans="F2", externalStatus="sent", status="APPROVED")
    with psycopg.connect(role_dsn, autocommit=True) as daemon:
        assert (
            write(
                daemon,
                (done, "F1", "p", "done", "FORGED", "x", "x"),
                (approved, "F2", None, "failed", None, "x", "x"),
            )
            == []
        )
    assert row_of(app, done) == ("pending", "done", "REAL", None, None, False, False)
    assert row_of(app, approved)[:2] == ("APPROVED", "sent")


def test_the_write_is_guarded_by_reference_and_provider(role_dsn: str, app: Conn) -> None:
    rerouted = insert(app, provider_referans="G1", externalStatus="sent", providerId="new")
    resent = insert(app, provider_referans="G2-new", externalStatus="sent", providerId="p")
    with psycopg.connect(role_dsn, autocommit=True) as daemon:
        assert (
            write(
                daemon,
                (rerouted, "G1", "old", "done", "OLD-PROVIDERS-PIN", "x", "x"),
                (resent, "G2-old", "p", "done", "STALE", "x", "x"),
            )
            == []
        )
        assert write(daemon, (rerouted, "G1", "new", "done", "NEW", "ok", "ok")) == [
            (rerouted, "done")
        ]
    assert row_of(app, rerouted)[2] == "NEW"
    assert row_of(app, resent)[2] is None


def test_each_outcome_writes_only_its_own_columns(role_dsn: str, app: Conn) -> None:
    orders = {
        kind: insert(app, provider_referans=kind, externalStatus="sent", pinCode="KEEP")
        for kind in ("pending", "failed", "gave_up", "bogus")
    }
    with psycopg.connect(role_dsn, autocommit=True) as daemon:
        written = write(
            daemon,
            *[
                (order, kind, None, kind, "NEW-PIN", "msg", "last")
                for kind, order in orders.items()
            ],
        )
    assert sorted(str(k) for _, k in written) == ["failed", "gave_up", "pending"]
    # A PIN only ever comes with done; an unknown outcome writes nothing.
    assert row_of(app, orders["pending"]) == (
        "pending",
        "sent",
        "KEEP",
        "msg",
        "last",
        False,
        False,
    )
    assert row_of(app, orders["failed"]) == ("pending", "failed", "KEEP", "msg", "last", True, True)
    assert row_of(app, orders["gave_up"])[:3] == ("pending", "manual_required", "KEEP")
    assert row_of(app, orders["bogus"]) == ("pending", "sent", "KEEP", None, None, False, False)


def test_status_is_written_only_by_an_install_made_for_it(db: str, app: Conn) -> None:
    before = insert(app, provider_referans="S1", externalStatus="sent")
    with psycopg.connect(as_daemon(db), autocommit=True) as daemon:
        write(daemon, (before, "S1", None, "done", None, None, None))
    assert row_of(app, before)[:2] == ("pending", "done")

    deploy(db, OutcomeWrites(done_status="approved", failed_status="rejected"))
    done = insert(app, provider_referans="S2", externalStatus="sent")
    failed = insert(app, provider_referans="S3", externalStatus="sent")
    with psycopg.connect(as_daemon(db), autocommit=True) as daemon:
        write(
            daemon,
            (done, "S2", None, "done", None, None, None),
            (failed, "S3", None, "failed", None, None, None),
        )
    assert row_of(app, done)[:2] == ("approved", "done")
    assert row_of(app, failed)[:2] == ("rejected", "failed")


def test_the_daemon_role_logs_in_with_its_escaped_password_and_only_with_it(
    db: str, pg_server: Server
) -> None:
    if not password_required(pg_server.admin_dsn):
        pytest.skip(
            "this server (ORDER_MONITOR_TEST_DSN) trusts the connection: the run on the "
            "embedded server checks the password"
        )
    wrong = psycopg.conninfo.make_conninfo(db, user=DAEMON_ROLE, password="wrong")
    # pg_reload_conf() only signals the server: wait (bounded) for the rule to apply.
    deadline = time.monotonic() + 10
    refusal = ""
    while not refusal:
        try:
            psycopg.connect(wrong).close()
        except psycopg.OperationalError as exc:
            refusal = str(exc)
        assert time.monotonic() < deadline, "a wrong password was still accepted after 10 s"
        time.sleep(0.05)
    assert "password authentication failed" in refusal
    # The right one, as a key=value conninfo and as a URL with the password percent-encoded.
    psycopg.connect(as_daemon(db)).close()
    params = psycopg.conninfo.conninfo_to_dict(db)
    url = (
        f"postgresql://{quote(DAEMON_ROLE)}:{quote(DAEMON_PASSWORD, safe='')}@/"
        f"{quote(str(params['dbname']))}?host={quote(str(params['host']), safe='')}"
    )
    psycopg.connect(url).close()


@pytest.fixture
def other_role(db: str, pg_server: Server) -> Iterator[str]:
    """DSN of a login role that was granted nothing (roles are cluster-wide: unique name)."""
    name = f"om_other_{uuid.uuid4().hex[:8]}"
    pg_server.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(db, user=name)
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
        pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_no_other_role_may_call_the_write_function(other_role: str, app: Conn) -> None:
    order = insert(app, provider_referans="X1", externalStatus="sent")
    with (
        psycopg.connect(other_role, autocommit=True) as stranger,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        write(stranger, (order, "X1", None, "done", "PWNED", None, None))


def test_role_sql_takes_back_what_an_older_release_granted(db: str) -> None:
    role = sql.Identifier(DAEMON_ROLE)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                'GRANT UPDATE ("pinCode", "externalStatus", status), SELECT ("pinCode")'
                " ON product_orders TO {}"
            ).format(role)
        )
        list(install.apply(db, "role", Layout(role=DAEMON_ROLE)))
        left = conn.execute(
            "SELECT count(*) FROM information_schema.column_privileges"
            " WHERE grantee = %s AND table_name = 'product_orders'"
            " AND (privilege_type <> 'SELECT' OR column_name = 'pinCode')",
            (DAEMON_ROLE,),
        ).fetchone()
    assert left == (0,)


# --- identifiers are quoted, never pasted ------------------------------------------------

EVIL_TABLE = 'orders"; DROP TABLE victims; --'


def test_a_hostile_table_name_is_only_ever_a_name(bare_db: str) -> None:
    with psycopg.connect(bare_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE victims (x int)")
        conn.execute(
            sql.SQL("ALTER TABLE product_orders RENAME TO {}").format(sql.Identifier(EVIL_TABLE))
        )
        conn.execute(
            sql.SQL('ALTER TABLE {} RENAME COLUMN "externalStatus" TO {}').format(
                sql.Identifier(EVIL_TABLE), sql.Identifier("ext'$om$ status")
            )
        )
        layout = Layout(table=EVIL_TABLE, columns=Columns(external_status="ext'$om$ status"))
        list(install.apply(bare_db, "install", layout))
        conn.execute("LISTEN order_monitor")
        dispatch = sql.SQL("INSERT INTO {} (provider_referans, {}) VALUES ('r', 'sent')").format(
            sql.Identifier(EVIL_TABLE), sql.Identifier("ext'$om$ status")
        )
        conn.execute(dispatch)  # busy: nothing announced, the busy read finds it
        (read,) = conn.execute(ChangeStatements(layout)._everything).fetchall()
        assert len(read[2]) == 1
        assert list(conn.notifies(timeout=0.2, stop_after=1)) == []
        with psycopg.connect(bare_db, autocommit=True) as daemon:
            daemon.execute("SELECT pg_advisory_lock(%s)", (schema.idle_lock_key(layout),))
            conn.execute(dispatch)  # idle: NOTIFY
        assert len(list(conn.notifies(timeout=1, stop_after=1))) == 1
        assert conn.execute("SELECT to_regclass('victims')").fetchone() == ("victims",)
        list(install.apply(bare_db, "uninstall", layout))
