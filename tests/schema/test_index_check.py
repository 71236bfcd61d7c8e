"""Issue #19: an INVALID index, or one built for another in-flight rule, stops install and daemon.

An interrupted ``CREATE INDEX CONCURRENTLY`` (a lock timeout is enough)
leaves an INVALID index that ``IF NOT EXISTS`` then skips: every sweep
page became a scan of the table, silently. The test makes one
deterministically, as the superuser, by clearing ``indisvalid``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from structlog.testing import capture_logs

from order_monitor import schema
from order_monitor.config import Layout
from order_monitor.daemon import Daemon
from order_monitor.db import connect
from order_monitor.db.checks import index_problem
from order_monitor.errors import SchemaError
from order_monitor.providers.fake import FakeProvider
from tests.conftest import DAEMON_ROLE, as_daemon
from tests.daemon_fixtures import settings_for
from tests.schema.scripts import as_owner, current, psql, scalar, sql_command

INDEX = schema.Names(Layout()).index.as_string(None)
INDEX_NAME = schema.Names(Layout()).index_name
LAYOUT = Layout(role=DAEMON_ROLE)
OTHER_RULE = Layout(role=DAEMON_ROLE, in_flight_external_statuses=("sent", "processing"))


def invalidate(db: str) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = %s::regclass", (INDEX,)
        )


def test_install_stops_on_an_invalid_index_and_says_how_to_fix_it(db: str, tmp_path: Path) -> None:
    invalidate(db)
    done = psql(db, current("install", tmp_path, LAYOUT))
    assert done.returncode != 0  # psql -v ON_ERROR_STOP=1: the DBA's deploy stops here
    assert "is INVALID" in done.stderr
    assert f"DROP INDEX CONCURRENTLY {INDEX}" in done.stderr
    # Doing what it says works.
    done = psql(db, f"DROP INDEX CONCURRENTLY {INDEX}", current("install", tmp_path, LAYOUT))
    assert done.returncode == 0, done.stderr
    with psycopg.connect(db) as conn:
        assert scalar(
            conn, "SELECT indisvalid FROM pg_index WHERE indexrelid = %s::regclass", (INDEX,)
        )


def test_install_stops_on_an_index_built_for_another_in_flight_rule(
    db: str, tmp_path: Path
) -> None:
    done = psql(db, current("install", tmp_path, OTHER_RULE))
    assert done.returncode != 0
    assert "another in-flight rule" in done.stderr
    assert "'unknown'" in done.stderr  # the rule it was built for, deparsed
    with psycopg.connect(db) as conn:  # nothing after the check ran: the rule is as it was
        assert scalar(
            conn,
            "SELECT prosrc LIKE '%unknown%' FROM pg_proc"
            " WHERE proname = 'order_monitor_product_orders_notify_v3'",
        )


def test_an_index_built_with_an_unqualified_lower_is_the_same_index(
    db: str, tmp_path: Path
) -> None:
    """Version 2 built it with lower(), which resolved to pg_catalog.lower: no false alarm."""
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"DROP INDEX {INDEX}")
        conn.execute(
            f"""CREATE INDEX {INDEX_NAME} ON product_orders (id) WHERE provider_referans IS NOT NULL
                AND lower("externalStatus") IN ('sent', 'processing', 'queued', 'pending', 'unknown')
                AND lower(status) NOT IN ('approved', 'rejected')"""
        )
    done = psql(db, current("install", tmp_path, LAYOUT))
    assert done.returncode == 0, done.stderr


async def test_the_daemon_sees_an_invalid_or_mismatching_index_as_its_role(db: str) -> None:
    async with await connect(as_daemon(db), "test") as conn:
        assert await index_problem(conn, LAYOUT) is None
        mismatch = await index_problem(conn, OTHER_RULE)
        assert mismatch is not None
        assert "another in-flight rule" in mismatch
        assert "sql/install.sql" in mismatch
        invalidate(db)
        invalid = await index_problem(conn, LAYOUT)
    assert invalid is not None
    assert "is INVALID" in invalid
    assert f"DROP INDEX CONCURRENTLY {INDEX}" in invalid


async def test_the_daemon_refuses_to_start_on_an_invalid_index(db: str, fake: FakeProvider) -> None:
    invalidate(db)
    with pytest.raises(SchemaError, match="is INVALID") as refused:
        await asyncio.wait_for(Daemon(settings_for(db, fake)).run(), 10)
    assert refused.value.exit_code == 78


async def test_without_temporary_the_daemon_still_sees_an_invalid_index(db: str) -> None:
    """A DBA may revoke TEMPORARY from PUBLIC: the rule is then not compared, validity still is."""
    with psycopg.connect(db, autocommit=True) as conn:
        dbname = scalar(conn, "SELECT current_database()")
        conn.execute(
            sql.SQL("REVOKE TEMPORARY ON DATABASE {} FROM PUBLIC").format(
                sql.Identifier(str(dbname))
            )
        )
    async with await connect(as_daemon(db), "test") as conn:
        with capture_logs() as logs:
            assert await index_problem(conn, OTHER_RULE) is None
        assert [e["event"] for e in logs] == ["schema.index_rule_not_compared"]
        invalidate(db)
        invalid = await index_problem(conn, LAYOUT)
    assert invalid is not None
    assert "is INVALID" in invalid


def test_order_monitor_sql_install_says_it_in_one_line_and_exits_78(
    db: str, tmp_path: Path
) -> None:
    invalidate(db)
    result = sql_command("install", as_owner(db), tmp_path, ROLE=DAEMON_ROLE)
    assert result.exit_code == 78
    assert "Traceback" not in result.output
    assert "is INVALID" in result.stderr
    assert f"run DROP INDEX CONCURRENTLY {INDEX}" in result.stderr
