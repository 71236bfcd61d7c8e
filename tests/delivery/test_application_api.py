"""The fake of the application's admin API behaves like the reference one, on real PostgreSQL.

It is what the delivery tests and the demo trust to stand for the
application, so its own behaviour is proven here: the transitions and their
money (one refund per order, even asked twice or twice at once), the answers
(200 with per-id errors, silent skip, 401, 400s) and every fault knob.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from decimal import Decimal
from typing import Any

import aiohttp
import psycopg
import pytest
from psycopg import sql

from order_monitor.demo.application_api import (
    APPROVE_PATH,
    BALANCES,
    REJECT_PATH,
    WALLET,
    ApplicationApi,
    prepare_application_tables,
)
from tests.conftest import DAEMON_ROLE
from tests.daemon_fixtures import eventually

#: Needs escaping in a header, a URL and a log line; never printed.
TOKEN = "s3cr%t'\"\\=?#+;tok en"
TENANT = uuid.UUID("11111111-1111-4111-8111-111111111111")
OTHER_TENANT = uuid.UUID("22222222-2222-4222-8222-222222222222")
USER = uuid.UUID("33333333-3333-4333-8333-333333333333")


@pytest.fixture
async def api(db: str) -> AsyncIterator[ApplicationApi]:
    with psycopg.connect(db, autocommit=True) as conn:
        prepare_application_tables(conn)
        prepare_application_tables(conn)  # idempotent
    fake = ApplicationApi(db, token=TOKEN)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def conn(db: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as connection:
        yield connection


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def order(
    conn: psycopg.AsyncConnection[Any],
    *,
    tenant: uuid.UUID | None = TENANT,
    user: uuid.UUID | None = USER,
    sell: str = "12.50",
    price: str = "10.00",
    status: str = "pending",
) -> uuid.UUID:
    """An order the provider finished: dispatched a minute ago, the daemon's result written."""
    cursor = await conn.execute(
        """INSERT INTO product_orders ("tenantId", "userId", "sellPriceAmount", price, status,
                                       provider_referans, "externalStatus", "sentAt")
           VALUES (%s, %s, %s, %s, %s, 'REF', 'done', now() - interval '1 minute')
           RETURNING id""",
        (tenant, user, Decimal(sell), Decimal(price), status),
    )
    row = await cursor.fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


async def row_of(conn: psycopg.AsyncConnection[Any], order_id: uuid.UUID) -> dict[str, Any]:
    cursor = await conn.execute(
        """SELECT status, "externalStatus", "completedAt", "lastSyncAt", "durationMs",
                  "manualNote", "providerMessage", "lastMessage"
             FROM product_orders WHERE id = %s""",
        (order_id,),
    )
    names = [d.name for d in cursor.description or []]
    found = await cursor.fetchone()
    assert found is not None
    return dict(zip(names, found, strict=True))


async def money(conn: psycopg.AsyncConnection[Any]) -> tuple[dict[Any, Decimal], dict[Any, Any]]:
    """(balance per user, (kind, amount) per order in the wallet)."""
    balances = await conn.execute(
        sql.SQL("SELECT user_id, balance FROM {}").format(sql.Identifier(BALANCES))
    )
    wallet = await conn.execute(
        sql.SQL("SELECT order_id, kind, amount FROM {}").format(sql.Identifier(WALLET))
    )
    return (
        {user: balance for user, balance in await balances.fetchall()},
        {order_id: (kind, amount) for order_id, kind, amount in await wallet.fetchall()},
    )


