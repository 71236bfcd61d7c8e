"""uninstall.sql refuses to drop results that were never delivered, unless told to.

The outbox holds approvals and refunds the application has not been asked
for yet: dropping it loses money silently. Run as a DBA runs the file (psql,
ON_ERROR_STOP) and as `order-monitor sql uninstall` does.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from order_monitor import install, schema
from order_monitor.config import Layout
from order_monitor.errors import SchemaError
from tests.schema.scripts import ROOT, psql

OUTBOX = schema.Names(Layout()).outbox


def record(db: str, *, dead: bool = False) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (order_id, outcome, dead_at) VALUES (%s, 'failed',"
                " CASE WHEN %s THEN pg_catalog.now() END)"
            ).format(OUTBOX),
            (uuid.uuid4(), dead),
        )


def outbox_exists(db: str) -> bool:
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (OUTBOX.as_string(None),)
        ).fetchone()
    assert row is not None
    return bool(row[0])


def triggers(db: str) -> int:
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.product_orders'::regclass"
            " AND NOT tgisinternal"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_the_file_refuses_before_it_changes_anything(db: str) -> None:
    record(db)
    record(db, dead=True)
    done = psql(db, ROOT / "sql" / "uninstall.sql")
    assert done.returncode != 0
    assert "still holds 1 deliveries not yet made and 1 dead letters" in done.stderr
    assert "SET order_monitor.drop_undelivered = on" in done.stderr
    # Refused first: the triggers and the outbox are all still there.
    assert outbox_exists(db)
    assert triggers(db) == 2


def test_told_to_it_drops_them(db: str) -> None:
    record(db)
    done = psql(db, "SET order_monitor.drop_undelivered = on", ROOT / "sql" / "uninstall.sql")
    assert done.returncode == 0, done.stderr
    assert not outbox_exists(db)
    assert triggers(db) == 0


def test_the_command_refuses_and_then_drops_with_the_flag(db: str) -> None:
    record(db, dead=True)
    with pytest.raises(SchemaError, match="nothing was dropped"):
        list(install.apply(db, "uninstall", Layout()))
    assert outbox_exists(db)
    list(install.apply(db, "uninstall", Layout(), drop_undelivered=True))
    assert not outbox_exists(db)


def test_an_empty_outbox_is_dropped_without_asking(db: str) -> None:
    list(install.apply(db, "uninstall", Layout()))
    assert not outbox_exists(db)
    # And uninstall runs again cleanly once everything is gone.
    list(install.apply(db, "uninstall", Layout()))
