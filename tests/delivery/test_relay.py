"""The relay's decisions, round by round, against the real outbox and the fake application.

Each test drives :meth:`Relay.deliver_due` itself (no loop, no sleeping) with
an injected clock for what the relay computes (max_age, the requests' time)
and moves the outbox's due times forward itself where time must pass for the
database. The application is :class:`ApplicationApi` on the same database,
over real HTTP, steered with its fault knobs: nothing of the relay's side is
mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import psycopg
import pytest
from psycopg import sql
from structlog.testing import capture_logs

from order_monitor.config import ActionConfig, Layout, ProviderLimits
from order_monitor.db import ManagedConnection
from order_monitor.delivery.backoff import retry_delay
from order_monitor.delivery.relay import Relay, RelayTiming
from order_monitor.delivery.sender import build_senders
from order_monitor.delivery.store import OutboxStore
from order_monitor.demo.application_api import (
    APPROVE_PATH,
    REJECT_PATH,
    ApplicationApi,
    prepare_application_tables,
)
from order_monitor.demo.application_api import reference_actions as api_reference_actions
from order_monitor.metrics import Metrics
from tests.conftest import as_daemon
from tests.daemon_fixtures import eventually
from tests.delivery.test_store import (  # the fixtures too: the same databases
    OUTBOX,
    TENANT_A,
    TENANT_B,
    Conn,
    by_delivery,
    make_due,
    outbox_rows,
    recorded,
)

#: The application's bearer token: needs escaping in a header and a log line.
TOKEN = "s3cr%t'\"\\=?#+;tok en"


def reference_actions(
    base_url: str, *, token: str = TOKEN, **changes: Any
) -> tuple[ActionConfig, ActionConfig]:
    """The reference configuration, with timeouts that keep a failing test short."""
    limits = changes.pop(
        "limits",
        ProviderLimits(concurrency=4, connect_timeout=1.0, read_timeout=2.0, breaker_failures=50),
    )
    return api_reference_actions(base_url, token, limits=limits, **changes)


@pytest.fixture
async def api(outbox_db: str) -> AsyncIterator[ApplicationApi]:
    with psycopg.connect(outbox_db, autocommit=True) as conn:
        prepare_application_tables(conn)
    application = ApplicationApi(outbox_db, token=TOKEN)
    async with application.running():
        yield application


@dataclass
class Clock:
    """The relay's wall clock, moved by the test."""

    at: datetime

    def now(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


@dataclass
class Harness:
    relay: Relay
    clock: Clock
    metrics: Metrics

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
async def make_relay(
    outbox_db: str,
) -> AsyncIterator[Any]:
    conns: list[ManagedConnection] = []
    async with aiohttp.ClientSession() as session:

        def build(actions: Sequence[ActionConfig], **timing: Any) -> Harness:
            conn = ManagedConnection(as_daemon(outbox_db), "delivery")
            conns.append(conn)
            clock = Clock(datetime.now(UTC))
            metrics = Metrics()
            relay = Relay(
                conn,
                OutboxStore(Layout()),
                actions,
                build_senders(tuple(actions), session),
                metrics=metrics,
                timing=RelayTiming(**{"auth_retry": 60.0, **timing}),
                now=clock.now,
            )
            return Harness(relay, clock, metrics)

        yield build
        for conn in conns:
            await conn.close()


async def statuses(admin: Conn, orders: Iterable[uuid.UUID]) -> dict[uuid.UUID, str]:
    cursor = await admin.execute(
        "SELECT id, status FROM product_orders WHERE id = ANY(%s)", (list(orders),)
    )
    return {row[0]: row[1] for row in await cursor.fetchall()}


async def db_now(admin: Conn) -> datetime:
    row = await (await admin.execute("SELECT now()")).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def ids_sent(api: ApplicationApi, since: int = 0) -> list[str]:
    return [i for r in api.requests[since:] for i in r.json["ids"]]


# --- the happy round ------------------------------------------------------------------


async def test_one_round_finishes_every_order_per_tenant_and_empties_the_outbox(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    done_a = await recorded(admin, daemon, 3, "done", tenant=TENANT_A)
    done_b = await recorded(admin, daemon, 2, "done", tenant=TENANT_B)
    failed_a = await recorded(admin, daemon, 2, "failed", tenant=TENANT_A)
    h = make_relay(reference_actions(api.base_url))

    assert await h.relay.deliver_due() == (7, 7)

    assert set((await statuses(admin, done_a + done_b)).values()) == {"approved"}
    assert set((await statuses(admin, failed_a)).values()) == {"rejected"}
    assert await outbox_rows(admin) == []
    assert len(api.requests) == 3  # approve A, approve B, reject A
    for request in api.requests:
        headers = request.headers
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        tenant = uuid.UUID(headers["X-Tenant-Id"])
        sent = [uuid.UUID(i) for i in request.json["ids"]]
        expected = {
            (APPROVE_PATH, TENANT_A): done_a,
            (APPROVE_PATH, TENANT_B): done_b,
            (REJECT_PATH, TENANT_A): failed_a,
        }[request.path, tenant]
        assert sorted(sent) == sorted(expected)
        assert request.json["note"] == "provider says so"
        assert uuid.UUID(headers["Idempotency-Key"])  # the stable request id
    assert h.sample("order_monitor_deliveries_total", action="approve", result="delivered") == 5
    assert h.sample("order_monitor_deliveries_total", action="reject", result="delivered") == 2
    assert h.sample("order_monitor_delivery_latency_seconds_count") == 7

    assert await h.relay.deliver_due() == (0, 0)  # nothing twice
    assert len(api.requests) == 3


async def test_a_request_the_application_holds_holds_back_only_its_own_entries(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    orders_a = await recorded(admin, daemon, 1, "done", tenant=TENANT_A)
    orders_b = await recorded(admin, daemon, 1, "done", tenant=TENANT_B)
    # A timeout far longer than the test waits: the held request stays held.
    limits = ProviderLimits(concurrency=4, connect_timeout=1.0, read_timeout=600.0)
    h = make_relay(reference_actions(api.base_url, limits=limits))
    api.hang_next(1)  # whichever request arrives first

    round_ = asyncio.create_task(h.relay.deliver_due())

    async def one_finished() -> bool:
        return len(await outbox_rows(admin)) == 1

    # The other request's order is approved and its entry gone while the
    # round still waits for the held one.
    await eventually(one_finished, within=10, what="the answered request to be settled")
    finished = await statuses(admin, orders_a + orders_b)
    assert sorted(finished.values()) == ["approved", "pending"]
    assert not round_.done()
    # The leadership ends meanwhile: the held entry is left as it was, to be
    # sent again by whoever leads next (at least once).
    round_.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await round_
    (held,) = await outbox_rows(admin)
    assert held["order_id"] in orders_a + orders_b
    assert (held["tries"], held["last_verdict"]) == (0, None)


# --- retries ----------------------------------------------------------------------------


async def test_the_backoff_doubles_with_each_failure_then_the_entry_goes(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    (order,) = await recorded(admin, daemon, 1)
    h = make_relay(reference_actions(api.base_url))
    api.fail_next(502, count=3)

    waits = []
    for attempt in range(1, 4):
        await make_due(admin)
        await h.relay.deliver_due()
        ((row),) = await outbox_rows(admin)
        assert row["tries"] == attempt
        assert row["rejections"] == 0
        assert row["last_verdict"] == "retry"
        assert row["last_error"].startswith("HTTP 502")
        waits.append((row["due_at"] - await db_now(admin)).total_seconds())
    # 5, 10, 20 s (give or take the statement's own time).
    for wait, tries in zip(waits, (1, 2, 3), strict=True):
        assert retry_delay(tries) - 2 < wait <= retry_delay(tries)

    await make_due(admin)
    await h.relay.deliver_due()
    assert await outbox_rows(admin) == []
    assert await statuses(admin, [order]) == {order: "approved"}
    assert (
        h.sample("order_monitor_delivery_errors_total", action="approve", kind="server_error") == 3
    )


async def test_a_transient_failure_at_max_age_is_a_dead_letter_and_is_not_sent_again(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    (order,) = await recorded(admin, daemon, 1)
    h = make_relay(reference_actions(api.base_url, max_age=600.0))
    ((row),) = await outbox_rows(admin)
    recorded_at = row["recorded_at"]
    api.fail_next(500, count=2)

    h.clock.at = recorded_at + timedelta(seconds=599)
    await h.relay.deliver_due()
    ((row),) = await outbox_rows(admin)
    assert row["dead_at"] is None

    h.clock.at = recorded_at + timedelta(seconds=600)
    await make_due(admin)
    await h.relay.deliver_due()
    ((row),) = await outbox_rows(admin)
    assert row["dead_at"] is not None
    assert (row["tries"], row["last_verdict"]) == (2, "retry")
    assert h.sample("order_monitor_deliveries_total", action="approve", result="dead") == 1

    assert await h.relay.deliver_due() == (0, 0)  # a dead letter waits for an operator
    assert len(api.requests) == 2
    assert await statuses(admin, [order]) == {order: "pending"}


async def test_a_retry_after_is_obeyed_and_a_deferred_round_is_not_a_try(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    await recorded(admin, daemon, 2)
    h = make_relay(reference_actions(api.base_url))
    api.fail_next(503, retry_after="30")

    await h.relay.deliver_due()
    rows = await outbox_rows(admin)
    # Asked to wait: no try used up (the backoff does not grow), due when told.
    assert {(r["tries"], r["last_verdict"]) for r in rows} == {(0, "retry")}
    now = await db_now(admin)
    assert all(28 < (r["due_at"] - now).total_seconds() <= 30 for r in rows)

    await make_due(admin)  # the outbox says due, but the application said wait
    await h.relay.deliver_due()

    assert len(api.requests) == 1  # nothing went out
    again = await outbox_rows(admin)
    assert {(r["tries"], r["rejections"], r["last_verdict"]) for r in again} == {(0, 0, "retry")}
    now = await db_now(admin)
    assert all(20 < (r["due_at"] - now).total_seconds() <= 30 for r in again)


async def test_an_open_circuit_defers_without_using_up_tries(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    await recorded(admin, daemon, 1)
    limits = ProviderLimits(
        concurrency=4, connect_timeout=1.0, read_timeout=2.0,
        breaker_failures=2, breaker_cooldown=30.0,
    )  # fmt: skip
    h = make_relay(reference_actions(api.base_url, limits=limits))
    api.fail_next(500, count=5)

    for _ in range(4):
        await make_due(admin)
        await h.relay.deliver_due()

    assert len(api.requests) == 2  # the breaker opened after two failures
    ((row),) = await outbox_rows(admin)
    assert (row["tries"], row["rejections"], row["dead_at"]) == (2, 0, None)
    assert "circuit open" not in row["last_error"]  # the last real failure is kept


# --- refusals ---------------------------------------------------------------------------


async def test_refused_credentials_wait_with_one_probe_and_are_never_used_up(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    orders_a = await recorded(admin, daemon, 2, tenant=TENANT_A)
    orders_b = await recorded(admin, daemon, 2, tenant=TENANT_B)
    h = make_relay(reference_actions(api.base_url, attempts=1, max_age=600.0))
    api.token = "rotated-by-the-application"

    with capture_logs() as logs:
        await h.relay.deliver_due()  # both tenants' requests: 401
        assert h.relay.auth_failing == {"approve"}
        assert h.sample("order_monitor_delivery_auth_failing", action="approve") == 1
        # Long past max_age and the attempts: still waiting, one probe per round.
        h.clock.advance(3600)
        for _ in range(2):
            before = len(api.requests)
            await make_due(admin)
            await h.relay.deliver_due()
            assert len(api.requests) == before + 1
    assert [e["event"] for e in logs].count("delivery.auth_failed") == 1
    assert not [e for e in logs if e["event"] == "delivery.dead_letter"]
    for row in await outbox_rows(admin):
        assert (row["dead_at"], row["rejections"], row["last_verdict"]) == (None, 0, "auth")
        # Not tries either: once the secret is fixed, a transient failure
        # starts the backoff from its first step, not from the longest.
        assert row["tries"] == 0
        assert TOKEN not in repr(row)

    api.token = TOKEN  # the operator fixed the secret
    await make_due(admin)
    await h.relay.deliver_due()  # the probe goes through
    assert h.relay.auth_failing == frozenset()
    assert h.sample("order_monitor_delivery_auth_failing", action="approve") == 0
    await make_due(admin)
    await h.relay.deliver_due()  # and the rest
    assert await outbox_rows(admin) == []
    assert set((await statuses(admin, orders_a + orders_b)).values()) == {"approved"}


async def test_a_per_id_error_counts_toward_attempts_and_the_others_go_once(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    orders = await recorded(admin, daemon, 4)
    refused = orders[1]
    api.reject_id(refused, "LEGACY_USER_MISSING")
    h = make_relay(reference_actions(api.base_url, attempts=3))

    for attempt in range(1, 4):
        await make_due(admin)
        await h.relay.deliver_due()
        ((row),) = await outbox_rows(admin)
        assert row["order_id"] == refused
        assert row["rejections"] == attempt
        assert "LEGACY_USER_MISSING" in row["last_error"]
    assert row["dead_at"] is not None  # at the third refusal

    sent = ids_sent(api)
    assert sorted(sent) == sorted([*map(str, orders), str(refused), str(refused)])
    finished = await statuses(admin, orders)
    assert finished.pop(refused) == "pending"
    assert set(finished.values()) == {"approved"}
    assert h.sample("order_monitor_deliveries_total", action="approve", result="dead") == 1
    assert h.sample("order_monitor_deliveries_total", action="approve", result="rejected") == 2


async def test_a_2xx_the_row_does_not_confirm_is_a_refusal(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    (gone, kept) = await recorded(admin, daemon, 2)
    # The application skips an unknown id silently: 200, ok, count 0.
    await admin.execute("DELETE FROM product_orders WHERE id = %s", (gone,))
    h = make_relay(reference_actions(api.base_url, attempts=2))

    await h.relay.deliver_due()
    ((row),) = await outbox_rows(admin)
    assert (row["order_id"], row["rejections"], row["dead_at"]) == (gone, 1, None)
    assert "gone (no such row)" in row["last_error"]
    await make_due(admin)
    await h.relay.deliver_due()
    ((row),) = await outbox_rows(admin)
    assert row["dead_at"] is not None
    assert await statuses(admin, [kept]) == {kept: "approved"}
    assert (
        h.sample("order_monitor_delivery_errors_total", action="approve", kind="unconfirmed") == 2
    )


async def test_a_confirm_word_the_application_never_writes_refuses_every_delivery(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    (order,) = await recorded(admin, daemon, 1)
    approve, reject = reference_actions(api.base_url)
    h = make_relay((replace(approve, confirm_status="completed"), reject))

    await h.relay.deliver_due()

    ((row),) = await outbox_rows(admin)
    assert row["rejections"] == 1
    assert "'approved'" in row["last_error"]
    assert await statuses(admin, [order]) == {order: "approved"}  # taken, but not confirmed


async def test_the_application_s_error_text_is_stored_clean_and_without_the_secret(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    (refused,) = await recorded(admin, daemon, 1)
    hostile = "\x00\x1b[31mboom\u202e\r\n " + TOKEN + " " + "ü" * 100_000
    api.reject_id(refused, hostile)
    h = make_relay(reference_actions(api.base_url))

    await h.relay.deliver_due()

    ((row),) = await outbox_rows(admin)
    rows = {row["order_id"]: row}
    error = rows[refused]["last_error"]
    assert rows[refused]["last_verdict"] == "rejected"
    assert TOKEN not in error
    assert "boom" in error
    assert len(error) <= 500
    assert not any(ord(c) < 32 for c in error)

    # A lone surrogate (an escape JSON allows) is no answer a row could hold: retried.
    (again,) = await recorded(admin, daemon, 1)
    api.reject_id(again, "bad \ud800 id")
    await make_due(admin)
    await h.relay.deliver_due()
    rows = {row["order_id"]: row for row in await outbox_rows(admin)}
    assert rows[again]["last_verdict"] == "retry"
    assert "not the JSON" in rows[again]["last_error"]


# --- what the relay leaves alone --------------------------------------------------------


async def test_an_entry_no_action_delivers_stays_untouched(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    done = await recorded(admin, daemon, 1, "done")
    failed = await recorded(admin, daemon, 1, "failed")
    approve, _ = reference_actions(api.base_url)
    h = make_relay((approve,))

    with capture_logs() as logs:
        assert await h.relay.deliver_due() == (1, 2)
        assert await h.relay.deliver_due() == (0, 1)
    assert [e["event"] for e in logs].count("delivery.no_action") == 1
    ((row),) = await outbox_rows(admin)
    assert (row["order_id"], row["tries"], row["last_error"]) == (failed[0], 0, None)
    assert await statuses(admin, done + failed) == {done[0]: "approved", failed[0]: "pending"}


async def test_a_requeued_dead_letter_is_delivered(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    (order,) = await recorded(admin, daemon, 1, "failed")
    api.reject_id(order, "STATUS_ERROR")
    h = make_relay(reference_actions(api.base_url, attempts=1))
    await h.relay.deliver_due()
    ((row),) = await outbox_rows(admin)
    assert row["dead_at"] is not None

    api.reject_id(order, None)  # the operator fixed the cause
    assert await OutboxStore(Layout()).requeue(daemon, [row["delivery_id"]]) == 1
    await h.relay.deliver_due()

    assert await outbox_rows(admin) == []
    assert await statuses(admin, [order]) == {order: "rejected"}


async def test_a_dead_letter_is_never_taken_by_the_relay(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    await recorded(admin, daemon, 1)
    h = make_relay(reference_actions(api.base_url))
    ((row),) = await outbox_rows(admin)
    # The relay's statements all say dead_at IS NULL: a dead letter is the operator's.
    await admin.execute(sql.SQL("UPDATE {} SET dead_at = now()").format(OUTBOX))
    assert await h.relay.deliver_due() == (0, 0)
    assert (await by_delivery(admin))[row["delivery_id"]]["dead_at"] is not None
    assert api.requests == []


async def test_a_requeued_dead_letter_gets_its_max_age_afresh(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    (order,) = await recorded(admin, daemon, 1)
    h = make_relay(reference_actions(api.base_url, max_age=600.0))
    # Written a quarter of an hour ago, the application down since.
    await admin.execute(
        sql.SQL("UPDATE {} SET recorded_at = now() - interval '900 s'").format(OUTBOX)
    )
    api.fail_next(500)
    await h.relay.deliver_due()
    ((row),) = await outbox_rows(admin)
    assert row["dead_at"] is not None

    # Requeued after the outage: the next transient failure is retried, not buried at once.
    await OutboxStore(Layout()).requeue(daemon, [row["delivery_id"]])
    ((row),) = await outbox_rows(admin)
    h.clock.at = row["requeued_at"] + timedelta(seconds=1)
    api.fail_next(500)
    await h.relay.deliver_due()
    ((row),) = await outbox_rows(admin)
    assert row["dead_at"] is None
    await make_due(admin)
    await h.relay.deliver_due()
    assert await statuses(admin, [order]) == {order: "approved"}


async def test_a_server_error_on_the_probe_does_not_end_the_credentials_phase(
    api: ApplicationApi, admin: Conn, daemon: Conn, make_relay: Any
) -> None:
    await recorded(admin, daemon, 1, tenant=TENANT_A)
    await recorded(admin, daemon, 1, tenant=TENANT_B)
    h = make_relay(reference_actions(api.base_url))
    api.token = "rotated-by-the-application"
    await h.relay.deliver_due()  # two requests, both 401
    assert h.relay.auth_failing == {"approve"}

    # A proxy's 502 says nothing about the token: still one probe at a time.
    api.fail_next(502)
    for _ in range(2):
        before = len(api.requests)
        await make_due(admin)
        await h.relay.deliver_due()
        assert len(api.requests) == before + 1
        assert h.relay.auth_failing == {"approve"}
