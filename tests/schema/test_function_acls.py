"""Issue #19: EXECUTE on our functions for their owner and our role only.

Version 2's trigger function (SECURITY DEFINER) was executable by PUBLIC: a
role with no grant at all attached it to a TEMP table of its own and wrote
into the inbox with the owner's rights. Version 5's writes nothing, and is
still executable by nobody but its owner. ``ALTER DEFAULT PRIVILEGES ... GRANT EXECUTE ON FUNCTIONS``
gave a reporting role the write function. And an install run by a superuser
left functions that run as a superuser.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout
from tests.conftest import DAEMON_ROLE, OWNER_ROLE, Server
from tests.schema.scripts import (
    RELEASED,
    as_owner,
    current,
    give_table_to_owner,
    login_role,
    psql,
    scalar,
)

NAMES = schema.Names(Layout())
LAYOUT = Layout(role=DAEMON_ROLE)


def temp_attack(function: sql.Identifier) -> sql.Composed:
    return sql.SQL(
        """CREATE TEMP TABLE mine (id uuid, provider_referans varchar, "externalStatus" varchar,
                                   status varchar);
           CREATE TRIGGER mine AFTER INSERT ON mine FOR EACH ROW
               EXECUTE FUNCTION {function}('order_monitor');
           INSERT INTO mine SELECT gen_random_uuid(), 'r', 'sent', 'pending'
               FROM generate_series(1, 100)"""
    ).format(function=function)


TEMP_ATTACK = temp_attack(NAMES.function)


def inbox_rows(db: str) -> int:
    with psycopg.connect(db) as conn:
        return int(
            str(
                scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(NAMES.inbox).as_string(None))
            )
        )


def test_a_stranger_cannot_attach_the_trigger_function_to_its_temp_table(
    db: str, pg_server: Server
) -> None:
    with (
        login_role(pg_server, db, "om_stranger") as (_, stranger),
        psycopg.connect(stranger, autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for function"),
    ):
        conn.execute(TEMP_ATTACK)


def test_version_2_let_that_stranger_fill_the_inbox(bare_db: str, pg_server: Server) -> None:
    """The test above is not blind: on version 2's install, the attack works."""
    give_table_to_owner(bare_db)
    assert psql(as_owner(bare_db), RELEASED[2]).returncode == 0
    with login_role(pg_server, bare_db, "om_stranger") as (_, stranger):
        with psycopg.connect(stranger, autocommit=True) as conn:
            conn.execute(temp_attack(NAMES.v2_function))
        assert inbox_rows(bare_db) == 100


@pytest.mark.parametrize("release", ["version 2", "this version"])
def test_default_privileges_do_not_reach_our_functions(
    bare_db: str, pg_server: Server, tmp_path: Path, release: str
) -> None:
    give_table_to_owner(bare_db)
    with login_role(pg_server, bare_db, "om_reporting") as (name, reporting):
        with psycopg.connect(bare_db, autocommit=True) as admin:
            admin.execute(
                sql.SQL(
                    "ALTER DEFAULT PRIVILEGES FOR ROLE {} GRANT EXECUTE ON FUNCTIONS TO {}"
                ).format(sql.Identifier(OWNER_ROLE), sql.Identifier(name))
            )
        if release == "version 2":
            assert psql(as_owner(bare_db), RELEASED[2]).returncode == 0
            function = NAMES.v1_write_function
        else:
            for kind in ("install", "role"):
                done = psql(bare_db, current(kind, tmp_path, LAYOUT))
                assert done.returncode == 0, done.stderr
            function = NAMES.write_function
        call = sql.SQL(
            "SELECT * FROM {}('{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}', '{{}}')"
        ).format(function)
        with psycopg.connect(reporting, autocommit=True) as conn:
            if release == "version 2":
                conn.execute(call)  # the issue: a read-only role may call the write function
            else:
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(call)
        if release == "this version":
            with psycopg.connect(bare_db) as conn:
                acls = conn.execute(
                    "SELECT proname, proacl::text FROM pg_proc"
                    " WHERE proname LIKE 'order_monitor%' ORDER BY 1"
                ).fetchall()
            owner = f"{OWNER_ROLE}=X/{OWNER_ROLE}"
            assert acls == [
                (NAMES.function_name, "{" + owner + "}"),
                (NAMES.write_function_name, "{" + f"{owner},{DAEMON_ROLE}=X/{OWNER_ROLE}" + "}"),
            ]


def test_a_superuser_install_leaves_functions_the_table_owner_owns(
    bare_db: str, tmp_path: Path
) -> None:
    """Even after an older install a superuser ran, whose functions it then owned."""
    give_table_to_owner(bare_db)
    assert psql(bare_db, RELEASED[2]).returncode == 0  # as the superuser, without SET ROLE
    done = psql(bare_db, current("install", tmp_path, LAYOUT))
    assert done.returncode == 0, done.stderr
    with psycopg.connect(bare_db) as conn:
        owners = conn.execute(
            "SELECT DISTINCT proowner::regrole::text FROM pg_proc WHERE proname LIKE 'order_monitor%'"
            " UNION SELECT relowner::regrole::text FROM pg_class WHERE relname LIKE 'order_monitor%'"
        ).fetchall()
    assert owners == [(OWNER_ROLE,)]  # the functions, the inbox, the index


def test_install_on_a_table_a_superuser_owns_warns(bare_db: str, tmp_path: Path) -> None:
    done = psql(bare_db, current("install", tmp_path, LAYOUT))
    assert done.returncode == 0, done.stderr
    assert "WARNING:  order-monitor:" in done.stderr
    assert "owned by the superuser" in done.stderr


def test_install_by_a_role_that_is_not_the_owner_is_refused(
    bare_db: str, pg_server: Server, tmp_path: Path
) -> None:
    give_table_to_owner(bare_db)
    with login_role(pg_server, bare_db, "om_stranger") as (_, stranger):
        done = psql(stranger, current("install", tmp_path, LAYOUT))
    assert done.returncode != 0
    assert f'run this file as the owner of "public"."product_orders" ({OWNER_ROLE})' in done.stderr
