"""The page's statements on the real server, as the daemon's least-privilege role.

What a refresh reads (in one statement), the table scan a new term makes for
the orders that gave up, and one order; none of them may name the PIN
column, which the role may not read anyway.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from order_monitor.config import Settings
from order_monitor.page.reading import GAVE_UP_LISTED, PageStatements
from order_monitor.redaction import Secret
from tests.conftest import as_daemon
from tests.operator.test_deliveries import HOSTILE, record
from tests.operator.test_doctor_delivery import action


def _insert(db: str, values: str) -> uuid.UUID:
    with psycopg.connect(db, autocommit=True) as conn:
        row = conn.execute(
            'INSERT INTO product_orders (provider_referans, "providerId", "externalStatus",'
            ' "sentAt", "lastSyncAt", "lastMessage", "pinCode") VALUES ' + values + " RETURNING id"
        ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


@pytest.fixture
def settings(db: str) -> Settings:
    return Settings(
        dsn=Secret(as_daemon(db)), actions=(action("approve", "done", "http://127.0.0.1:9"),)
    )


def test_no_statement_names_the_pin_or_the_providers_message(settings: Settings) -> None:
    statements = PageStatements(settings)
    c = settings.layout.columns
    for statement in (
        statements.reading_statement,
        statements.gave_up_statement,
        statements.order_statement,
    ):
        text = statement.as_string(None)
        assert sql.Identifier(c.pin_code).as_string(None) not in text
        assert sql.Identifier(c.provider_message).as_string(None) not in text


async def test_a_refresh_reads_in_flight_gave_ups_and_the_outbox_in_one_statement(
    db: str, settings: Settings
) -> None:
    hostile = sql.Literal(HOSTILE).as_string(None)
    for n in (1, 5):
        _insert(db, f"('w{n}', 'znet', 'sent', now() - interval '{n} minutes', NULL, NULL, NULL)")
    _insert(db, "('n1', NULL, 'processing', 'infinity', NULL, NULL, NULL)")
    gave_up = _insert(
        db,
        "('g1', 'znet', 'manual_required', now() - interval '3 hours',"
        f" now() - interval '10 minutes', {hostile}, NULL)",
    )
    stale = _insert(
        db,
        "('g2', 'znet', 'manual_required', now() - interval '3 days',"
        " now() - interval '2 days', 'long ago', NULL)",
    )
    delivery, order = record(db, dead=True, error=HOSTILE, tries=5, outcome="done")
    record(db, outcome="done")

    statements = PageStatements(settings)
    async with await psycopg.AsyncConnection.connect(
        settings.dsn.reveal(), autocommit=True
    ) as conn:
        found = await statements.gave_up_within(conn, 86400.0)
        assert [order for order, _ in found] == [gave_up]
        assert 590 < found[0][1] < 700
        reading = await statements.read(conn, [gave_up, stale, uuid.uuid4()])

    assert {(g.provider_id, g.orders) for g in reading.in_flight} == {("znet", 2), (None, 1)}
    znet = next(g for g in reading.in_flight if g.provider_id == "znet")
    assert znet.oldest_s is not None
    assert 290 < znet.oldest_s < 400
    # An infinite dispatch time gives no age, and no error.
    assert next(g for g in reading.in_flight if g.provider_id is None).oldest_s is None
    # Asked for by id, an older give-up is read too: the ledger keeps the window.
    assert [g.id for g in reading.gave_up] == [gave_up, stale]
    assert reading.gave_up_count == 2
    assert reading.gave_up[0].last_message == HOSTILE
    assert reading.outbox is not None
    assert reading.outbox.undelivered == 1
    assert reading.outbox.dead == 1
    assert [(d.delivery_id, d.order_id, d.last_error) for d in reading.dead_letters] == [
        (delivery, order, HOSTILE)
    ]


async def test_one_order_as_the_page_shows_it(db: str, settings: Settings) -> None:
    order = _insert(
        db,
        "('r1', 'znet', 'done', 'infinity', now() - interval '1 minute', 'your code', 'PIN-1')",
    )
    statements = PageStatements(settings)
    async with await psycopg.AsyncConnection.connect(
        settings.dsn.reveal(), autocommit=True
    ) as conn:
        row = await statements.order(conn, order)
        missing = await statements.order(conn, uuid.uuid4())
    assert missing is None
    assert row is not None
    assert row.in_flight is False
    assert row.external_status == "done"
    assert row.dispatched_s is None
    assert row.dispatch_issue is not None
    assert row.dispatch_issue.why == "infinity"
    assert row.last_sync_s is not None
    assert 50 < row.last_sync_s < 200
    assert "PIN-1" not in repr(row)


async def test_a_bad_day_lists_the_latest_and_counts_them_all(db: str, settings: Settings) -> None:
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus",
                   "sentAt", "lastSyncAt")
               SELECT 'g' || n, 'znet', 'manual_required', now() - interval '1 day',
                      now() - make_interval(secs => n)
               FROM generate_series(1, %s) AS n""",
            (GAVE_UP_LISTED + 5,),
        )
    statements = PageStatements(settings)
    async with await psycopg.AsyncConnection.connect(
        settings.dsn.reveal(), autocommit=True
    ) as conn:
        found = await statements.gave_up_within(conn, 86400.0)
        newest_first = [order for order, _ in sorted(found, key=lambda f: f[1])]
        reading = await statements.read(conn, newest_first)
    assert reading.gave_up_count == GAVE_UP_LISTED + 5
    assert [g.id for g in reading.gave_up] == newest_first[:GAVE_UP_LISTED]
