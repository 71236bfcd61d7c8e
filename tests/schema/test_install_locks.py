"""Issue #19: install and upgrade beside a busy application, two connections, no sleeps.

A re-run that has nothing to change must take no lock on the orders table;
a run that changes the triggers takes the one lock it needs, at its final
strength, first. The application's side is a real transaction on its own
connection; where the install must be waiting, the test waits for pg_locks
to show it waiting (a condition on the server, not a sleep).
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from order_monitor import install, schema
from order_monitor.config import Layout
from tests.conftest import DAEMON_ROLE, as_daemon
from tests.schema.scripts import (
    RELEASED,
    as_owner,
    current,
    give_table_to_owner,
    install_release,
    psql,
    scalar,
    sql_command,
)

Conn = psycopg.Connection[tuple[object, ...]]
#: The layout the test databases were installed with (our daemon role's name).
DAEMON_LAYOUT = Layout(role=DAEMON_ROLE)
IDLE_LOCK = schema.idle_lock_key(DAEMON_LAYOUT)

#: What the application does to the row it works on, in one transaction.
LOCK_ROW = "SELECT id FROM product_orders WHERE provider_referans = 'busy' FOR UPDATE"
CHANGE_ROW = """UPDATE product_orders SET "lastMessage" = 'app' WHERE provider_referans = 'busy'"""


def triggers(conn: Conn) -> list[str]:
    return [
        str(name)
        for (name,) in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'product_orders'::regclass"
            " AND NOT tgisinternal ORDER BY 1"
        ).fetchall()
    ]


def waiting_on_the_table(admin: Conn) -> bool:
    return bool(
        scalar(
            admin,
            "SELECT count(*) > 0 FROM pg_locks"
            " WHERE relation = 'product_orders'::regclass AND NOT granted",
        )
    )


def wait_until_waiting(admin: Conn, process: subprocess.Popen[str], within: float = 10) -> None:
    """Until the install's lock request queues on the table (it must not have ended)."""
    deadline = time.monotonic() + within
    while not waiting_on_the_table(admin):
        assert process.poll() is None, f"the install ended instead of waiting: {process.stderr}"
        assert time.monotonic() < deadline, "the install never asked for its lock"
        time.sleep(0.02)


