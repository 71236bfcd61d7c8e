"""The SQL a DBA applies: trigger behaviour, idempotence, uninstall, role, quoting."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from order_monitor import install, schema
from order_monitor.config import Columns, Layout, OutcomeWrites
from tests.conftest import Server

SQL_DIR = Path(__file__).parents[2] / "sql"
Conn = psycopg.Connection[tuple[object, ...]]


@pytest.fixture
def app(db: str) -> Iterator[Conn]:
    """A connection acting as the application (writes rows, autocommit)."""
    with psycopg.connect(db, autocommit=True) as conn:
        yield conn


@pytest.fixture
def listener(db: str) -> Iterator[Conn]:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("LISTEN order_monitor")
        yield conn


def received(listener: Conn) -> list[str]:
    """Notifications already delivered (they arrive at the writer's COMMIT)."""
    return [n.payload for n in listener.notifies(timeout=0.2, stop_after=100)]


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
    for kind in ("install", "uninstall", "role"):
        committed = (SQL_DIR / f"{kind}.sql").read_text()
        assert committed == schema.render(kind, Layout(), OutcomeWrites()), (
            f"sql/{kind}.sql drifted: regenerate with `order-monitor sql print {kind}`"
        )


def test_insert_with_referans_notifies_the_id(app: Conn, listener: Conn) -> None:
    order = insert(app, provider_referans="R1", externalStatus="sent")
    assert received(listener) == [str(order)]


def test_insert_without_referans_is_silent(app: Conn, listener: Conn) -> None:
    insert(app, externalStatus="not_sent")
    assert received(listener) == []


def test_setting_referans_later_notifies(app: Conn, listener: Conn) -> None:
    order = insert(app, externalStatus="not_sent")
    app.execute(
        """UPDATE product_orders SET provider_referans = 'R2', "externalStatus" = 'sent' WHERE id = %s""",
        (order,),
    )
    assert received(listener) == [str(order)]


def test_referans_set_before_status_notifies_when_the_order_enters_flight(
    app: Conn, listener: Conn
) -> None:
    order = insert(app, externalStatus="not_sent")
    app.execute("UPDATE product_orders SET provider_referans = 'R3' WHERE id = %s", (order,))
    assert received(listener) == []  # not dispatched yet
    app.execute("""UPDATE product_orders SET "externalStatus" = 'SENT' WHERE id = %s""", (order,))
    assert received(listener) == [str(order)]


def test_changing_the_referans_notifies_again(app: Conn, listener: Conn) -> None:
    order = insert(app, provider_referans="R4", externalStatus="sent")
    app.execute("UPDATE product_orders SET provider_referans = 'R5' WHERE id = %s", (order,))
    assert received(listener) == [str(order), str(order)]


def test_updates_that_do_not_touch_the_referans_are_silent(app: Conn, listener: Conn) -> None:
    order = insert(app, provider_referans="R6", externalStatus="sent")
    assert received(listener) == [str(order)]
    app.execute(
        """UPDATE product_orders SET notes = '{"a": 1}', "lastSyncAt" = now() WHERE id = %s""",
        (order,),
    )
    app.execute("UPDATE product_orders SET provider_referans = 'R6' WHERE id = %s", (order,))
    app.execute(
        """UPDATE product_orders SET "externalStatus" = 'processing' WHERE id = %s""", (order,)
    )
    assert received(listener) == []


def test_terminal_rows_are_silent(app: Conn, listener: Conn) -> None:
    insert(app, provider_referans="R7", externalStatus="done")
    insert(app, provider_referans="R8", externalStatus="sent", status="approved")
    insert(app, provider_referans="R9", externalStatus="manual_required")
    rejected = insert(app, provider_referans="R10", externalStatus="sent", status="Rejected")
    app.execute("UPDATE product_orders SET provider_referans = 'R11' WHERE id = %s", (rejected,))
    assert received(listener) == []


def test_notify_is_delivered_only_on_commit(db: str, listener: Conn) -> None:
    with psycopg.connect(db) as writer:
        insert(writer, provider_referans="R12", externalStatus="sent")
        assert received(listener) == []
        writer.rollback()
    assert received(listener) == []


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
    assert triggers == [("order_monitor_insert_v1",), ("order_monitor_update_v1",)]
    assert indexes == [("order_monitor_product_orders_inflight_v1",)]


def test_uninstall_keeps_every_row_and_column(db: str, app: Conn, listener: Conn) -> None:
    for i in range(5):
        insert(app, provider_referans=f"U{i}", externalStatus="sent", pinCode=f"PIN{i}")
    received(listener)
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
    assert received(listener) == []


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
def role_dsn(db: str, pg_server: Server) -> Iterator[str]:
    """DSN logging in as a freshly created daemon role (roles are cluster-wide: unique name)."""
    layout = Layout(role=f"om_role_{uuid.uuid4().hex[:8]}")
    list(install.apply(db, "role", layout))
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD 'test-only'").format(sql.Identifier(layout.role))
        )
    try:
        yield psycopg.conninfo.make_conninfo(db, user=layout.role, password="test-only")
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(layout.role)))
        pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(layout.role)))


