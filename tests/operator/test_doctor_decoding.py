"""``order-monitor doctor`` with ORDER_MONITOR_CAPTURE=decoding, on a wal_level = logical server.

Deployed as tests/decoding/test_capture.py deploys it (install.sql and
role.sql, then decoding.sql as a superuser); doctor runs as the daemon's
least-privilege role, as an operator runs it. Each failure is provoked for
real: the setting left unlimited, the slot dropped or invalidated, the
triggers put back by install.sql, another publication of the same name.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import Result
from psycopg import sql

from order_monitor.operator.status import format_bytes
from order_monitor.providers.fake import FakeProvider
from order_monitor.schema.decoding import decoding_uninstall_statements
from tests.conftest import DAEMON_ROLE, Server, _fresh, as_daemon, deploy
from tests.decoding.conftest import logical_dsn, logical_server, write_past_the_slot
from tests.decoding.test_capture import LAYOUT, NAMES, db, slot_state
from tests.operator.helpers import (
    environment,
    execute,
    invoke,
    invoke_async,
    lines,
    providers_file,
    verdicts,
)

#: The checks of the decoding mode, in the order doctor runs them.
DECODING_CHECKS = (
    "wal_level",
    "decoding functions",
    "slot",
    "max_slot_wal_keep_size",
    "publication",
    "capture triggers",
)
#: Not asked for in decoding mode: decoding.sql dropped them on purpose.
TRIGGER_LINES = {"trigger order_monitor_insert_v3", "trigger order_monitor_update_v3"}


def reload_with(admin_dsn: str, keep_size: str | None) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        if keep_size is None:
            conn.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
        else:
            conn.execute(
                sql.SQL("ALTER SYSTEM SET max_slot_wal_keep_size = {}").format(
                    sql.Literal(keep_size)
                )
            )
        conn.execute("SELECT pg_reload_conf()")
    # pg_reload_conf() signals the postmaster; each backend rereads at its next command.
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        for _ in range(100):
            row = conn.execute("SHOW max_slot_wal_keep_size").fetchone()
            if row is not None and row[0] == (keep_size or "-1"):
                return
            conn.execute("SELECT pg_sleep(0.05)")
    raise AssertionError(f"max_slot_wal_keep_size never became {keep_size}")


@pytest.fixture
def keep_size(logical_dsn: str) -> Iterator[str]:
    """max_slot_wal_keep_size set to 10GB for the test, reset after."""
    reload_with(logical_dsn, "10GB")
    try:
        yield "10GB"
    finally:
        reload_with(logical_dsn, None)


def doctor(dsn: str, env_file: Path, **extra: str) -> Result:
    """Doctor as the daemon's role, without providers (their check only WARNs then)."""
    return invoke(["doctor"], environment(as_daemon(dsn), env_file, None, **extra))


def decoding_doctor(dsn: str, env_file: Path) -> Result:
    return doctor(dsn, env_file, CAPTURE="decoding")


async def test_a_good_deploy_passes_every_decoding_check(
    db: str, keep_size: str, fake: FakeProvider, env_file: Path, tmp_path: Path
) -> None:
    assert fake.base_url is not None
    env = environment(
        as_daemon(db), env_file, providers_file(tmp_path, fake.base_url), CAPTURE="decoding"
    )

    result = await invoke_async(["doctor"], env)

    assert result.exit_code == 0, result.output
    found = verdicts(result)
    assert {check: found.get(check) for check in DECODING_CHECKS} == dict.fromkeys(
        DECODING_CHECKS, "PASS"
    ), result.stdout
    assert {check for check, verdict in found.items() if verdict != "PASS"} == set()
    assert not TRIGGER_LINES & set(found)
    said = lines(result)
    state = slot_state(db)
    assert state is not None
    assert f"{state[0]} is reserved, " in said["slot"]
    assert "behind" in said["slot"]
    assert "more before it is invalidated" in said["slot"]
    assert "10GB" in said["max_slot_wal_keep_size"]
    assert '"externalStatus"' not in said["publication"]
    assert "insert, update of public.product_orders" in said["publication"]
    assert "id, provider_referans, externalStatus, status" in said["publication"]
    # In the order run, right after the handoff's checks.
    names = list(found)
    assert names.index("lock holders") < names.index("wal_level")
    assert [n for n in names if n in DECODING_CHECKS] == list(DECODING_CHECKS)


