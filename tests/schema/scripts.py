"""Running our SQL files as a DBA does (psql, ON_ERROR_STOP), and the older releases' installs."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql
from psycopg.conninfo import make_conninfo

from order_monitor import schema
from order_monitor.cli import cli
from order_monitor.config import Layout, OutcomeWrites
from tests.conftest import DAEMON_ROLE, OWNER_ROLE, Server

ROOT = Path(__file__).parents[2]
FIXTURES = ROOT / "tests" / "integration" / "fixtures"
#: What each released schema version's install.sql was (the current one is rendered).
RELEASED = {
    1: FIXTURES / "install_v1.sql",
    2: FIXTURES / "install_v2.sql",
    3: FIXTURES / "install_v3.sql",
    4: FIXTURES / "install_v4.sql",
    5: FIXTURES / "install_v5.sql",
}
Conn = psycopg.Connection[tuple[object, ...]]


def psql(dsn: str, *scripts: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run *scripts* (SQL text, or files) in one psql session with ON_ERROR_STOP, as the DBA does."""
    binary = shutil.which("psql")
    if binary is None:
        pytest.skip("psql is not installed: the files are written for it (\\if, ON_ERROR_STOP)")
    args = [binary, dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    for script in scripts:
        args += ["-f", str(script)] if isinstance(script, Path) else ["-c", script]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def current(kind: str, tmp_path: Path, layout: Layout | None = None) -> Path:
    """sql/<kind>.sql as this version renders it for *layout* (the committed file by default)."""
    if layout is None:
        return ROOT / "sql" / f"{kind}.sql"
    path = tmp_path / f"{kind}-{uuid.uuid4().hex[:6]}.sql"
    path.write_text(schema.render(kind, layout, OutcomeWrites()))
    return path


def give_table_to_owner(dsn: str) -> None:
    """As a DBA's database is: the application's role owns the table and may CREATE in public."""
    owner = sql.Identifier(OWNER_ROLE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER TABLE product_orders OWNER TO {}").format(owner))
        conn.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(owner))


def as_owner(dsn: str) -> str:
    """*dsn* working as the table's owner (a NOLOGIN role: the superuser logs in and SETs it)."""
    return make_conninfo(dsn, options=f"-c role={OWNER_ROLE}")


def install_release(dsn: str, version: int) -> None:
    """An older release's install.sql, applied as the table's owner, and its role.sql grants."""
    done = psql(as_owner(dsn), RELEASED[version])
    assert done.returncode == 0, done.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        role = sql.Identifier(DAEMON_ROLE)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role))
        names = schema.Names(Layout())
        # Version 3 renamed the write function (a new return shape).
        function, signature = (
            (names.write_function, schema.write_signature())
            if version >= 3
            else (names.v1_write_function, schema.names.V1_WRITE_SIGNATURE)
        )
        conn.execute(
            sql.SQL("GRANT EXECUTE ON FUNCTION {}({}) TO {}").format(function, signature, role)
        )
        if 2 <= version <= 4:
            conn.execute(sql.SQL("GRANT SELECT, DELETE ON {} TO {}").format(names.inbox, role))


@contextmanager
def login_role(pg_server: Server, db: str, prefix: str) -> Iterator[tuple[str, str]]:
    """(name, DSN) of a new login role with no grant at all (roles are cluster-wide)."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    pg_server.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    try:
        yield name, make_conninfo(db, user=name)
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(sql.Identifier(name)))
        pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def scalar(conn: Conn, query: str, params: tuple[object, ...] = ()) -> object:
    row = conn.execute(query, params or None).fetchone()  # type: ignore[call-overload]
    assert row is not None
    return row[0]


def sql_command(kind: str, dsn: str, tmp_path: Path, **settings: str) -> Result:
    """`order-monitor sql <kind>` as an operator runs it, with only these settings."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {
        "ORDER_MONITOR_DSN": dsn,
        "ORDER_MONITOR_ENV_FILE": str(env_file),
        **{f"ORDER_MONITOR_{k}": v for k, v in settings.items()},
    }
    return CliRunner().invoke(cli, ["sql", kind], env=env, catch_exceptions=False)
