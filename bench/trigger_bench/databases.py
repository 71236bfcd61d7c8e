"""The benchmark's databases: each variant's install, and each form's starting state."""

from __future__ import annotations

import subprocess

import psycopg

# bench/common: bench/ is on sys.path, bench/trigger.py being run as a script.
from common import (
    REFERENCE_DDL,
    Server,
)
from psycopg import sql

from order_monitor import schema
from trigger_bench.setup import LAYOUT, NAMES, V1_INSTALL, V2_TRIGGERS


def order_no_index(dsn: str) -> None:
    """The application finds an order by its number (the reference DDL has no index on it)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute('CREATE UNIQUE INDEX product_orders_order_no ON product_orders ("orderNo")')


def install_v1(server: Server, psql: str) -> str:
    """A database with the table and the last version 1 install, applied by psql as a DBA does."""
    dsn = server.empty("trig_v1")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(REFERENCE_DDL.read_text().encode())
    subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(V1_INSTALL), dsn],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    order_no_index(dsn)
    return dsn


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