def test_an_unlimited_max_slot_wal_keep_size_fails_saying_what_it_risks(
    db: str, env_file: Path
) -> None:
    # The server's default: -1.
    result = decoding_doctor(db, env_file)

    assert result.exit_code == 1
    line = lines(result)["max_slot_wal_keep_size"]
    assert line.startswith("FAIL  max_slot_wal_keep_size: is -1 (unlimited): ")
    assert "until the server's disk is full" in line
    assert "ALTER SYSTEM SET max_slot_wal_keep_size = '10GB'; SELECT pg_reload_conf();" in line


def test_a_dropped_slot_fails_and_says_the_daemon_recreates_it(
    db: str, keep_size: str, env_file: Path
) -> None:
    state = slot_state(db)
    assert state is not None
    execute(db, "SELECT pg_drop_replication_slot(%s)", (state[0],))

    result = decoding_doctor(db, env_file)

    assert result.exit_code == 1
    line = lines(result)["slot"]
    assert line.startswith(f"FAIL  slot: {state[0]} is missing: ")
    assert "recreates it at its next read and then sweeps" in line
    assert verdicts(result)["decoding functions"] == "PASS"


def test_a_lost_slot_fails_and_says_the_daemon_recreates_it(
    db: str, logical_dsn: str, env_file: Path
) -> None:
    """As test_capture invalidates it: 1 MB of keep size, three WAL segments written."""
    reload_with(logical_dsn, "1MB")
    try:
        write_past_the_slot(db)
        state = slot_state(db)
        assert state is not None
        assert state[1] == "lost"

        result = decoding_doctor(db, env_file)
    finally:
        reload_with(logical_dsn, None)

    assert result.exit_code == 1
    line = lines(result)["slot"]
    assert line.startswith(f"FAIL  slot: {state[0]} is lost: invalidated for falling behind")
    assert "recreates it at its next read and then sweeps" in line
    assert lines(result)["max_slot_wal_keep_size"].startswith("PASS  max_slot_wal_keep_size: 1MB")


def test_triggers_put_back_by_install_fail_in_decoding_mode(
    db: str, keep_size: str, env_file: Path
) -> None:
    deploy(db)  # install.sql and role.sql again: the triggers are back

    result = decoding_doctor(db, env_file)

    assert result.exit_code == 1
    line = lines(result)["capture triggers"]
    assert line.startswith(
        "FAIL  capture triggers: order_monitor_insert_v3, order_monitor_update_v3 still on "
        "the table in decoding mode: they cost the application's commits for nothing"
    )
    assert "run sql/decoding.sql again" in line
    # The rest of the capture is still right.
    found = verdicts(result)
    assert {c: found[c] for c in DECODING_CHECKS if c != "capture triggers"} == dict.fromkeys(
        [c for c in DECODING_CHECKS if c != "capture triggers"], "PASS"
    )


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            "SET TABLE product_orders (id, status)",
            "its columns are id, status (decoding.sql: id, provider_referans, externalStatus, "
            "status)",
        ),
        ("SET TABLE product_orders", "its columns are id, "),
        (
            "SET (publish = 'insert, update, delete, truncate')",
            "it publishes insert, update, delete, truncate (decoding.sql: insert, update)",
        ),
        ("SET (publish = 'insert')", "it publishes insert (decoding.sql: insert, update)"),
        (
            'SET TABLE product_orders (id, provider_referans, "externalStatus", status)'
            " WHERE (status <> 'x')",
            "it filters the rows (WHERE ",
        ),
        ("ADD TABLE ballast", "it also publishes public.ballast"),
        ("DROP TABLE product_orders", "it does not publish public.product_orders"),
    ],
)
def test_another_publication_of_the_same_name_fails(
    db: str, keep_size: str, env_file: Path, change: str, said: str
) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("CREATE TABLE ballast (x text PRIMARY KEY)")
        conn.execute(sql.SQL("ALTER PUBLICATION {} ").format(NAMES.publication) + sql.SQL(change))

    result = decoding_doctor(db, env_file)

    assert result.exit_code == 1
    line = lines(result)["publication"]
    assert line.startswith(
        f"FAIL  publication: {NAMES.publication_name} is not the one decoding.sql creates: "
    )
    assert said in line, line
    assert f'DROP PUBLICATION "{NAMES.publication_name}"; then run sql/decoding.sql again' in line


