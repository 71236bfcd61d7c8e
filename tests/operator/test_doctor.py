"""``order-monitor doctor`` end to end: every check, against real databases, roles and providers."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from order_monitor import __version__
from order_monitor.providers.fake import FakeProvider, Script
from tests.conftest import as_daemon
from tests.operator.helpers import (
    ROLE_PASSWORD,
    environment,
    execute,
    invoke,
    invoke_async,
    lines,
    providers_file,
    verdicts,
)


async def test_doctor_passes_everything_on_an_installed_database(
    role_dsn: str, fake: FakeProvider, env_file: Path, tmp_path: Path
) -> None:
    assert fake.base_url is not None
    env = environment(role_dsn, env_file, providers_file(tmp_path, fake.base_url))

    result = await invoke_async(["doctor"], env)

    assert result.exit_code == 0, result.output
    assert set(verdicts(result).values()) == {"PASS"}, result.stdout
    assert set(verdicts(result)) >= {
        "settings",
        "database",
        "table",
        "columns",
        "provider reference column",
        "index",
        "trigger function",
        "trigger order_monitor_insert_v3",
        "trigger order_monitor_update_v3",
        "write function",
        "privileges",
        "orders in flight",
        "listen/notify",
        "notification queue",
        "providers",
        "provider fake",
    }
    # The comparison with what install creates worked for a role with no
    # privilege on the table as a whole.
    assert "matches the in-flight rule" in lines(result)["index"]
    # The provider was really asked, once, about a reference no order has.
    assert fake.requests_total == 1
    assert fake.references == {"order-monitor-doctor"}
    assert ROLE_PASSWORD not in result.output
    assert "password=***" in lines(result)["database"]


def test_doctor_fails_on_a_database_without_the_install(bare_db: str, env_file: Path) -> None:
    result = invoke(["doctor"], environment(bare_db, env_file))

    assert result.exit_code == 1, result.output
    found = verdicts(result)
    for check in (
        "provider reference column",
        "index",
        "trigger function",
        "trigger order_monitor_insert_v3",
        "trigger order_monitor_update_v3",
    ):
        assert found[check] == "FAIL", check
        assert "order-monitor sql install" in lines(result)[check]
    assert "has no column provider_referans" in lines(result)["provider reference column"]
    # What works is still said to work.
    assert found["database"] == found["table"] == found["listen/notify"] == "PASS"
    assert found["providers"] == "WARN"  # none configured: a warning, not a failure


async def test_doctor_fails_for_a_provider_with_a_wrong_token(
    db: str, fake: FakeProvider, env_file: Path, tmp_path: Path
) -> None:
    assert fake.base_url is not None
    env = environment(db, env_file, providers_file(tmp_path, fake.base_url))
    env["FAKE_TOKEN"] = "not-the-token"

    result = await invoke_async(["doctor"], env)

    assert result.exit_code == 1
    line = lines(result)["provider fake"]
    assert line.startswith("FAIL  provider fake: barakat at http://127.0.0.1:")
    assert "HTTP 401" in line
    assert "check credentials / IP whitelist" in line
    assert "not-the-token" not in result.output


async def test_doctor_fails_for_a_provider_nobody_answers_at(
    db: str, env_file: Path, tmp_path: Path
) -> None:
    # A port that was just free: connection refused, at once.
    fake = FakeProvider()
    async with fake.running() as url:
        pass
    env = environment(db, env_file, providers_file(tmp_path, url))

    result = await invoke_async(["doctor"], env)

    assert result.exit_code == 1
    line = lines(result)["provider fake"]
    assert line.startswith("FAIL  provider fake:")
    assert "request failed" in line


def test_doctor_prints_a_config_error_as_a_line_and_exits_78(db: str, env_file: Path) -> None:
    result = invoke(["doctor"], environment(db, env_file, BATCH_SIZE="lots"))

    assert result.exit_code == 78
    assert result.stdout.splitlines() == [
        "FAIL  settings: ORDER_MONITOR_BATCH_SIZE='lots' is invalid: expected a whole number >= 1"
    ]
    assert "Traceback" not in result.output


def test_doctor_sees_that_the_install_is_for_another_in_flight_rule(
    db: str, env_file: Path
) -> None:
    # The operator narrowed the rule but did not re-install: the index and the
    # trigger function were built for the old one.
    env = environment(db, env_file, IN_FLIGHT_EXTERNAL_STATUSES="sent,processing")

    result = invoke(["doctor"], env)

    assert result.exit_code == 1
    found = verdicts(result)
    assert found["index"] == "FAIL"
    assert "another in-flight rule" in lines(result)["index"]
    assert "DROP INDEX CONCURRENTLY" in lines(result)["index"]
    assert found["trigger function"] == "FAIL"  # it tests the rule (version 6)
    assert "in-flight statuses" in lines(result)["trigger function"]
    # Their WHEN is the idle lock's try alone: it does not depend on the rule.
    assert found["trigger order_monitor_insert_v3"] == "PASS"
    assert found["trigger order_monitor_update_v3"] == "PASS"


def test_doctor_reports_an_invalid_index_and_a_disabled_trigger(db: str, env_file: Path) -> None:
    # An interrupted CREATE INDEX CONCURRENTLY leaves an INVALID index behind;
    # a failed unique build is a real way to get one.
    execute(db, "DROP INDEX order_monitor_product_orders_inflight_v1")
    execute(
        db,
        """INSERT INTO product_orders ("providerId") VALUES ('same'), ('same')""",
    )
    with pytest.raises(psycopg.errors.UniqueViolation):
        execute(
            db,
            "CREATE UNIQUE INDEX CONCURRENTLY order_monitor_product_orders_inflight_v1"
            ' ON product_orders ("providerId")',
        )
    execute(db, "ALTER TABLE product_orders DISABLE TRIGGER order_monitor_update_v3")

    result = invoke(["doctor"], environment(db, env_file))

    assert result.exit_code == 1
    index = lines(result)["index"]
    assert index.startswith("FAIL  index: order_monitor_product_orders_inflight_v1 is INVALID")
    assert "DROP INDEX CONCURRENTLY" in index
    update = lines(result)["trigger order_monitor_update_v3"]
    assert update.startswith("FAIL  trigger order_monitor_update_v3: is disabled")
    assert "ENABLE TRIGGER" in update
    assert verdicts(result)["trigger order_monitor_insert_v3"] == "PASS"


def test_doctor_names_the_missing_privileges(role_dsn: str, db: str, env_file: Path) -> None:
    role = psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]
    execute(db, f'REVOKE SELECT ("sentAt") ON product_orders FROM "{role}"')

    result = invoke(["doctor"], environment(role_dsn, env_file))

    assert result.exit_code == 1
    line = lines(result)["privileges"]
    assert line.startswith(f"FAIL  privileges: role {role} lacks SELECT on sentAt")
    assert "sql print role" in line


def test_doctor_proves_the_write_itself_is_permitted(
    role_dsn: str, db: str, env_file: Path
) -> None:
    role = psycopg.conninfo.conninfo_to_dict(role_dsn)["user"]
    function = '"public"."order_monitor_product_orders_write_v2"'
    execute(
        db,
        f"REVOKE EXECUTE ON FUNCTION {function}(uuid[], text[], text[], text[], text[], text[],"
        f' text[]) FROM "{role}"',
    )

    result = invoke(["doctor"], environment(role_dsn, env_file))

    assert result.exit_code == 1
    assert lines(result)["privileges"].startswith(
        f"FAIL  privileges: role {role} lacks EXECUTE on the write function"
    )
    assert "may not execute" in lines(result)["write function"]


def test_doctor_sees_a_write_function_installed_for_other_status_words(
    db: str, env_file: Path
) -> None:
    result = invoke(["doctor"], environment(as_daemon(db), env_file, DONE_STATUS="approved"))

    assert result.exit_code == 1
    line = lines(result)["write function"]
    assert line.startswith("FAIL  write function: ")
    assert "installed for other settings" in line
    assert "order-monitor sql install" in line


def test_doctor_warns_about_in_flight_orders_no_provider_serves(db: str, env_file: Path) -> None:
    execute(
        db,
        """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus")
           VALUES ('A', 'ghost', 'sent'), ('B', 'ghost', 'sent')""",
    )
    result = invoke(["doctor"], environment(db, env_file))

    line = lines(result)["orders in flight"]
    assert line.startswith("WARN  orders in flight: 2 of 2 have a providerId no provider serves")
    assert "'ghost': 2" in line


def test_doctor_cannot_connect_and_shows_no_password(db: str, env_file: Path) -> None:
    dsn = make_conninfo(db, dbname=f"missing_{uuid.uuid4().hex[:6]}", password=ROLE_PASSWORD)

    result = invoke(["doctor"], environment(dsn, env_file))

    assert result.exit_code == 1
    line = lines(result)["database"]
    assert line.startswith("FAIL  database: cannot connect to ")
    assert "does not exist" in line
    assert "password=***" in line
    assert ROLE_PASSWORD not in result.output


async def test_doctor_warns_when_a_provider_answers_the_probe_with_an_error(
    db: str, fake: FakeProvider, env_file: Path, tmp_path: Path
) -> None:
    # znet answers an unknown reference with an error line (code 4, "not found"):
    # the provider was reached and read us, which is what the probe wants to know.
    assert fake.base_url is not None
    path = tmp_path / "znet.toml"
    path.write_text(
        f"""
