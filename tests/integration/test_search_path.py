"""A hostile ``public.lower(varchar)`` never runs: not in the daemon, not in the operator commands.

On a database created before PostgreSQL 15 every role may CREATE in
``public``. There, ``public.lower(varchar)`` beats ``pg_catalog.lower(text)``
for a varchar column (an exact match wins over an implicit cast, whatever the
path's order), and would run with the rights of whoever calls it. Two fixes
keep it out, and each test below says which one it holds:

* every connection we open pins ``search_path`` to ``pg_catalog, pg_temp``
  (``db.connections``): ``test_every_connection_we_open_pins_search_path``,
  ``test_the_operators_options_are_kept_beside_ours``;
* the SQL we render and install calls ``pg_catalog.lower`` and install.sql sets
  its own path (``schema``): ``test_the_rendered_queries_never_call_it_on_a_default_path``;
* both, end to end: ``test_a_hostile_lower_never_runs`` creates the functions
  *before* the install, as a role that may do nothing else, then runs the
  daemon (sweep, confirm, re-read, write) and status, check and doctor as a
  superuser DSN.

The hostile functions count their calls in a sequence (nextval is not undone
by a rollback, and is allowed in an IMMUTABLE function, as an index predicate
needs): the tests assert it was never called.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from order_monitor import __version__, install
from order_monitor.config import Layout
from order_monitor.daemon import Daemon
from order_monitor.db import ManagedConnection, Queries, connect, connect_forever
from order_monitor.ops.leader import LeaderLock, lock_key
from order_monitor.providers.fake import FakeProvider
from tests.conftest import DAEMON_ROLE, as_daemon, deploy
from tests.daemon_fixtures import App, eventually, running, settings_for
from tests.operator.helpers import environment, invoke_async, providers_file

HOSTILE = f"om_hostile_{os.getpid()}"
CALLS = "public.om_hijacked_calls"

_HOSTILE_OBJECTS = f"""
CREATE SEQUENCE {CALLS};
GRANT USAGE, SELECT ON SEQUENCE {CALLS} TO PUBLIC;
CREATE FUNCTION public.lower(varchar) RETURNS text LANGUAGE plpgsql IMMUTABLE
    AS $$ BEGIN PERFORM pg_catalog.nextval('{CALLS}'); RETURN pg_catalog.lower($1::text); END $$;
CREATE FUNCTION public.lower(text) RETURNS text LANGUAGE plpgsql IMMUTABLE
    AS $$ BEGIN PERFORM pg_catalog.nextval('{CALLS}'); RETURN pg_catalog.lower($1); END $$;
CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql STABLE
    AS $$ BEGIN PERFORM pg_catalog.nextval('{CALLS}'); RETURN pg_catalog.now(); END $$;
CREATE FUNCTION public.to_regclass(varchar) RETURNS regclass LANGUAGE plpgsql STABLE
    AS $$ BEGIN PERFORM pg_catalog.nextval('{CALLS}'); RETURN pg_catalog.to_regclass($1::text); END $$;
"""


@contextlib.contextmanager
def planted_in(dsn: str) -> Iterator[None]:
    """The trap, laid as a database created before PostgreSQL 15 allows: PUBLIC may CREATE in
    public, and a role that may do nothing else creates the functions."""
    role = sql.Identifier(HOSTILE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(role))
        try:
            conn.execute("GRANT CREATE ON SCHEMA public TO PUBLIC")
            conn.execute(sql.SQL("SET ROLE {}").format(role))
            conn.execute(_HOSTILE_OBJECTS)
            conn.execute("RESET ROLE")
            yield
        finally:
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(role))
            conn.execute(sql.SQL("DROP ROLE {}").format(role))


def hijacked(dsn: str) -> int:
    """How many times a hostile function ran (0: never)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {}").format(
                sql.SQL(CALLS)
            )
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def planted(db: str) -> Iterator[str]:
    with planted_in(db):
        # The trap works on a connection with the default path: the tests prove something.
        with psycopg.connect(as_daemon(db), autocommit=True) as conn:
            conn.execute("SELECT lower('X'::varchar)")
        assert hijacked(db) == 1
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("ALTER SEQUENCE {} RESTART").format(sql.SQL(CALLS)))
        assert hijacked(db) == 0
        yield db


async def _probe(conn: psycopg.AsyncConnection[Any]) -> str:
    """Calls lower() unqualified, as a careless statement would; returns the session's path."""
    await conn.execute("SELECT lower('X'::varchar), now(), to_regclass('x'::varchar)")
    row = await (await conn.execute("SHOW search_path")).fetchone()
    assert row is not None
    return str(row[0])


async def test_every_connection_we_open_pins_search_path(planted: str) -> None:
    dsn = as_daemon(planted)
    paths = []
    async with await connect(dsn, "probe") as conn:
        paths.append(await _probe(conn))
    managed = ManagedConnection(dsn, "reader")
    try:
        paths.append(await _probe(await managed.get()))
    finally:
        await managed.close()
    async with await connect_forever(dsn, "handoff", event="probe.failed", max_wait=1) as conn:
        paths.append(await _probe(conn))
    lock = LeaderLock(dsn, lock_key("public", "product_orders"))
    async with lock.held(), await lock._connect() as conn:
        paths.append(await _probe(conn))

    assert paths == ["pg_catalog,pg_temp"] * 4
    assert hijacked(planted) == 0


