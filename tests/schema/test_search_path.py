"""Issue #19: a hostile ``public.lower(varchar)`` never runs, through install, trigger, write or sweep.

On a database where PUBLIC may CREATE in ``public`` (every one created
before PostgreSQL 15), a role that can do nothing else creates a ``lower``
that is a better match for a varchar column than ``pg_catalog.lower(text)``.
Whoever resolves an unqualified ``lower`` on such a path runs it with their
own rights: the owner during the install, the application in the trigger,
the daemon in its queries. Here it records each call, so a test sees it ran.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout
from tests.conftest import DAEMON_ROLE, Server, as_daemon
from tests.schema.scripts import RELEASED, current, give_table_to_owner, login_role, psql, scalar

# IMMUTABLE, as a lie: an index predicate accepts nothing else. So it may
# not write a table; it counts its calls on a sequence, which no rollback
# takes back.
HOSTILE = """
CREATE SEQUENCE public.hijack_calls;
GRANT USAGE ON SEQUENCE public.hijack_calls TO PUBLIC;
CREATE FUNCTION public.lower(character varying) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    PERFORM pg_catalog.nextval('public.hijack_calls');
    RETURN pg_catalog.lower($1::text);
END $$;
CREATE FUNCTION public.lower(character) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    PERFORM pg_catalog.nextval('public.hijack_calls');
    RETURN pg_catalog.lower($1::text);
END $$;
"""

IN_FLIGHT = """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus")
               SELECT 'R' || g, 'p', 'sent' FROM generate_series(1, 20) g"""


def called(db: str) -> bool:
    """Whether the planted lower() ever ran, in any session, committed or not."""
    with psycopg.connect(db) as conn:
        return bool(scalar(conn, "SELECT is_called FROM public.hijack_calls"))


def test_install_trigger_write_and_sweep_never_call_a_hostile_lower(
    bare_db: str, pg_server: Server, tmp_path: Path
) -> None:
    give_table_to_owner(bare_db)
    with psycopg.connect(bare_db, autocommit=True) as app:
        app.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        app.execute("ALTER TABLE product_orders ADD COLUMN provider_referans varchar(255)")
        app.execute(IN_FLIGHT)
        with login_role(pg_server, bare_db, "om_evil") as (_, evil):
            with psycopg.connect(evil, autocommit=True) as conn:
                conn.execute(HOSTILE)  # type: ignore[call-overload]
            # The DBA, as a superuser, with psql and the default search_path.
            for kind in ("install", "role"):
                done = psql(bare_db, current(kind, tmp_path, Layout(role=DAEMON_ROLE)))
                assert done.returncode == 0, done.stderr
            # The application: dispatches fire the insert trigger, changes the update one.
            app.execute(IN_FLIGHT)
            app.execute(
                """UPDATE product_orders SET provider_referans = provider_referans || 'x'"""
            )
            app.execute("""UPDATE product_orders SET "externalStatus" = 'processing'""")
            # The daemon's role, with the default search_path too: the in-flight
            # rule it sweeps and re-reads with, and the write function.
            with psycopg.connect(as_daemon(bare_db), autocommit=True) as daemon:
                rows = daemon.execute(
                    sql.SQL(
                        "SELECT id, provider_referans FROM product_orders WHERE {} LIMIT 5"
                    ).format(schema.in_flight_predicate(Layout()))
                ).fetchall()
                assert len(rows) == 5
                written = daemon.execute(
                    sql.SQL("SELECT * FROM {}(%s, %s, %s, %s, %s, %s, %s)").format(
                        schema.Names(Layout()).write_function
                    ),
                    (
                        [r[0] for r in rows],
                        [r[1] for r in rows],
                        ["p"] * 5,
                        ["done"] * 5,
                        ["PIN"] * 5,
                        ["ok"] * 5,
                        ["ok"] * 5,
                    ),
                ).fetchall()
                assert len(written) == 5
            assert not called(bare_db)


def test_the_hostile_lower_is_a_real_threat_to_the_version_2_install(
    bare_db: str, pg_server: Server
) -> None:
    """The test above is not blind: version 2's install, on the same database, runs it."""
    give_table_to_owner(bare_db)
    with psycopg.connect(bare_db, autocommit=True) as app:
        app.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
        app.execute("ALTER TABLE product_orders ADD COLUMN provider_referans varchar(255)")
        app.execute(IN_FLIGHT)
        with login_role(pg_server, bare_db, "om_evil") as (_, evil):
            with psycopg.connect(evil, autocommit=True) as conn:
                conn.execute(HOSTILE)  # type: ignore[call-overload]
            done = psql(bare_db, RELEASED[2])
            assert done.returncode == 0, done.stderr
            ran = called(bare_db)
    assert ran, "version 2's index build should have called the planted lower()"