[providers.znet]
kind = "znet"
base_url = "{fake.base_url}"
secrets = {{ kod = "{fake.kod}", sifre = "{fake.sifre}" }}
"""
    )
    fake.set_script("order-monitor-doctor", Script.unknown())

    result = await invoke_async(["doctor"], environment(db, env_file, path))

    assert result.exit_code == 0, result.output
    line = lines(result)["provider znet"]
    assert line.startswith("WARN  provider znet: znet at http://127.0.0.1:")
    assert "İşlem bulunamadı" in line


def test_doctor_names_a_lock_holder_that_is_not_an_order_monitor_session(
    db: str, env_file: Path
) -> None:
    from order_monitor import schema
    from order_monitor.config import Layout
    from order_monitor.ops.leader import lock_key

    squatter = make_conninfo(db, application_name="nightly-report")
    with psycopg.connect(squatter, autocommit=True) as conn:
        pid = conn.info.backend_pid
        conn.execute("SELECT pg_advisory_lock(%s)", (lock_key("public", "product_orders"),))
        conn.execute("SELECT pg_advisory_lock(%s)", (schema.idle_lock_key(Layout()),))
        result = invoke(["doctor"], environment(as_daemon(db), env_file))
    found = [line for line in result.stdout.splitlines() if "lock holders:" in line]
    assert len(found) == 2, result.stdout
    assert all(line.startswith("FAIL") for line in found)
    assert "the leader lock is held by" in found[0]
    assert "the idle lock is held by" in found[1]
    for line in found:
        assert f"pid {pid} (nightly-report, user " in line


def test_doctor_leaves_our_own_lock_holders_alone(db: str, env_file: Path) -> None:
    from order_monitor.ops.leader import lock_key

    ours = make_conninfo(db, application_name=f"order-monitor {__version__} (leader lock)")
    with psycopg.connect(ours, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (lock_key("public", "product_orders"),))
        result = invoke(["doctor"], environment(as_daemon(db), env_file))
    assert verdicts(result)["lock holders"] == "PASS"


def test_doctor_names_instances_older_than_itself(db: str, env_file: Path) -> None:
    old = make_conninfo(as_daemon(db), application_name="order-monitor 0.1.0 (listener)")
    current = make_conninfo(
        as_daemon(db), application_name=f"order-monitor {__version__} (listener)"
    )
    with psycopg.connect(old) as before, psycopg.connect(current):
        pid = before.info.backend_pid
        result = invoke(["doctor"], environment(as_daemon(db), env_file))
    line = lines(result)["instances"]
    assert line.startswith("WARN"), line
    assert f"pid {pid} (order-monitor 0.1.0 (listener)" in line
    assert "1 session(s)" in line
    assert f"{__version__} (listener)" not in line


def test_doctor_names_orders_whose_dispatch_time_is_unusable(db: str, env_file: Path) -> None:
    """Before db.dispatch one "sentAt" = 'infinity' failed the doctor's sweep probe:
    'FAIL  database: a check query failed: cannot subtract infinite timestamps', no row named."""
    with psycopg.connect(db, autocommit=True) as conn:
        rows = conn.execute(
            # A has the lowest id: the first row of the sweep probe's page.
            """INSERT INTO product_orders (id, provider_referans, "providerId", "externalStatus",
                   "sentAt")
               VALUES ('00000000-0000-4000-8000-000000000001', 'A', 'fake', 'sent', '-infinity'),
                      (gen_random_uuid(), 'B', 'fake', 'sent', 'infinity'),
                      (gen_random_uuid(), 'C', 'fake', 'sent', now() + interval '3 hours'),
                      (gen_random_uuid(), 'D', 'fake', 'sent', now())
               RETURNING provider_referans, id"""
        ).fetchall()
    ids = dict(rows)

    result = invoke(["doctor"], environment(as_daemon(db), env_file))

    found = lines(result)
    assert "database" in found
    assert found["database"].startswith("PASS"), found["database"]
    assert found["privileges"].startswith("PASS"), found["privileges"]
    line = found["dispatch times"]
    assert line.startswith("WARN  dispatch times: 3 orders in flight"), line
    assert f"{ids['A']} (sentAt is -infinity)" in line
    assert f"{ids['B']} (sentAt is infinity)" in line
    assert f"{ids['C']} (sentAt is " in line
    assert str(ids["D"]) not in line


def test_doctor_warns_about_an_inbox_an_older_version_left(db: str, env_file: Path) -> None:
    """Version 4's inbox, with an id waiting: install.sql drops it, doctor says so."""
    execute(
        db,
        "CREATE UNLOGGED TABLE order_monitor_product_orders_inbox_v2"
        " (order_id uuid NOT NULL, queued_at timestamptz NOT NULL DEFAULT now())",
    )
    execute(
        db,
        "INSERT INTO order_monitor_product_orders_inbox_v2 (order_id, queued_at)"
        " VALUES (gen_random_uuid(), now() - interval '2 days')",
    )
    line = lines(invoke(["doctor"], environment(db, env_file)))["inbox"]
    assert line.startswith("WARN")
    assert "left by schema version 2 to 4 (1 order ids waiting, the oldest for 48h)" in line
    assert "order-monitor sql install" in line