async def test_the_operators_options_are_kept_beside_ours(
    planted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = make_conninfo(
        as_daemon(planted), options="-c statement_timeout=4321 -c search_path=public"
    )
    async with await connect(theirs, "probe") as conn:
        assert await _probe(conn) == "pg_catalog,pg_temp"
        row = await (await conn.execute("SHOW statement_timeout")).fetchone()
        assert row == ("4321ms",)
    # libpq ignores PGOPTIONS once a conninfo names options: we carry it over.
    monkeypatch.setenv("PGOPTIONS", "-c lock_timeout=1234")
    async with await connect(as_daemon(planted), "probe") as conn:
        row = await (await conn.execute("SHOW lock_timeout")).fetchone()
        assert row == ("1234ms",)
        assert await _probe(conn) == "pg_catalog,pg_temp"
    assert hijacked(planted) == 0


async def test_the_rendered_queries_never_call_it_on_a_default_path(planted: str) -> None:
    """Schema-qualified SQL holds even on a connection someone else opened (engineer A's part)."""
    queries = Queries(Layout())
    with psycopg.connect(planted, autocommit=True) as app:
        app.execute(
            'INSERT INTO product_orders (provider_referans, "providerId", "externalStatus",'
            " \"sentAt\") VALUES ('R1', 'fake', 'sent', pg_catalog.now())"
        )
    async with await psycopg.AsyncConnection.connect(as_daemon(planted), autocommit=True) as conn:
        rows = await queries.sweep_page(conn, None, 10)
        assert len(rows) == 1
        assert len(await queries.confirm(conn, [rows[0].id])) == 1
        assert len(await queries.fetch_in_flight(conn, [rows[0].id])) == 1
    assert hijacked(planted) == 0


async def test_a_hostile_lower_never_runs(bare_db: str, fake: FakeProvider, tmp_path: Path) -> None:
    with planted_in(bare_db):
        await _run_everything(bare_db, fake, tmp_path)


async def _run_everything(bare_db: str, fake: FakeProvider, tmp_path: Path) -> None:
    deploy(bare_db)  # install.sql as the table's owner, after the trap was laid
    settings = settings_for(bare_db, fake)
    async with await psycopg.AsyncConnection.connect(bare_db, autocommit=True) as conn:
        app = App(conn)
        before = await app.dispatch([f"before-{n}" for n in range(20)])
        async with running(Daemon(settings)):
            # Found by the start-up sweep, then announced one by one (confirm).
            after = await app.dispatch([f"after-{n}" for n in range(20)])
            await eventually(lambda: _finished(app, 40), what="every order written")
        assert len(before) == len(after) == 20

    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    # As an operator with a superuser DSN: what runs here runs with every right.
    env = environment(bare_db, env_file, providers_file(tmp_path, fake.base_url or ""))
    order = str(uuid.uuid4())
    for args in (["status"], ["check", "--dry-run", order], ["doctor"]):
        result = await invoke_async(args, env)
        assert "Traceback" not in result.output, (args, result.output)
    assert hijacked(bare_db) == 0


async def _finished(app: App, count: int) -> bool:
    rows = await app.rows()
    return bool(sum(r["externalStatus"] == "done" for r in rows.values()) == count)


async def test_every_session_of_a_running_daemon_carries_its_version(
    db: str, fake: FakeProvider
) -> None:
    """Named ``order-monitor <version> (<purpose>)``: doctor finds old instances by it."""
    async with (
        running(Daemon(settings_for(db, fake))),
        await psycopg.AsyncConnection.connect(db, autocommit=True) as admin,
    ):
        app = App(admin)
        await app.dispatch(["named-1"])  # the writer connects for its first write
        await eventually(lambda: _finished(app, 1), what="the order written")
        cursor = await admin.execute(
            "SELECT application_name FROM pg_stat_activity WHERE usename = %s ORDER BY 1",
            (DAEMON_ROLE,),
        )
        names = [row[0] for row in await cursor.fetchall()]
    # A leader's connections: the lock (which the handoff shares), the
    # listener, the reader and the writer.
    assert names == [
        f"order-monitor {__version__} (leader lock)",
        f"order-monitor {__version__} (listener)",
        f"order-monitor {__version__} (reader)",
        f"order-monitor {__version__} (writer)",
    ]


def test_sql_install_and_uninstall_name_their_session(db: str) -> None:
    # `order-monitor sql install|uninstall` opened a bare session: no name in
    # pg_stat_activity, and the server's default search_path. Seen from a
    # second session while the uninstall waits behind a lock on the table.
    with contextlib.ExitStack() as stack:
        holder = stack.enter_context(psycopg.connect(db))
        holder.execute("LOCK TABLE product_orders IN ACCESS SHARE MODE")
        watcher = stack.enter_context(psycopg.connect(db, autocommit=True))
        outcome: list[BaseException | None] = []

        def uninstall() -> None:
            try:
                list(install.apply(db, "uninstall", Layout(role=DAEMON_ROLE)))
            except BaseException as exc:  # the lock timeout, once the name is seen
                outcome.append(exc)
            else:
                outcome.append(None)

        thread = threading.Thread(target=uninstall)
        thread.start()
        deadline = time.monotonic() + 10
        seen: list[Any] = []
        while not seen and time.monotonic() < deadline:
            seen = watcher.execute(
                "SELECT application_name FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchall()
        holder.rollback()
        thread.join(30)
    assert seen == [(f"order-monitor {__version__} (sql uninstall)",)]
    assert outcome == [None]  # the lock went away within the timeout
