"""A schema upgraded from any released version is the schema a fresh install makes.

Built each way on its own database (fresh; version 1, 2, 3, 4 or 5 then
this), with role.sql after, and the catalog compared: our functions (body,
settings, owner, ACL), the triggers, the index, the inbox (versions 2 to 4
had one; none is left), the outbox and the table's grants, each as Postgres deparses it under the pinned
search_path. And the upgrade to version 4 has no gap: the write function
keeps its name and signature, so a daemon of the previous release calling
it through the upgrade has its results recorded for delivery from the
moment install.sql commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout, OutcomeWrites
from tests.conftest import DAEMON_ROLE, Server, as_daemon
from tests.schema.scripts import current, give_table_to_owner, install_release, psql

CATALOG = {
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), p.prosrc, p.prosecdef,
               p.proconfig, p.proowner::regrole::text, p.proacl::text
        FROM pg_proc p WHERE p.proname LIKE 'order_monitor%' ORDER BY 1, 2""",
    "triggers": """
        SELECT tgname, tgenabled, pg_get_triggerdef(oid) FROM pg_trigger
        WHERE tgrelid = 'public.product_orders'::regclass AND NOT tgisinternal ORDER BY 1""",
    "indexes": """
        SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid, i.indisready
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = 'public.product_orders'::regclass ORDER BY 1""",
    "inbox": """
        SELECT c.relname, c.relpersistence, c.relowner::regrole::text, c.relacl::text,
               a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid)
        FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
        LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
        WHERE c.relname LIKE 'order_monitor%inbox%' ORDER BY 1, a.attnum""",
    "outbox": """
        SELECT c.relname, c.relpersistence, c.relowner::regrole::text, c.relacl::text,
               a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), coalesce(a.attacl::text, '')
        FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
        LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
        WHERE c.relname LIKE 'order_monitor%outbox%' AND c.relkind = 'r'
        ORDER BY 1, a.attnum""",
    "outbox indexes": """
        SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisvalid
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE i.indrelid = to_regclass('public.order_monitor_product_orders_outbox_v1')
        ORDER BY 1""",
    "table grants": """
        SELECT coalesce(c.relacl::text, ''), a.attname, coalesce(a.attacl::text, '')
        FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
        WHERE c.oid = 'public.product_orders'::regclass ORDER BY a.attnum""",
}


def catalog(dsn: str) -> dict[str, list[tuple[object, ...]]]:
    with psycopg.connect(dsn, options="-c search_path=pg_catalog,pg_temp") as conn:
        return {name: conn.execute(query).fetchall() for name, query in CATALOG.items()}  # type: ignore[call-overload]


@pytest.fixture
def databases(pg_server: Server, templates: tuple[str, str]) -> Iterator[dict[str, str]]:
    """Databases with the application's table alone, as a DBA's are before we come."""
    names = {
        how: f"om_test_{uuid.uuid4().hex[:12]}"
        for how in ("fresh", "from v1", "from v2", "from v3", "from v4", "from v5")
    }
    try:
        yield {how: pg_server.create_database(n, template=templates[0]) for how, n in names.items()}
    finally:
        for n in names.values():
            pg_server.drop_database(n)


def test_upgrades_from_versions_1_to_5_give_the_fresh_install(
    databases: dict[str, str], tmp_path: Path
) -> None:
    layout = Layout(role=DAEMON_ROLE)
    for how, dsn in databases.items():
        give_table_to_owner(dsn)
        if how != "fresh":
            install_release(dsn, int(how[-1]))
            with psycopg.connect(dsn, autocommit=True) as app:
                app.execute(
                    """INSERT INTO product_orders (provider_referans, "externalStatus")
                       SELECT 'R' || g, 'sent' FROM generate_series(1, 10) g"""
                )
        for kind in ("install", "role"):
            done = psql(dsn, current(kind, tmp_path, layout))
            assert done.returncode == 0, f"{how}, {kind}: {done.stderr}"
    fresh = catalog(databases["fresh"])
    assert all(fresh[part] for part in ("functions", "triggers", "indexes", "outbox"))
    assert fresh["inbox"] == []
    for how in ("from v1", "from v2", "from v3", "from v4", "from v5"):
        upgraded = catalog(databases[how])
        for part, rows in fresh.items():
            assert upgraded[part] == rows, f"{part} differ between a fresh install and one {how}"


def test_the_upgrade_to_version_4_records_results_of_a_daemon_that_kept_running(
    databases: dict[str, str], tmp_path: Path
) -> None:
    """No gap: the previous release's daemon calls the same function before and after."""
    dsn = databases["from v3"]
    layout = Layout(role=DAEMON_ROLE)
    writes = OutcomeWrites(deliver=("done", "failed"), deliver_columns=("tenantId",))
    give_table_to_owner(dsn)
    install_release(dsn, 3)
    with psycopg.connect(dsn, autocommit=True) as app:
        rows = [
            row
            for row in app.execute(
                """INSERT INTO product_orders (provider_referans, "externalStatus", "tenantId")
                   SELECT 'R' || g, 'sent', gen_random_uuid() FROM generate_series(1, 2) g
                   RETURNING id, "tenantId" """
            ).fetchall()
        ]
    ids = [row[0] for row in rows]
    function = schema.Names(layout).write_function

    def write(conn: psycopg.Connection[tuple[object, ...]], order: uuid.UUID, ref: str) -> None:
        written = conn.execute(
            sql.SQL("SELECT * FROM {}(%s, %s, %s, %s, %s, %s, %s)").format(function),
            ([order], [ref], [None], ["done"], ["PIN-1"], ["ok"], ["done"]),
        ).fetchall()
        assert [row[:2] for row in written] == [(order, "done")]

    with psycopg.connect(as_daemon(dsn), autocommit=True) as daemon:
        write(daemon, ids[0], "R1")  # before: version 3, no outbox
        path = tmp_path / "install-v4.sql"
        path.write_text(schema.render("install", layout, writes))
        for script in (path, current("role", tmp_path, layout)):
            done = psql(dsn, script)
            assert done.returncode == 0, done.stderr
        write(daemon, ids[1], "R2")  # the same session, after
    with psycopg.connect(dsn) as conn:
        recorded = conn.execute(
            sql.SQL("SELECT order_id, outcome, columns, provider_message FROM {}").format(
                schema.Names(layout).outbox
            )
        ).fetchall()
    # The result written before the upgrade was not recorded (there was no
    # outbox and no action); the one after was, with the tenant and never the PIN.
    assert recorded == [(ids[1], "done", {"tenantId": str(rows[1][1])}, "ok")]
