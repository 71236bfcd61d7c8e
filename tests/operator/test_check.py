"""``order-monitor check`` end to end: one order asked about now, written or (with --dry-run) not."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from pathlib import Path
from typing import Any

import psycopg

from order_monitor.providers.fake import MSG_DONE, FakeProvider, Script
from tests.daemon_fixtures import App, eventually
from tests.db.test_narrowing import make_hostile_view
from tests.operator.helpers import environment, invoke, invoke_async


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


async def _insert(app: App, reference: str, sent_at: str) -> uuid.UUID:
    cursor = await app.conn.execute(
        """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus", "sentAt")
           VALUES (%s, 'fake', 'sent', %s::timestamptz) RETURNING id""",
        (reference, sent_at),
    )
    row = await cursor.fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


async def test_check_of_an_order_sent_at_infinity_checks_it_and_says_so(
    app: App, fake: FakeProvider, check_env: dict[str, str]
) -> None:
    """Before db.dispatch the re-read raised (cannot subtract infinite timestamps): a traceback."""
    fake.set_script("INF", Script.done("PIN-INF"))
    order = await _insert(app, "INF", "infinity")

    result = await invoke_async(["check", str(order)], check_env)

    assert result.exit_code == 0, result.output
    assert "dispatched unknown: sentAt is infinity" in result.stdout
    assert "note       dispatch time unusable (sentAt is infinity)" in result.stdout
    assert "write      written" in result.stdout
    assert fake.poll_count("INF") == 1


async def test_check_of_an_order_sent_30_days_ahead_says_how_far(
    app: App, fake: FakeProvider, check_env: dict[str, str]
) -> None:
    """A "sentAt" in the future read as a negative age ("dispatched -2592000s ago")."""
    fake.set_script("AHEAD", Script.pending())
    order = await _insert(app, "AHEAD", "now")
    await app.conn.execute(
        """UPDATE product_orders SET "sentAt" = now() + interval '30 days' WHERE id = %s""",
        (order,),
    )

    result = await invoke_async(["check", str(order), "--json"], check_env)

    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["dispatched_s_ago"] is None
    (note,) = out["notes"]
    ahead = re.search(r"sentAt is (\d+) s ahead of the database's clock", note)
    assert ahead is not None, note
    assert 30 * 86400 - 60 < int(ahead[1]) <= 30 * 86400
    assert out["decision"]["kind"] == "pending"
    assert out["written"] is True


async def test_check_of_a_row_that_cannot_be_read_names_the_error_not_a_traceback(
    db: str, app: App, fake: FakeProvider, check_env: dict[str, str]
) -> None:
    make_hostile_view(db)
    order = await _insert(app, "BAD-1", "now")
    check_env["ORDER_MONITOR_TABLE"] = "hostile_orders"

    result = await invoke_async(["check", str(order)], check_env)

    assert result.exit_code == 1
    assert f"order {order} cannot be read" in result.stderr
    assert "DivisionByZero: division by zero" in result.stderr
    assert "Traceback" not in result.output
    assert fake.requests_total == 0
