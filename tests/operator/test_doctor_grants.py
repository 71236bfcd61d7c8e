"""Issue #19: doctor reads who may execute our functions, what the daemon's role may do, and
who may CREATE where a planted function would shadow pg_catalog's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout
from tests.conftest import Server
from tests.operator.helpers import environment, execute, invoke, lines, verdicts

NAMES = schema.Names(Layout())
WRITE = sql.SQL("{}({})").format(NAMES.write_function, schema.write_signature()).as_string(None)
NOTIFY = f"{NAMES.function.as_string(None)}()"


@pytest.fixture
def reporting(db: str, pg_server: Server) -> Iterator[str]:
    """A read-only reporting role (roles are cluster-wide: a unique name)."""
    name = f"om_reporting_{uuid.uuid4().hex[:8]}"
    pg_server.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        execute(db, f'DROP OWNED BY "{name}"')
        pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_doctor_passes_the_grants_of_a_fresh_install(role_dsn: str, env_file: Path) -> None:
    result = invoke(["doctor"], environment(role_dsn, env_file))
    found = verdicts(result)
    assert found["function ACLs"] == "PASS", result.stdout
    assert found["role powers"] == "PASS", result.stdout
    assert found["schema CREATE"] == "PASS", result.stdout


def test_doctor_fails_when_another_role_or_public_may_execute_our_functions(
    role_dsn: str, db: str, env_file: Path, reporting: str
) -> None:
    execute(db, f'GRANT EXECUTE ON FUNCTION {WRITE} TO "{reporting}"')
    execute(db, f"GRANT EXECUTE ON FUNCTION {NOTIFY} TO PUBLIC")

    result = invoke(["doctor"], environment(role_dsn, env_file))

    assert result.exit_code == 1
    line = lines(result)["function ACLs"]
    assert line.startswith("FAIL"), line
    assert f"{reporting} may execute {NAMES.write_function_name}()" in line
    assert f"PUBLIC may execute {NAMES.function_name}()" in line


def test_doctor_flags_a_trigger_function_a_superuser_owns(
    role_dsn: str, db: str, env_file: Path
) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(f"ALTER FUNCTION {NOTIFY} OWNER TO current_user")  # the test's superuser

    line = lines(invoke(["doctor"], environment(role_dsn, env_file)))["function ACLs"]

    assert line.startswith("WARN"), line
    assert f"{NAMES.function_name}() is owned by the superuser" in line


def test_doctor_fails_on_a_role_that_may_write_the_table_through_a_membership(
    role_dsn: str, db: str, env_file: Path
) -> None:
    role = psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]
    with psycopg.connect(db) as conn:
        owner = conn.execute(
            "SELECT relowner::regrole::text FROM pg_class WHERE oid = 'product_orders'::regclass"
        ).fetchone()
    assert owner is not None
    execute(db, f'GRANT "{owner[0]}" TO "{role}"')
    try:
        result = invoke(["doctor"], environment(role_dsn, env_file))
    finally:
        execute(db, f'REVOKE "{owner[0]}" FROM "{role}"')

    line = lines(result)["role powers"]
    assert line.startswith("FAIL"), line
    assert "UPDATE on the table" in line
    assert "pinCode" in line
    assert f"through its memberships: {owner[0]}" in line


def test_doctor_warns_about_role_attributes_beyond_the_daemons_needs(
    role_dsn: str, db: str, env_file: Path
) -> None:
    role = psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]
    execute(db, f'ALTER ROLE "{role}" CREATEDB')

    line = lines(invoke(["doctor"], environment(role_dsn, env_file)))["role powers"]

    assert line.startswith("WARN"), line
    assert "CREATEDB" in line


def test_doctor_warns_when_public_may_create_in_public(
    role_dsn: str, db: str, env_file: Path
) -> None:
    execute(db, "GRANT CREATE ON SCHEMA public TO PUBLIC")  # the default before PostgreSQL 15

    line = lines(invoke(["doctor"], environment(role_dsn, env_file)))["schema CREATE"]

    assert line.startswith("WARN"), line
    assert "PUBLIC may CREATE in schema public" in line
