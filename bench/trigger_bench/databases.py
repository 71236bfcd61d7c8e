"""The benchmark's databases: each variant's install, and each form's starting state."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import psycopg

# bench/common: bench/ is on sys.path, bench/trigger.py being run as a script.
from common import (
    REFERENCE_DDL,
    Server,
)
from psycopg import sql

from order_monitor import schema
from trigger_bench.setup import LAYOUT, NAMES, V1_INSTALL, V2_TRIGGERS, V5_INSTALL


def order_no_index(dsn: str) -> None:
    """The application finds an order by its number (the reference DDL has no index on it)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE UNIQUE INDEX product_orders_order_no ON product_orders ("orderNo")')


def install_v1(server: Server, psql: str) -> str:
    """A database with the table and the last version 1 install, applied by psql as a DBA does."""
    return install_release(server, psql, V1_INSTALL, "trig_v1")


def install_release(server: Server, psql: str, script: Path, label: str) -> str:
    """A database with the table and a released install.sql, applied by psql as a DBA does."""
    dsn = server.empty(label)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(REFERENCE_DDL.read_text().encode())
    subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script), dsn],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    order_no_index(dsn)
    return dsn


def install_v5(server: Server, psql: str) -> str:
    """A database with the table and the last version 5 install (the rule in the WHEN)."""
    return install_release(server, psql, V5_INSTALL, "trig_v5")


def install_empty_trigger(server: Server) -> str:
    """A database with the table and triggers on our events that never fire (WHEN false)."""
    dsn = server.empty("trig_empty")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(REFERENCE_DDL.read_text().encode())
        # The column install.sql adds, as it adds it; nothing else of ours.
        conn.execute("ALTER TABLE public.product_orders ADD COLUMN provider_referans varchar(255)")
        conn.execute(
            """CREATE FUNCTION public.bench_nothing() RETURNS trigger
                   LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'"""
        )
        conn.execute(
            """CREATE TRIGGER bench_empty_insert AFTER INSERT ON public.product_orders
                   FOR EACH ROW WHEN (false) EXECUTE FUNCTION public.bench_nothing()"""
        )
        conn.execute(
            """CREATE TRIGGER bench_empty_update
                   AFTER UPDATE OF provider_referans ON public.product_orders
                   FOR EACH ROW WHEN (false) EXECUTE FUNCTION public.bench_nothing()"""
        )
    order_no_index(dsn)
    return dsn


def install_decoding(server: Server, label: str) -> str:
    """A database for ORDER_MONITOR_CAPTURE=decoding, deployed as ``tests/decoding`` does.

    Cloned from the template (the table, install.sql), then role.sql and
    decoding.sql applied as the server's superuser (the ``--dsn`` role): the
    slot, the publication, the decoder role and its functions; decoding.sql
    drops our triggers, so nothing of ours runs in the application's
    transaction. Needs wal_level = logical. Roles this creates (cluster-wide)
    are dropped with the databases; a slot is dropped before its database.
    """
    dsn = server.fresh(label)
    order_no_index(dsn)
    roles = [LAYOUT.role, NAMES.decoder_role_name]
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute("SELECT rolname FROM pg_roles WHERE rolname = ANY(%s)", (roles,))
        existed = {row[0] for row in cursor.fetchall()}
        for statement in schema.role_statements(LAYOUT):
            conn.execute(statement.query)
        for statement in schema.statements_for("decoding", LAYOUT):
            conn.execute(statement.query)
        left = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
            (NAMES.table.as_string(conn),),
        ).fetchone()
    for role in roles:
        if role not in existed:
            server.made_role(role)
    if left != (0,):
        raise RuntimeError(f"decoding.sql left {left} trigger(s) on the table")
    return dsn


async def slot_caught_up(dsn: str, within: float) -> float:
    """Wait until the database's slot has confirmed the WAL flushed now; the seconds waited.

    The decoding daemon reads everything written to the table, the resets'
    bulk loads included: a run must not start while it is still decoding
    one. It confirms what it read once the orders are scheduled (and, with
    nothing of ours in it, the WAL flushed when the read began), so the slot's
    ``confirmed_flush_lsn`` past ``pg_current_wal_flush_lsn()`` taken here
    means everything written before now has been read and scheduled.

    The daemon (``order_monitor/decoding/capture.py``) advances its slot only
    after a read that handed the confirmer nothing new, so while orders keep
    coming it does not advance at all, and an order it handed over that is
    then neither in flight nor known to its scheduler (deleted, truncated,
    forgotten) is handed over again at every read, which then never
    advances. The benchmark therefore also waits for the slot after a
    decoding run (and a busy-cpu window) before its orders are forgotten and
    truncated.
    """
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute("SELECT pg_catalog.pg_current_wal_flush_lsn()")
        row = await cursor.fetchone()
        assert row is not None
        target = row[0]
        while True:
            cursor = await conn.execute(
                "SELECT bool_and(confirmed_flush_lsn >= %s::pg_lsn)"
                " FROM pg_catalog.pg_replication_slots"
                " WHERE database = current_database() AND slot_type = 'logical'",
                (target,),
            )
            row = await cursor.fetchone()
            if row is not None and row[0]:
                return time.monotonic() - started
            if time.monotonic() - started > within:
                raise RuntimeError(
                    f"the decoding daemon's slot did not confirm {target} within {within:g} s"
                )
            await asyncio.sleep(0.05)


def reset(dsn: str, form: str, rows: int) -> None:
    """The table in the state a run of *form* starts from, vacuumed, after a CHECKPOINT.

    Rows are loaded with triggers off (session_replication_role): nobody is
    told about them, and the daemon, whose sweep is a day away, never sees them.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE product_orders")
        if form in ("update", "unrelated"):
            with conn.transaction():
                conn.execute("SET LOCAL session_replication_role = replica")
                if form == "update":
                    conn.execute(
                        """INSERT INTO product_orders ("orderNo", "providerId")
                           SELECT g, 'bench' FROM generate_series(1, %s) g""",
                        (rows,),
                    )
                else:
                    conn.execute(
                        """INSERT INTO product_orders
                               ("orderNo", "providerId", provider_referans, "externalStatus",
                                "sentAt")
                           SELECT g, 'bench', 'w.' || g, 'sent', now()
                           FROM generate_series(1, %s) g""",
                        (rows,),
                    )
        conn.execute("VACUUM ANALYZE product_orders")
        conn.execute("CHECKPOINT")


def set_triggers(dsn: str, enabled: bool) -> None:
    verb = sql.SQL("ENABLE" if enabled else "DISABLE")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for trigger in V2_TRIGGERS:
            conn.execute(
                sql.SQL("ALTER TABLE {table} {verb} TRIGGER {trigger}").format(
                    table=NAMES.table, verb=verb, trigger=sql.Identifier(trigger)
                )
            )


async def in_flight_ids(dsn: str) -> set[int]:
    """Every order in flight in the table, as the daemon keys them (the UUID's integer)."""
    query = sql.SQL("SELECT {id} FROM {table} WHERE {predicate}").format(
        id=sql.Identifier(LAYOUT.columns.id),
        table=NAMES.table,
        predicate=schema.in_flight_predicate(LAYOUT),
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cursor = await conn.execute(query)
        return {row[0].int for row in await cursor.fetchall()}