async def call(
    http: aiohttp.ClientSession,
    api: ApplicationApi,
    path: str,
    ids: list[Any] | None,
    *,
    note: str | None = None,
    tenant: uuid.UUID | str | None = TENANT,
    token: str | None = TOKEN,
    extra: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, Any, Mapping[str, str]]:
    headers = dict(extra or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if tenant is not None:
        headers["X-Tenant-Id"] = str(tenant)
    payload: dict[str, Any] = {}
    if ids is not None:
        payload["ids"] = [str(i) if isinstance(i, uuid.UUID) else i for i in ids]
    if note is not None:
        payload["note"] = note
    kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": payload}
    async with http.post(api.base_url + path, headers=headers, **kwargs) as response:
        return response.status, await response.json(), response.headers


# --- the transitions ------------------------------------------------------------------


async def test_approve_finishes_the_order_without_moving_money(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    order_id = await order(conn)

    status, body, _ = await call(http, api, APPROVE_PATH, [order_id], note="İşlem tamamlandı")

    assert (status, body) == (200, {"ok": True, "count": 1})
    row = await row_of(conn, order_id)
    assert row["status"] == "approved"
    assert row["externalStatus"] == "done"
    assert row["completedAt"] is not None
    assert row["lastSyncAt"] is not None
    assert 55_000 <= row["durationMs"] <= 120_000  # sent a minute ago
    assert row["manualNote"] == row["providerMessage"] == row["lastMessage"] == "İşlem tamamlandı"
    assert await money(conn) == ({}, {})


async def test_reject_refunds_the_sell_price_once_with_a_wallet_record(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    first = await order(conn, sell="12.50")
    free = await order(conn, sell="0", price="4.20")  # no sell price: the price is refunded

    status, body, _ = await call(http, api, REJECT_PATH, [first, free])

    assert (status, body) == (200, {"ok": True, "count": 2})
    for order_id in (first, free):
        row = await row_of(conn, order_id)
        assert (row["status"], row["externalStatus"]) == ("rejected", "failed")
        assert row["manualNote"] is None  # no note given: nothing written there
    balances, wallet = await money(conn)
    assert balances == {USER: Decimal("16.70")}
    assert wallet == {first: ("refund", Decimal("12.50")), free: ("refund", Decimal("4.20"))}


async def test_asking_again_changes_nothing_and_refunds_nothing(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    rejected = await order(conn)
    approved = await order(conn)
    await call(http, api, REJECT_PATH, [rejected])
    await call(http, api, APPROVE_PATH, [approved])
    before = await row_of(conn, rejected)

    # Again, and the same id twice in one request: the transition is idempotent.
    again = await call(http, api, REJECT_PATH, [rejected, rejected], note="retried")
    also = await call(http, api, APPROVE_PATH, [approved])

    assert again[:2] == (200, {"ok": True, "count": 0})
    assert also[:2] == (200, {"ok": True, "count": 0})
    assert await row_of(conn, rejected) == before
    balances, wallet = await money(conn)
    assert balances == {USER: Decimal("12.50")}
    assert list(wallet) == [rejected]


async def test_two_requests_at_once_refund_each_order_exactly_once(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    ids = [await order(conn, sell=f"{n + 1}.00") for n in range(20)]

    answers = await asyncio.gather(
        call(http, api, REJECT_PATH, ids), call(http, api, REJECT_PATH, list(reversed(ids)))
    )

    assert [status for status, _, _ in answers] == [200, 200]
    assert all("errors" not in body for _, body, _ in answers)
    # Each order changed once, by one of the two requests.
    assert sum(body["count"] for _, body, _ in answers) == 20
    balances, wallet = await money(conn)
    assert balances == {USER: Decimal(sum(range(1, 21)))}
    assert sorted(wallet) == sorted(ids)


async def test_the_database_itself_refuses_a_second_refund_of_an_order(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    order_id = await order(conn)
    await call(http, api, REJECT_PATH, [order_id])

    with pytest.raises(psycopg.errors.UniqueViolation):
        await conn.execute(
            sql.SQL(
                "INSERT INTO {} (order_id, user_id, kind, amount) VALUES (%s, %s, 'refund', 1)"
            ).format(sql.Identifier(WALLET)),
            (order_id, USER),
        )


async def test_the_daemon_role_cannot_touch_the_money_tables(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any]
) -> None:
    for table in (BALANCES, WALLET):
        cursor = await conn.execute(
            "SELECT has_table_privilege(%s, %s, 'SELECT, INSERT, UPDATE, DELETE')",
            (DAEMON_ROLE, table),
        )
        assert await cursor.fetchone() == (False,)


# --- refusals and skips --------------------------------------------------------------


async def test_per_id_errors_refuse_only_those_ids(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    mine = await order(conn)
    theirs = await order(conn, tenant=OTHER_TENANT)
    approved = await order(conn, status="approved")
    orphan = await order(conn, user=None)
    unknown = uuid.uuid4()

    status, body, _ = await call(
        http, api, REJECT_PATH, [unknown, theirs, mine, approved, orphan, "not-a-uuid", 7]
    )

    assert status == 200
    # The unknown ids are skipped silently: neither counted nor an error.
    assert body == {
        "ok": True,
        "count": 1,
        "errors": [
            {"id": str(theirs), "error": "TENANT_MISMATCH"},
            {"id": str(approved), "error": "STATUS_ERROR"},
            {"id": str(orphan), "error": "LEGACY_USER_MISSING"},
        ],
    }
    assert (await row_of(conn, mine))["status"] == "rejected"
    assert (await row_of(conn, theirs))["status"] == "pending"
    assert (await row_of(conn, approved))["status"] == "approved"
    assert (await row_of(conn, orphan))["status"] == "pending"
    assert list((await money(conn))[1]) == [mine]


async def test_the_tenant_header_is_compared_case_insensitively(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    order_id = await order(conn)
    status, body, _ = await call(http, api, APPROVE_PATH, [order_id], tenant=str(TENANT).upper())
    assert (status, body) == (200, {"ok": True, "count": 1})


@pytest.mark.parametrize(
    ("token", "why"),
    [(None, "no header"), ("wrong", "a wrong token"), (TOKEN + "x", "a longer one")],
)
async def test_a_bad_token_is_401_and_changes_nothing(
    api: ApplicationApi,
    conn: psycopg.AsyncConnection[Any],
    http: aiohttp.ClientSession,
    token: str | None,
    why: str,
) -> None:
    order_id = await order(conn)
    status, body, _ = await call(http, api, REJECT_PATH, [order_id], token=token)
    assert status == 401, why
    assert body["ok"] is False
    assert (await row_of(conn, order_id))["status"] == "pending"
    assert await money(conn) == ({}, {})


async def test_changing_the_token_starts_a_401_phase(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    order_id = await order(conn)
    api.token = "rotated"
    assert (await call(http, api, APPROVE_PATH, [order_id]))[0] == 401
    api.token = TOKEN
    assert (await call(http, api, APPROVE_PATH, [order_id]))[:2] == (200, {"ok": True, "count": 1})


@pytest.mark.parametrize(
    ("tenant", "ids", "raw", "message"),
    [
        (None, ["x"], None, "TENANT_ID_REQUIRED"),
        ("", ["x"], None, "TENANT_ID_REQUIRED"),
        (TENANT, None, None, "ids required"),
        (TENANT, [], None, "ids required"),
        (TENANT, None, b'{"ids": "not a list"}', "ids required"),
        (TENANT, None, b"\x00not json%'\"", "ids required"),
    ],
)
async def test_bad_requests_are_400(
    api: ApplicationApi,
    http: aiohttp.ClientSession,
    tenant: uuid.UUID | str | None,
    ids: list[Any] | None,
    raw: bytes | None,
    message: str,
) -> None:
    status, body, _ = await call(http, api, APPROVE_PATH, ids, tenant=tenant, raw=raw)
    assert (status, body) == (400, {"ok": False, "message": message})


async def test_a_long_hostile_note_is_kept_and_last_message_truncated(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    order_id = await order(conn)
    note = "100% 'quoted' \"double\" \\ \x07\t\n" + "ş" * 300

    await call(http, api, APPROVE_PATH, [order_id], note=note)

    row = await row_of(conn, order_id)
    assert row["manualNote"] == row["providerMessage"] == note
    assert row["lastMessage"] == note[:250]


@pytest.mark.parametrize("note", ["nul \x00 byte", "lone \ud800 surrogate"])
async def test_a_note_the_database_cannot_store_is_an_unexpected_error_for_that_id(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession, note: str
) -> None:
    order_id = await order(conn)
    status, body, _ = await call(http, api, REJECT_PATH, [order_id], note=note)
    assert (status, body) == (
        200,
        {"ok": True, "count": 0, "errors": [{"id": str(order_id), "error": "UNEXPECTED_ERROR"}]},
    )
    assert (await row_of(conn, order_id))["status"] == "pending"
    assert await money(conn) == ({}, {})  # the refund rolled back with the row


# --- fault knobs and the record --------------------------------------------------------


async def test_fail_next_answers_the_status_with_retry_after_then_recovers(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    order_id = await order(conn)
    api.fail_next(503, count=2, retry_after="7")
    api.fail_next(429)

    answers = [await call(http, api, REJECT_PATH, [order_id]) for _ in range(4)]

    assert [status for status, _, _ in answers] == [503, 503, 429, 200]
    assert [headers.get("Retry-After") for _, _, headers in answers[:3]] == ["7", "7", None]
    assert answers[3][1] == {"ok": True, "count": 1}
    assert list((await money(conn))[1]) == [order_id]  # refunded by the one answered request


async def test_a_failed_request_changes_nothing(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    order_id = await order(conn)
    api.fail_next(500)
    assert (await call(http, api, REJECT_PATH, [order_id]))[0] == 500
    assert (await row_of(conn, order_id))["status"] == "pending"
    assert await money(conn) == ({}, {})


async def test_hang_next_never_answers_until_closed(
    db: str, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    with psycopg.connect(db, autocommit=True) as setup:
        prepare_application_tables(setup)
    api = ApplicationApi(db, token=TOKEN)
    await api.start()
    order_id = await order(conn)
    api.hang_next(1)
    hanging = asyncio.create_task(call(http, api, APPROVE_PATH, [order_id]))
    try:
        await eventually(lambda: _true(len(api.requests) == 1), within=10, what="the request")

        # The server goes on answering others meanwhile; the hanging one did nothing.
        assert (await call(http, api, APPROVE_PATH, [order_id]))[:2] == (
            200,
            {"ok": True, "count": 1},
        )
        assert not hanging.done()
    finally:
        await api.close()
    # Closed: the hanging request ends (an answer that is no success, or a cut connection).
    result = await asyncio.gather(hanging, return_exceptions=True)
    assert isinstance(result[0], aiohttp.ClientError) or result[0][0] == 503


async def test_reject_id_refuses_an_order_for_a_while_or_until_told(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    once, always, other = await order(conn), await order(conn), await order(conn)
    api.reject_id(once, "OVERDRAFT_EXCEEDED", times=1)
    api.reject_id(always, "UNEXPECTED_ERROR")

    first = await call(http, api, REJECT_PATH, [once, always, other])
    second = await call(http, api, REJECT_PATH, [once, always])
    api.reject_id(always, None)
    third = await call(http, api, REJECT_PATH, [always])

    assert first[1] == {
        "ok": True,
        "count": 1,
        "errors": [
            {"id": str(once), "error": "OVERDRAFT_EXCEEDED"},
            {"id": str(always), "error": "UNEXPECTED_ERROR"},
        ],
    }
    assert second[1] == {
        "ok": True,
        "count": 1,
        "errors": [{"id": str(always), "error": "UNEXPECTED_ERROR"}],
    }
    assert third[1] == {"ok": True, "count": 1}
    assert sorted((await money(conn))[1]) == sorted([once, always, other])


async def test_every_request_is_recorded_with_its_headers_and_body(
    api: ApplicationApi, conn: psycopg.AsyncConnection[Any], http: aiohttp.ClientSession
) -> None:
    order_id = await order(conn)
    api.fail_next(502)
    extra = {"Idempotency-Key": "req-1"}

    await call(http, api, APPROVE_PATH, [order_id], note="n", extra=extra)
    await call(http, api, REJECT_PATH, [order_id], token="wrong", extra=extra)

    assert [(r.path, r.json) for r in api.requests] == [
        (APPROVE_PATH, {"ids": [str(order_id)], "note": "n"}),
        (REJECT_PATH, {"ids": [str(order_id)]}),
    ]
    for recorded in api.requests:
        assert recorded.headers["X-Tenant-Id"] == str(TENANT)
        assert recorded.headers["Idempotency-Key"] == "req-1"
    path, headers, body = api.requests[0]  # a plain tuple too
    assert (path, headers["X-Tenant-Id"], body["note"]) == (APPROVE_PATH, str(TENANT), "n")


async def _true(value: bool) -> bool:
    return value
