"""The operator commands end to end: doctor, status and check through the real CLI.

A real Postgres (the `db` / `bare_db` fixtures) and the fake provider over
loopback. The CLI runs its own event loop (asyncio.run), so tests that need
the fake provider, which serves from the test's loop, run the CLI in a worker
thread.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql
from psycopg.conninfo import make_conninfo

from order_monitor import install
from order_monitor.cli import cli
from order_monitor.config import Layout
from order_monitor.ops.leader import lock_key
from order_monitor.providers.fake import MSG_DONE, FakeProvider, Script
from tests.conftest import Server, as_daemon
from tests.integration.conftest import App, eventually

ROLE_PASSWORD = "s3cret-Doctor-pw"


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    """An empty .env, so a stray ./.env on the machine cannot change the settings."""
    path = tmp_path / "empty.env"
    path.write_text("")
    return path


def providers_file(tmp_path: Path, base_url: str, provider_ids: Sequence[str] = ("fake",)) -> Path:
    ids = ", ".join(json.dumps(i) for i in provider_ids)
    path = tmp_path / "providers.toml"
    path.write_text(
        f"""
[providers.fake]
kind = "barakat"
base_url = "{base_url}"
provider_ids = [{ids}]
secrets = {{ token = {{ env = "FAKE_TOKEN" }} }}
limits = {{ read_timeout = 3, breaker_failures = 50 }}
"""
    )
    return path


def environment(
    dsn: str, env_file: Path, providers: Path | None = None, **extra: str
) -> dict[str, str]:
    env = {
        "ORDER_MONITOR_DSN": dsn,
        "ORDER_MONITOR_ENV_FILE": str(env_file),
        "FAKE_TOKEN": "test-token",
        **{f"ORDER_MONITOR_{k}": v for k, v in extra.items()},
    }
    if providers is not None:
        env["ORDER_MONITOR_PROVIDERS_FILE"] = str(providers)
    return env


def invoke(args: Sequence[str], env: Mapping[str, str]) -> Result:
    return CliRunner().invoke(cli, list(args), env=dict(env), catch_exceptions=False)


async def invoke_async(args: Sequence[str], env: Mapping[str, str]) -> Result:
    """The CLI in a worker thread, while the fake provider serves from this loop."""
    return await asyncio.to_thread(invoke, args, env)


def lines(result: Result) -> dict[str, str]:
    """Doctor lines by check name: {'index': 'PASS  index: ...'}."""
    found: dict[str, str] = {}
    for line in result.stdout.splitlines():
        verdict, _, rest = line.partition("  ")
        assert verdict in {"PASS", "WARN", "FAIL"}, line
        check, _, _ = rest.partition(": ")
        found[check] = line
    return found


def verdicts(result: Result) -> dict[str, str]:
    return {check: line.split()[0] for check, line in lines(result).items()}


@pytest.fixture
def role_dsn(db: str, pg_server: Server) -> Iterator[str]:
    """DSN (with a password) of a fresh least-privilege daemon role from `sql print role`."""
    role = f"om_doctor_{uuid.uuid4().hex[:8]}"
    list(install.apply(db, "role", Layout(role=role)))
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(ROLE_PASSWORD)
            )
        )
    try:
        yield make_conninfo(db, user=role, password=ROLE_PASSWORD)
    finally:
        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
        pg_server.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def execute(dsn: str, statement: str, params: Sequence[Any] = ()) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement, params)


# --- doctor ---------------------------------------------------------------------------


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
        "trigger order_monitor_insert_v2",
        "trigger order_monitor_update_v2",
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
        "trigger order_monitor_insert_v2",
        "trigger order_monitor_update_v2",
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
    # triggers were built for the old one.
    env = environment(db, env_file, IN_FLIGHT_EXTERNAL_STATUSES="sent,processing")

    result = invoke(["doctor"], env)

    assert result.exit_code == 1
    found = verdicts(result)
    assert found["index"] == "FAIL"
    assert "another in-flight rule" in lines(result)["index"]
    assert "DROP INDEX CONCURRENTLY" in lines(result)["index"]
    assert found["trigger order_monitor_insert_v2"] == "FAIL"
    assert found["trigger order_monitor_update_v2"] == "FAIL"
    assert found["trigger function"] == "PASS"  # its body does not depend on the rule


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
    execute(db, "ALTER TABLE product_orders DISABLE TRIGGER order_monitor_update_v2")

    result = invoke(["doctor"], environment(db, env_file))

    assert result.exit_code == 1
    index = lines(result)["index"]
    assert index.startswith("FAIL  index: order_monitor_product_orders_inflight_v1 is INVALID")
    assert "DROP INDEX CONCURRENTLY" in index
    update = lines(result)["trigger order_monitor_update_v2"]
    assert update.startswith("FAIL  trigger order_monitor_update_v2: is disabled")
    assert "ENABLE TRIGGER" in update
    assert verdicts(result)["trigger order_monitor_insert_v2"] == "PASS"


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
    function = '"public"."order_monitor_product_orders_write_v1"'
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


# --- status ------------------------------------------------------------------------------


def seed_orders(dsn: str) -> dict[str, uuid.UUID]:
    """Orders in every state status reports on, by a name saying what each is."""
    rows = {
        # name: (providerId, externalStatus, referans, sent ago, lastSyncAt ago, completedAt ago)
        "fake-old": ("fake", "sent", "R1", "2 hours", None, None),
        "fake-new": ("fake", "processing", "R2", "5 minutes", "1 minute", None),
        "fake-upper": ("fake", "PENDING", "R3", "10 minutes", None, None),
        "ghost": ("ghost", "sent", "G1", "1 hour", None, None),
        "not-sent": ("fake", "not_sent", None, None, None, None),
        "gave-up": ("fake", "manual_required", "M1", "25 hours", "3 hours", None),
        "gave-up-long-ago": ("fake", "manual_required", "M2", "50 hours", "26 hours", None),
        "done-1": ("fake", "done", "D1", "30 minutes", "10 minutes", "10 minutes"),
        "done-2": ("fake", "done", "D2", "40 minutes", "20 minutes", "20 minutes"),
        "done-long-ago": ("fake", "done", "D3", "3 hours", "2 hours", "2 hours"),
        "failed": ("fake", "failed", "F1", "20 minutes", "5 minutes", "5 minutes"),
    }
    ids = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, (pid, ext, ref, sent, synced, completed) in rows.items():
            row = conn.execute(
                """INSERT INTO product_orders
                       ("providerId", "externalStatus", provider_referans, "sentAt",
                        "lastSyncAt", "completedAt", "lastMessage")
                   VALUES (%s, %s, %s, now() - %s::interval, now() - %s::interval,
                           now() - %s::interval, %s)
                   RETURNING id""",
                (pid, ext, ref, sent, synced, completed, f"note {name}"),
            ).fetchone()
            assert row is not None
            ids[name] = row[0]
    return ids


def test_status_counts_match_the_rows(db: str, env_file: Path, tmp_path: Path) -> None:
    ids = seed_orders(db)
    env = environment(as_daemon(db), env_file, providers_file(tmp_path, "http://127.0.0.1:9"))

    result = invoke(["status", "--json"], env)

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    in_flight = report["in_flight"]
    assert in_flight["total"] == 4
    by_provider = {line["provider_id"]: line for line in in_flight["by_provider"]}
    assert {k: v["count"] for k, v in by_provider.items()} == {"fake": 3, "ghost": 1}
    assert by_provider["fake"]["served_by"] == "fake"
    assert by_provider["ghost"]["served_by"] is None
    assert 7200 <= by_provider["fake"]["oldest_age_s"] < 7200 + 60
    assert 3600 <= by_provider["ghost"]["oldest_age_s"] < 3600 + 60
    assert in_flight["oldest"]["id"] == str(ids["fake-old"])
    assert in_flight["oldest"]["reference"] == "R1"
    gave_up = report["gave_up_24h"]
    assert gave_up["count"] == 1
    assert [o["id"] for o in gave_up["recent"]] == [str(ids["gave-up"])]
    assert gave_up["recent"][0]["last_message"] == "note gave-up"
    assert 3 * 3600 <= gave_up["recent"][0]["age_s"] < 3 * 3600 + 60
    assert report["finished_1h"] == {"done": 2, "failed": 1}
    assert report["leader"] is None
    assert report["table"] == "public.product_orders"

    text = invoke(["status"], env)
    assert text.exit_code == 0, text.output
    assert "In flight: 4 orders" in text.stdout
    assert "NOT CONFIGURED" in next(ln for ln in text.stdout.splitlines() if "ghost" in ln)
    assert f"oldest: {ids['fake-old']}" in text.stdout
    assert "Gave up in the last 24 h: 1 (externalStatus = 'manual_required'" in text.stdout
    assert f"{ids['gave-up']}  providerId fake  reference M1  3h ago — note gave-up" in text.stdout
    assert "Finished in the last hour: 2 done ('done'), 1 failed ('failed')" in text.stdout
    assert "no session holds the leader lock" in text.stdout


def test_status_names_the_session_holding_the_leader_lock(db: str, env_file: Path) -> None:
    with psycopg.connect(
        make_conninfo(db, application_name="order-monitor test (leader lock)"), autocommit=True
    ) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (lock_key("public", "product_orders"),))
        pid = holder.info.backend_pid

        result = invoke(["status", "--json"], environment(as_daemon(db), env_file))

    assert result.exit_code == 0, result.output
    leader = json.loads(result.stdout)["leader"]
    assert leader["pid"] == pid
    assert leader["application_name"] == "order-monitor test (leader lock)"
    assert json.loads(result.stdout)["in_flight"] == {"total": 0, "by_provider": [], "oldest": None}


# --- check -------------------------------------------------------------------------------------


async def order_row(app: App, order: uuid.UUID) -> dict[str, Any]:
    cursor = await app.conn.execute(
        """SELECT "externalStatus", "pinCode", "lastMessage", "lastSyncAt", "completedAt",
                  status FROM product_orders WHERE id = %s""",
        (order,),
    )
    names = [d.name for d in cursor.description or []]
    row = await cursor.fetchone()
    assert row is not None
    return dict(zip(names, row, strict=True))


@pytest.fixture
def check_env(db: str, fake: FakeProvider, env_file: Path, tmp_path: Path) -> dict[str, str]:
    assert fake.base_url is not None
    # As the daemon's own least-privilege role: an operator runs `check` with its settings.
    return environment(as_daemon(db), env_file, providers_file(tmp_path, fake.base_url))


async def test_check_dry_run_prints_the_answer_and_writes_nothing(
    app: App, fake: FakeProvider, check_env: dict[str, str]
) -> None:
    fake.set_script("R1", Script.done("PIN-0042"))
    (order,) = await app.dispatch(["R1"], sent_ago=90)
    before = await order_row(app, order)

    result = await invoke_async(["check", str(order), "--dry-run"], check_env)

    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"order      {order}" in out
    assert "provider   fake (kind barakat, providerId 'fake')" in out
    assert "reference  R1" in out
    assert "raw status accept" in out
    assert "outcome    done" in out
    assert "PIN        PIN-0042  [the customer's code" in out
    assert f"message    {MSG_DONE}" in out
    assert "decision   done: the order leaves flight" in out
    assert "externalStatus = 'done'" in out
    assert "pinCode = 'PIN-0042'" in out
    assert "write      dry run: nothing written" in out
    assert fake.poll_count("R1") == 1
    assert await order_row(app, order) == before


async def test_check_writes_done_with_the_pin(
    app: App, fake: FakeProvider, check_env: dict[str, str]
) -> None:
    fake.set_script("R2", Script.done("PIN-7"))
    (order,) = await app.dispatch(["R2"], sent_ago=90)

    result = await invoke_async(["check", str(order)], check_env)

    assert result.exit_code == 0, result.output
    assert "write      written" in result.stdout
    row = await order_row(app, order)
    assert row["externalStatus"] == "done"
    assert row["pinCode"] == "PIN-7"
    assert row["lastMessage"] == MSG_DONE
    assert row["completedAt"] is not None
    assert row["status"] == "pending"  # the business status is left alone by default
    assert fake.poll_count("R2") == 1


async def test_check_of_a_pending_order_records_the_check_and_keeps_it_in_flight(
    app: App, fake: FakeProvider, check_env: dict[str, str]
) -> None:
    fake.set_script("R3", Script.pending())
    (order,) = await app.dispatch(["R3"], sent_ago=90)

    result = await invoke_async(["check", str(order)], check_env)

    assert result.exit_code == 0, result.output
    assert "raw status wait" in result.stdout
    assert "PIN        -\n" in result.stdout
    assert "decision   pending: the order stays in flight" in result.stdout
    row = await order_row(app, order)
    assert row["externalStatus"] == "sent"
    assert row["lastSyncAt"] is not None
    assert await app.in_flight() == 1


async def test_check_of_a_finished_order_exits_1_without_asking_the_provider(
    app: App, fake: FakeProvider, check_env: dict[str, str]
) -> None:
    (order,) = await app.dispatch(["R4"])
    await app.conn.execute(
        """UPDATE product_orders SET "externalStatus" = 'done' WHERE id = %s""", (order,)
    )

    result = await invoke_async(["check", str(order)], check_env)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert f"order {order} is not in flight, so no provider was asked" in result.stderr
    assert "externalStatus 'done' is not one of the in-flight statuses" in result.stderr
    assert "provider_referans='R4'" in result.stderr
    assert fake.requests_total == 0


async def test_check_reports_a_result_the_guard_dropped(
    app: App, fake: FakeProvider, check_env: dict[str, str]
) -> None:
    # The provider answers slowly; meanwhile an operator rejects the order.
    fake.behaviour.latency = 1.0
    fake.set_script("R5", Script.done("PIN-LATE"))
    (order,) = await app.dispatch(["R5"], sent_ago=90)

    running = asyncio.create_task(invoke_async(["check", str(order)], check_env))
    await eventually(lambda: _asked(fake, "R5"), what="the provider to be asked")
    await app.conn.execute(
        """UPDATE product_orders SET status = 'rejected', "externalStatus" = 'failed'
           WHERE id = %s""",
        (order,),
    )
    result = await running

    assert result.exit_code == 0, result.output
    assert "write      NOT written: the row left flight" in result.stdout
    row = await order_row(app, order)
    assert (row["status"], row["externalStatus"], row["pinCode"]) == ("rejected", "failed", None)


async def _asked(fake: FakeProvider, reference: str) -> bool:
    return fake.poll_count(reference) == 1


async def test_check_says_when_the_provider_cannot_be_asked(
    app: App, fake: FakeProvider, check_env: dict[str, str]
) -> None:
    check_env["FAKE_TOKEN"] = "wrong-token"
    (order,) = await app.dispatch(["R6"], sent_ago=90)

    result = await invoke_async(["check", str(order), "--dry-run"], check_env)

    assert result.exit_code == 1
    assert "outcome    error" in result.stdout
    assert "HTTP 401" in result.stdout
    assert "wrong-token" not in result.output


def test_check_refuses_what_is_not_an_order_id(db: str, env_file: Path) -> None:
    result = invoke(["check", "12345"], environment(db, env_file))
    assert result.exit_code == 2
    assert "'12345' is not an order id" in result.stderr


def test_check_of_an_unknown_order(db: str, env_file: Path) -> None:
    order = uuid.uuid4()
    result = invoke(["check", str(order)], environment(db, env_file))
    assert result.exit_code == 1
    assert f"no order with id {order} in public.product_orders" in result.stderr


def test_check_of_an_order_whose_provider_is_not_configured(db: str, env_file: Path) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute(
            """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus")
               VALUES ('X1', 'ghost', 'sent') RETURNING id"""
        ).fetchone()
    assert row is not None

    result = invoke(["check", str(row[0])], environment(db, env_file))

    assert result.exit_code == 1
    assert "providerId='ghost', which no provider" in result.stderr
    assert "provider_ids" in result.stderr


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
