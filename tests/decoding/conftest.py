"""A server that can decode its WAL (``wal_level = logical``), for the pgoutput tests.

The one named by ORDER_MONITOR_TEST_LOGICAL_DSN when set (a superuser DSN:
slots and publications are created and dropped there), else a throwaway
embedded cluster set to ``wal_level = logical``: the suite's shared servers
run with ``replica``, and changing that needs a restart no other test should
see.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from order_monitor.embedded import EmbeddedServer
from tests.conftest import REFERENCE_DDL


@pytest.fixture(scope="session")
def logical_server() -> Iterator[tuple[str, EmbeddedServer | None]]:
    """(superuser DSN, the embedded server to restart, or None when configured)."""
    configured = os.environ.get("ORDER_MONITOR_TEST_LOGICAL_DSN")
    if configured:
        yield configured, None
        return
    server = EmbeddedServer(prefix="order-monitor-logical-")
    try:
        dsn = server.start()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET wal_level = logical")
        server.restart()
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SHOW wal_level").fetchone()
        assert row == ("logical",)
        yield dsn, server
    finally:
        server.stop_and_delete()


@pytest.fixture(scope="session")
def logical_dsn(logical_server: tuple[str, EmbeddedServer | None]) -> str:
    return logical_server[0]


@contextmanager
def database_with_table(logical_dsn: str) -> Iterator[str]:
    """A new database on *logical_dsn* holding the application's orders table; its DSN.

    Dropped at the end with every slot still in it: a slot left behind keeps
    the server's WAL forever (and DROP DATABASE refuses while one exists).
    """
    name = f"om_logical_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(logical_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(logical_dsn, dbname=name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(REFERENCE_DDL.read_text().encode())
        yield dsn
    finally:
        with psycopg.connect(logical_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_catalog.pg_drop_replication_slot(slot_name)"
                " FROM pg_catalog.pg_replication_slots WHERE database = %s",
                (name,),
            )
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def write_past_the_slot(dsn: str) -> None:
    """Three WAL segments and a checkpoint: a slot behind them by more than
    max_slot_wal_keep_size (1 MB in the tests) is invalidated."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE ballast (x text)")
        for _ in range(3):
            conn.execute(
                "INSERT INTO ballast SELECT repeat('x', 1000) FROM generate_series(1, 20000)"
            )
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")


@pytest.fixture
def orders_db(logical_dsn: str) -> Iterator[str]:
    """A new database on *logical_dsn* holding the orders table as it is once installed."""
    with database_with_table(logical_dsn) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            # What sql/install.sql adds to the application's table.
            conn.execute('ALTER TABLE product_orders ADD COLUMN "provider_referans" varchar(255)')
        yield dsn