def test_missing_and_refused_functions_fail(db: str, keep_size: str, env_file: Path) -> None:
    execute(
        db,
        sql.SQL("DROP FUNCTION {}(integer)").format(NAMES.changes_function).as_string(None),
    )
    execute(
        db,
        sql.SQL("REVOKE EXECUTE ON FUNCTION {}() FROM {}")
        .format(NAMES.slot_function, sql.Identifier(DAEMON_ROLE))
        .as_string(None),
    )

    result = decoding_doctor(db, env_file)

    assert result.exit_code == 1
    line = lines(result)["decoding functions"]
    assert line.startswith(
        f'FAIL  decoding functions: missing: "public"."{NAMES.changes_function_name}"(integer); '
        f'this role may not execute: "public"."{NAMES.slot_function_name}"()'
    )
    assert "run sql/decoding.sql as a superuser" in line
    # The slot is still read, from the view the function reads.
    assert verdicts(result)["slot"] == "PASS"


def test_the_trigger_mode_warns_of_a_slot_left_behind(db: str, env_file: Path) -> None:
    deploy(db)  # back to the trigger, the slot and publication left

    result = doctor(db, env_file)

    line = lines(result)["capture"]
    assert line.startswith(
        "WARN  capture: ORDER_MONITOR_CAPTURE=trigger, but decoding.sql's slot "
        f"{slot_state(db)[0]} (reserved, "  # type: ignore[index]
    )
    assert f"and publication {NAMES.publication_name} are still there" in line
    assert "the slot keeps WAL while nobody reads it, until the server's disk is full" in line
    assert "or set ORDER_MONITOR_CAPTURE=decoding" in line
    assert not set(DECODING_CHECKS) & set(verdicts(result))
    assert result.exit_code == 0, result.stdout  # a warning, not a failure

    # Uninstall's decoding part: nothing left to warn of.
    with psycopg.connect(db, autocommit=True) as conn:
        for statement in decoding_uninstall_statements(LAYOUT):
            conn.execute(statement.query)
    assert lines(doctor(db, env_file))["capture"].startswith(
        "PASS  capture: trigger (install.sql's trigger); no slot of ours"
    )


@pytest.fixture
def replica_level_db(pg_server: Server, templates: tuple[str, str]) -> Iterator[str]:
    """The suite's shared server (wal_level = replica), installed for the trigger."""
    with psycopg.connect(pg_server.admin_dsn, autocommit=True) as conn:
        row = conn.execute("SHOW wal_level").fetchone()
    if row == ("logical",):
        pytest.skip("the shared test server runs with wal_level = logical")
    yield from _fresh(pg_server, templates[1])


def test_decoding_mode_on_a_server_without_logical_decoding_fails(
    replica_level_db: str, env_file: Path
) -> None:
    result = decoding_doctor(replica_level_db, env_file)

    assert result.exit_code == 1
    found = verdicts(result)
    said = lines(result)
    assert said["wal_level"].startswith("FAIL  wal_level: is replica, not logical: ")
    assert "ALTER SYSTEM SET wal_level = logical" in said["wal_level"]
    assert found["decoding functions"] == found["slot"] == found["publication"] == "FAIL"
    assert "missing" in said["publication"]
    assert found["capture triggers"] == "FAIL"  # install.sql's, still there


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (1024, "1.0 kB"),
        (1536 * 1024, "1.5 MB"),
        (8 << 30, "8.0 GB"),
        (3 << 40, "3.0 TB"),
    ],
)
def test_format_bytes(size: int, text: str) -> None:
    assert format_bytes(size) == text


__all__ = ["db", "logical_dsn", "logical_server"]