def test_role_can_do_what_the_daemon_needs(role_dsn: str, app: Conn) -> None:
    order = insert(app, provider_referans="P1", externalStatus="sent")
    with psycopg.connect(role_dsn, autocommit=True) as daemon:
        daemon.execute("LISTEN order_monitor")
        row = daemon.execute(
            'SELECT id, status, "externalStatus", provider_referans, "providerId", "sentAt",'
            ' "createdAt", "lastSyncAt" FROM product_orders WHERE id = %s',
            (order,),
        ).fetchone()
        assert row is not None
        daemon.execute(
            """UPDATE product_orders SET "externalStatus" = 'done', "pinCode" = 'X',
               "providerMessage" = 'ok', "lastMessage" = 'ok', "lastSyncAt" = now(),
               "completedAt" = now(), "durationMs" = 1 WHERE id = %s AND provider_referans = 'P1'""",
            (order,),
        )
        daemon.execute("SELECT pg_notify('order_monitor_result', %s)", (str(order),))
        assert daemon.execute("SELECT pg_try_advisory_lock(42)").fetchone() == (True,)


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM product_orders",
        """UPDATE product_orders SET "sellPriceAmount" = 0""",
        "UPDATE product_orders SET status = 'approved'",
        "INSERT INTO product_orders DEFAULT VALUES",
        'SELECT "userId" FROM product_orders',
        "SELECT * FROM product_orders",
        "TRUNCATE product_orders",
        "CREATE TABLE stolen (x int)",
    ],
)
def test_role_can_do_nothing_more(role_dsn: str, statement: str) -> None:
    with (
        psycopg.connect(role_dsn, autocommit=True) as daemon,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        daemon.execute(statement)  # type: ignore[call-overload]


def test_role_gets_status_only_when_configured_to_write_it(db: str, pg_server: Server) -> None:
    layout = Layout(role=f"om_role_{uuid.uuid4().hex[:8]}")
    try:
        list(install.apply(db, "role", layout, OutcomeWrites(done_status="approved")))
        with psycopg.connect(db) as conn:
            granted = conn.execute(
                "SELECT has_column_privilege(%s, 'product_orders', 'status', 'UPDATE')",
                (layout.role,),
            ).fetchone()
        assert granted == (True,)
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(layout.role)))
        pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(layout.role)))


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
        conn.execute(
            sql.SQL("INSERT INTO {} (provider_referans, {}) VALUES ('r', 'sent')").format(
                sql.Identifier(EVIL_TABLE), sql.Identifier("ext'$om$ status")
            )
        )
        assert len(list(conn.notifies(timeout=1, stop_after=1))) == 1
        assert conn.execute("SELECT to_regclass('victims')").fetchone() == ("victims",)
        list(install.apply(bare_db, "uninstall", layout))
