"""Issue #19: role.sql is one transaction, errors when it cannot grant, and strips a role's powers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout
from order_monitor.db import Queries
from order_monitor.db.changes import ChangeStatements
from tests.conftest import DAEMON_ROLE, Server, as_daemon
from tests.schema.scripts import current, login_role, psql, scalar


@pytest.fixture
def fresh_role(db: str, pg_server: Server) -> Iterator[str]:
    """A role name nobody has created yet; dropped afterwards if a test created it."""
    name = f"om_role_{uuid.uuid4().hex[:8]}"
    yield name
    with psycopg.connect(db, autocommit=True) as conn:
        exists = scalar(conn, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (name,))
        if exists:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
    pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def daemon_statements_work(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """What the daemon runs, with nothing to do: each raises if a grant is missing."""
    queries = Queries(Layout())
    conn.execute(queries._sweep_first, (1,))
    conn.execute(queries._reread, ([],))
    conn.execute(
        sql.SQL("SELECT * FROM {}(%s, %s, %s, %s, %s, %s, %s)").format(
            schema.Names(Layout()).write_function
        ),
        [[]] * 7,
    )
    conn.execute(ChangeStatements(Layout())._everything)


def test_a_rerun_of_role_sql_never_shows_the_daemon_a_moment_without_its_grants(db: str) -> None:
    """Statement by statement, with the daemon's own statements run between each two.

    Before role.sql was one transaction, a daemon working while it ran saw the
    REVOKE before the GRANTs: "permission denied" (23 of 150 re-runs).
    """
    statements = schema.role_statements(Layout(role=DAEMON_ROLE))
    with (
        psycopg.connect(db, autocommit=True) as dba,
        psycopg.connect(as_daemon(db), autocommit=True) as daemon,
    ):
        daemon.execute("SET lock_timeout = '5s'")
        for statement in statements:
            dba.execute(statement.query)
            daemon_statements_work(daemon)  # raises InsufficientPrivilege if a grant is missing
    assert statements[1].text() == "BEGIN"
    assert statements[-2].text() == "COMMIT"


def test_the_same_statements_outside_one_transaction_show_the_gap(db: str) -> None:
    """The test above is not blind: without BEGIN and COMMIT, the daemon is refused once."""
    statements = [
        s
        for s in schema.role_statements(Layout(role=DAEMON_ROLE))
        if s.text() not in ("BEGIN", "COMMIT")
    ]
    with (
        psycopg.connect(db, autocommit=True) as dba,
        psycopg.connect(as_daemon(db), autocommit=True) as daemon,
    ):
        refused = 0
        for statement in statements:
            dba.execute(statement.query)
            try:
                daemon_statements_work(daemon)
            except psycopg.errors.InsufficientPrivilege:
                refused += 1
    assert refused > 0


def test_role_sql_run_by_a_role_that_cannot_grant_is_an_error_and_changes_nothing(
    db: str, pg_server: Server, fresh_role: str, tmp_path: Path
) -> None:
    with login_role(pg_server, db, "om_grantor") as (grantor, dsn):
        pg_server.execute(sql.SQL("ALTER ROLE {} CREATEROLE").format(sql.Identifier(grantor)))
        done = psql(dsn, current("role", tmp_path, Layout(role=fresh_role)))
    assert done.returncode != 0  # psql -v ON_ERROR_STOP=1 exits 3, not 0 with warnings
    assert "ERROR:  order-monitor:" in done.stderr
    assert "cannot grant what role.sql grants; nothing was changed" in done.stderr
    for missing in (
        "CONNECT WITH GRANT OPTION on database",
        "USAGE WITH GRANT OPTION on schema public",
        "SELECT WITH GRANT OPTION on",
        "EXECUTE WITH GRANT OPTION on",
    ):
        assert missing in done.stderr
    assert "no privileges were granted" not in done.stderr
    with psycopg.connect(db) as conn:
        assert scalar(conn, "SELECT count(*) FROM pg_roles WHERE rolname = %s", (fresh_role,)) == 0


def test_role_sql_takes_back_an_existing_roles_powers_and_keeps_login(
    db: str, fresh_role: str, tmp_path: Path
) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEDB CREATEROLE REPLICATION BYPASSRLS").format(
                sql.Identifier(fresh_role)
            )
        )
        done = psql(db, current("role", tmp_path, Layout(role=fresh_role)))
        assert done.returncode == 0, done.stderr
        row = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, rolcanlogin"
            " FROM pg_roles WHERE rolname = %s",
            (fresh_role,),
        ).fetchone()
    assert row == (False, False, False, False, False, True)