def start_psql(dsn: str, script: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["psql", dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("how", ["psql as a superuser", "order-monitor sql install as the owner"])
def test_a_rerun_that_changes_nothing_takes_no_lock_on_the_table(
    db: str, how: str, tmp_path: Path
) -> None:
    """Even behind ACCESS EXCLUSIVE, which queues every lock request: none is made."""
    with psycopg.connect(db) as holder:
        holder.execute("LOCK TABLE product_orders IN ACCESS EXCLUSIVE MODE")
        if how.startswith("psql"):
            done = psql(db, current("install", tmp_path, DAEMON_LAYOUT))
            assert done.returncode == 0, done.stderr
        else:
            list(install.apply(as_owner(db), "install", DAEMON_LAYOUT))
        holder.rollback()


def test_a_rerun_beside_an_open_report_and_an_open_update_does_not_wait(
    db: str, tmp_path: Path
) -> None:
    """The brief's form: a report (ACCESS SHARE) and an UPDATE (ROW EXCLUSIVE) left open."""
    with (
        psycopg.connect(db) as report,
        psycopg.connect(db) as update,
        psycopg.connect(db, autocommit=True) as admin,
    ):
        report.execute("SELECT count(*) FROM product_orders")
        update.execute("INSERT INTO product_orders (\"externalStatus\") VALUES ('not_sent')")
        done = psql(db, "SET lock_timeout = '1ms'", current("install", tmp_path, DAEMON_LAYOUT))
        assert done.returncode == 0, done.stderr
        # Nothing of the install's is left queued behind them either.
        assert not waiting_on_the_table(admin)


@pytest.mark.parametrize("version", [1, 2])
def test_upgrade_beside_select_for_update_then_update_does_not_deadlock(
    bare_db: str, version: int, tmp_path: Path
) -> None:
    give_table_to_owner(bare_db)
    install_release(bare_db, version)
    with (
        psycopg.connect(bare_db) as app,
        psycopg.connect(bare_db, autocommit=True) as admin,
    ):
        admin.execute(
            """INSERT INTO product_orders (provider_referans, "externalStatus") VALUES ('busy', 'sent')"""
        )
        app.execute("SET deadlock_timeout = '50ms'")  # a deadlock, if any, is found at once
        app.execute(LOCK_ROW)
        upgrade = start_psql(bare_db, current("install", tmp_path, DAEMON_LAYOUT))
        if version == 1:
            # Version 1's triggers must go: the install asks for ACCESS EXCLUSIVE,
            # once, first, and queues behind the application's row lock.
            wait_until_waiting(admin, upgrade)
        # The application goes on: its UPDATE is granted ahead of the queued
        # request (it already holds a lock that request waits for), no deadlock.
        app.execute(CHANGE_ROW)
        app.commit()
        _, stderr = upgrade.communicate(timeout=30)
        assert upgrade.returncode == 0, stderr
        assert "deadlock" not in stderr
        assert triggers(admin) == ["order_monitor_insert_v3", "order_monitor_update_v3"]
        assert scalar(
            admin, """SELECT "lastMessage" FROM product_orders WHERE provider_referans = 'busy'"""
        ) == ("app")


def statements(script: str) -> list[str]:
    """The statements of one of our released files (their bodies are dollar-quoted)."""
    found, lines, quoted = [], [], False
    for line in script.splitlines():
        lines.append(line)
        quoted ^= line.count("$om$") % 2 == 1
        if not quoted and line.rstrip().endswith(";"):
            found.append("\n".join(lines))
            lines = []
    return found


def test_version_2s_trigger_swap_deadlocked_with_that_application(bare_db: str) -> None:
    """The test above is not blind: version 2's swap (the issue's report), statement by statement.

    Its transaction took SHARE ROW EXCLUSIVE (CREATE OR REPLACE TRIGGER), then
    asked for ACCESS EXCLUSIVE (DROP TRIGGER) behind the application's row
    lock, and the application's UPDATE then waited for the first: a cycle.
    """
    give_table_to_owner(bare_db)
    install_release(bare_db, 1)
    with (
        psycopg.connect(as_owner(bare_db), autocommit=True) as installer,
        psycopg.connect(bare_db) as app,
        psycopg.connect(bare_db, autocommit=True) as admin,
        ThreadPoolExecutor(1) as pool,
    ):
        admin.execute(
            """INSERT INTO product_orders (provider_referans, "externalStatus") VALUES ('busy', 'sent')"""
        )
        script = statements(RELEASED[2].read_text())
        swap = next(n for n, s in enumerate(script) if "DROP TRIGGER" in s.split("\n")[-1])
        for statement in script[:swap]:
            installer.execute(statement)  # type: ignore[call-overload]
        app.execute(LOCK_ROW)
        dropping = pool.submit(installer.execute, script[swap])  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while not waiting_on_the_table(admin):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        app.execute("SET deadlock_timeout = '50ms'")
        with pytest.raises(psycopg.errors.DeadlockDetected):
            app.execute(CHANGE_ROW)
        app.rollback()
        dropping.result(timeout=30)
        installer.execute("ROLLBACK")


def test_an_upgrade_behind_a_long_transaction_stops_at_the_lock_timeout_changing_nothing(
    bare_db: str, tmp_path: Path
) -> None:
    give_table_to_owner(bare_db)
    install_release(bare_db, 1)
    with (
        psycopg.connect(bare_db) as app,
        psycopg.connect(bare_db, autocommit=True) as admin,
    ):
        admin.execute(
            """INSERT INTO product_orders (provider_referans, "externalStatus") VALUES ('busy', 'sent')"""
        )
        app.execute(LOCK_ROW)
        app.execute(CHANGE_ROW)
        # The application's transaction stays open for longer than the install waits.
        done = psql(bare_db, current("install", tmp_path, DAEMON_LAYOUT))
        assert done.returncode != 0
        assert "lock timeout" in done.stderr
        # The install's transaction is the one that ended; the application's commits.
        app.commit()
        assert triggers(admin) == ["order_monitor_insert_v1", "order_monitor_update_v1"]
        assert scalar(
            admin,
            "SELECT count(*) FROM pg_proc WHERE proname = 'order_monitor_product_orders_notify_v3'",
        ) == (0)
        # The documented retry: run the file again.
        again = psql(bare_db, current("install", tmp_path, DAEMON_LAYOUT))
        assert again.returncode == 0, again.stderr
        assert triggers(admin) == ["order_monitor_insert_v3", "order_monitor_update_v3"]


def test_order_monitor_sql_install_behind_a_long_transaction_exits_75_and_says_retry(
    bare_db: str, tmp_path: Path
) -> None:
    give_table_to_owner(bare_db)
    install_release(bare_db, 1)
    with psycopg.connect(bare_db) as app:
        app.execute(CHANGE_ROW)  # an UPDATE left open: ROW EXCLUSIVE, for longer than we wait
        result = sql_command("install", as_owner(bare_db), tmp_path, ROLE=DAEMON_ROLE)
        app.commit()
    assert result.exit_code == 75  # EX_TEMPFAIL: try again
    assert "Traceback" not in result.output
    assert "lock timeout" in result.stderr
    assert "run it again" in result.stderr


def test_the_upgrade_from_version_4_locks_once_and_its_rerun_not_at_all(
    bare_db: str, tmp_path: Path
) -> None:
    """Version 4's triggers are dropped (ACCESS EXCLUSIVE, once); then nothing differs."""
    give_table_to_owner(bare_db)
    install_release(bare_db, 4)
    with psycopg.connect(bare_db) as reader:
        # A plain SELECT left open: only ACCESS EXCLUSIVE waits for it.
        reader.execute("SELECT count(*) FROM product_orders")
        blocked = psql(bare_db, current("install", tmp_path, DAEMON_LAYOUT))
        reader.rollback()
    assert blocked.returncode != 0
    assert "lock timeout" in blocked.stderr
    done = psql(bare_db, current("install", tmp_path, DAEMON_LAYOUT))
    assert done.returncode == 0, done.stderr
    with psycopg.connect(bare_db) as holder:
        holder.execute("LOCK TABLE product_orders IN ACCESS EXCLUSIVE MODE")
        again = psql(bare_db, current("install", tmp_path, DAEMON_LAYOUT))
        holder.rollback()
    assert again.returncode == 0, again.stderr


def test_the_upgrade_from_version_5_waits_for_open_writes_under_one_lock_and_misses_no_order(
    bare_db: str, tmp_path: Path
) -> None:
    """Version 6 replaces version 5's triggers and function in place: SHARE ROW EXCLUSIVE, once.

    An application transaction open across the upgrade dispatches under
    version 5's triggers, one after it under version 6's; the idle daemon is
    told of both. Reads never wait (no ACCESS EXCLUSIVE), and a re-run takes
    no lock at all.
    """
    give_table_to_owner(bare_db)
    install_release(bare_db, 5)
    upgrade_script = current("install", tmp_path, DAEMON_LAYOUT)
    dispatch = """INSERT INTO product_orders (provider_referans, "externalStatus")
                  VALUES (%s, 'sent') RETURNING id::text"""
    with (
        psycopg.connect(bare_db) as app,
        psycopg.connect(bare_db) as report,
        psycopg.connect(as_daemon(bare_db), autocommit=True) as daemon,
        psycopg.connect(bare_db, autocommit=True) as admin,
    ):
        daemon.execute("SELECT pg_catalog.pg_advisory_lock(%s)", (IDLE_LOCK,))
        daemon.execute("LISTEN order_monitor")
        report.execute("SELECT count(*) FROM product_orders")  # left open: ACCESS SHARE
        before = scalar(app, dispatch, ("before",))  # left open: ROW EXCLUSIVE
        upgrade = start_psql(bare_db, upgrade_script)
        wait_until_waiting(admin, upgrade)
        assert scalar(
            admin,
            "SELECT array_agg(mode::text) FROM pg_locks"
            " WHERE relation = 'product_orders'::regclass AND NOT granted",
        ) == ["ShareRowExclusiveLock"]
        app.commit()
        _, stderr = upgrade.communicate(timeout=30)
        assert upgrade.returncode == 0, stderr
        report.rollback()
        after = scalar(app, dispatch, ("after",))
        app.commit()
        assert [n.payload for n in daemon.notifies(timeout=1, stop_after=2)] == [before, after]
        assert triggers(admin) == ["order_monitor_insert_v3", "order_monitor_update_v3"]
        assert "lower" not in str(
            scalar(
                admin,
                "SELECT string_agg(pg_get_triggerdef(oid), ' ') FROM pg_trigger"
                " WHERE tgrelid = 'product_orders'::regclass AND NOT tgisinternal",
            )
        )
        with psycopg.connect(bare_db) as holder:
            holder.execute("LOCK TABLE product_orders IN ACCESS EXCLUSIVE MODE")
            again = psql(bare_db, upgrade_script)
            holder.rollback()
        assert again.returncode == 0, again.stderr
