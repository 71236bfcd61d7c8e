"""Each outbox query on real PostgreSQL, as the daemon's least-privilege role.

The grants are part of the contract: every query here runs with exactly what
role.sql gives the role (SELECT and DELETE on the outbox, UPDATE of its
bookkeeping columns), and what it must not do (INSERT an entry, rewrite what
an entry delivers) is refused by the database itself. Entries are made the
only way production makes them: the write function, called by the role.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout
from order_monitor.delivery.model import Entry, Verdict
from order_monitor.delivery.relay import _clean_error
from order_monitor.delivery.store import OutboxStore, Reschedule
from tests.conftest import as_daemon
from tests.delivery.conftest import Conn

TENANT_A = uuid.UUID("aaaaaaaa-0000-4000-8000-00000000000a")
TENANT_B = uuid.UUID("bbbbbbbb-0000-4000-8000-00000000000b")
USER = uuid.UUID("cccccccc-0000-4000-8000-00000000000c")
OUTBOX = schema.Names(Layout()).outbox


@pytest.fixture
def store() -> OutboxStore:
    return OutboxStore(Layout())


async def dispatch(
    admin: Conn, count: int, *, tenant: uuid.UUID | None = TENANT_A, prefix: str = "ref"
) -> list[tuple[uuid.UUID, str]]:
    """*count* orders in flight, as the application dispatches them: (id, reference)."""
    refs = [f"{prefix}-{uuid.uuid4().hex[:8]}-{n}" for n in range(count)]
    cursor = await admin.execute(
        """INSERT INTO product_orders (provider_referans, "providerId", "externalStatus",
                                       "sentAt", "tenantId", "userId", "sellPriceAmount")
           SELECT ref, 'fake', 'sent', now() - interval '1 minute', %s, %s, 9.99
           FROM unnest(%s::text[]) WITH ORDINALITY AS r(ref, n) ORDER BY n
           RETURNING id, provider_referans""",
        (tenant, USER, refs),
    )
    return [(row[0], row[1]) for row in await cursor.fetchall()]


async def write(
    daemon: Conn,
    orders: Sequence[tuple[uuid.UUID, str]],
    kind: str,
    message: str | None = "provider says so",
) -> list[tuple[uuid.UUID, str]]:
    """The daemon's write of one outcome for *orders*: what the write function returned."""
    n = len(orders)
    cursor = await daemon.execute(
        sql.SQL("SELECT order_id, outcome FROM {}(%s, %s, %s, %s, %s, %s, %s)").format(
            schema.Names(Layout()).write_function
        ),
        (
            [o for o, _ in orders],
            [r for _, r in orders],
            ["fake"] * n,
            [kind] * n,
            ["PIN-SECRET"] * n,
            [message] * n,
            [message] * n,
        ),
    )
    return [(row[0], row[1]) for row in await cursor.fetchall()]


async def recorded(
    admin: Conn, daemon: Conn, count: int, kind: str = "done", **dispatched: Any
) -> list[uuid.UUID]:
    """*count* results written (and so recorded in the outbox); their order ids."""
    orders = await dispatch(admin, count, **dispatched)
    assert len(await write(daemon, orders, kind)) == count
    return [o for o, _ in orders]


async def outbox_rows(admin: Conn) -> list[dict[str, Any]]:
    cursor = await admin.execute(sql.SQL("SELECT * FROM {} ORDER BY recorded_at").format(OUTBOX))
    names = [d.name for d in cursor.description or []]
    return [dict(zip(names, row, strict=True)) for row in await cursor.fetchall()]


async def by_delivery(admin: Conn) -> dict[uuid.UUID, dict[str, Any]]:
    return {row["delivery_id"]: row for row in await outbox_rows(admin)}


async def make_due(admin: Conn, delivery_ids: Sequence[uuid.UUID] | None = None) -> None:
    """Time passes: the named entries (all when None) are due now."""
    if delivery_ids is None:
        await admin.execute(sql.SQL("UPDATE {} SET due_at = now()").format(OUTBOX))
    else:
        await admin.execute(
            sql.SQL("UPDATE {} SET due_at = now() WHERE delivery_id = ANY(%s)").format(OUTBOX),
            (list(delivery_ids),),
        )


# --- what the write function records --------------------------------------------------


async def test_a_written_result_is_an_entry_with_its_columns_and_never_the_pin(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    done = await recorded(admin, daemon, 2, "done", tenant=TENANT_A)
    failed = await recorded(admin, daemon, 1, "failed", tenant=TENANT_B)
    gave_up = await recorded(admin, daemon, 1, "gave_up")  # no action delivers it
    pending = await dispatch(admin, 1)
    assert await write(daemon, pending, "pending") == [(pending[0][0], "pending")]

    entries = await store.due(daemon, 100)

    assert sorted(e.order_id for e in entries) == sorted(done + failed)
    assert not {e.order_id for e in entries} & {*gave_up, pending[0][0]}
    for entry in entries:
        assert entry.outcome == ("done" if entry.order_id in done else "failed")
        assert entry.columns == {"tenantId": str(TENANT_A if entry.outcome == "done" else TENANT_B)}
        assert entry.provider_message == entry.last_message == "provider says so"
        assert (entry.tries, entry.rejections, entry.dead_at, entry.last_error) == (
            0,
            0,
            None,
            None,
        )
    for row in await outbox_rows(admin):
        assert "PIN-SECRET" not in repr(row)


async def test_a_write_the_guard_refuses_records_nothing(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    orders = await dispatch(admin, 2)
    # An operator finished one, the application re-sent the other (new reference).
    await admin.execute(
        "UPDATE product_orders SET status = 'approved' WHERE id = %s", (orders[0][0],)
    )
    await admin.execute(
        "UPDATE product_orders SET provider_referans = 'resent' WHERE id = %s", (orders[1][0],)
    )

    assert await write(daemon, orders, "done") == []
    assert await store.due(daemon, 100) == []


# --- the relay's queries ----------------------------------------------------------------


async def test_due_takes_due_entries_longest_due_first_up_to_the_limit(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    await recorded(admin, daemon, 5)
    rows = await outbox_rows(admin)
    # Stagger the due times; one is not due yet, one is a dead letter.
    for n, row in enumerate(rows):
        await admin.execute(
            sql.SQL(
                "UPDATE {} SET due_at = now() - make_interval(secs => %s) WHERE delivery_id = %s"
            ).format(OUTBOX),
            (100 - n, row["delivery_id"]),
        )
    later, dead = rows[1]["delivery_id"], rows[2]["delivery_id"]
    await admin.execute(
        sql.SQL("UPDATE {} SET due_at = now() + interval '1 hour' WHERE delivery_id = %s").format(
            OUTBOX
        ),
        (later,),
    )
    await admin.execute(
        sql.SQL("UPDATE {} SET dead_at = now() WHERE delivery_id = %s").format(OUTBOX), (dead,)
    )

    due = [e.delivery_id for e in await store.due(daemon, 100)]
    first_two = [e.delivery_id for e in await store.due(daemon, 2)]

    assert due == [rows[0]["delivery_id"], rows[3]["delivery_id"], rows[4]["delivery_id"]]
    assert first_two == due[:2]


async def test_next_due_in_is_none_when_nothing_waits_and_counts_down_otherwise(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    assert await store.next_due_in(daemon) is None
    await recorded(admin, daemon, 1)
    due_now = await store.next_due_in(daemon)
    assert due_now is not None
    assert due_now <= 0.0

    await admin.execute(sql.SQL("UPDATE {} SET due_at = now() + interval '90 s'").format(OUTBOX))
    later = await store.next_due_in(daemon)
    assert later is not None
    assert 80.0 < later <= 90.0

    await admin.execute(sql.SQL("UPDATE {} SET dead_at = now()").format(OUTBOX))
    assert await store.next_due_in(daemon) is None  # a dead letter waits for an operator


async def test_statuses_reads_the_rows_that_still_exist(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    kept, gone = await recorded(admin, daemon, 2)
    await admin.execute("UPDATE product_orders SET status = 'approved' WHERE id = %s", (kept,))
    await admin.execute("DELETE FROM product_orders WHERE id = %s", (gone,))

    assert await store.statuses(daemon, [kept, gone, kept]) == {kept: "approved"}
    assert await store.statuses(daemon, []) == {}


async def test_delivered_forgets_only_the_named_undelivered_entries(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    await recorded(admin, daemon, 3)
    one, other, dead = (row["delivery_id"] for row in await outbox_rows(admin))
    await admin.execute(
        sql.SQL("UPDATE {} SET dead_at = now() WHERE delivery_id = %s").format(OUTBOX), (dead,)
    )

    assert await store.delivered(daemon, [one, dead, uuid.uuid4()]) == 1

    assert set(await by_delivery(admin)) == {other, dead}  # a dead letter is the operator's


async def test_reschedule_counts_tries_and_refusals_and_moves_the_due_time(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    await recorded(admin, daemon, 4)
    tried, refused, waited, dead = (row["delivery_id"] for row in await outbox_rows(admin))
    await admin.execute(
        sql.SQL("UPDATE {} SET dead_at = now() WHERE delivery_id = %s").format(OUTBOX), (dead,)
    )

    changed = await store.reschedule(
        daemon,
        [
            Reschedule(tried, 30.0, Verdict.RETRY.value, "HTTP 502: bad gateway", False),
            Reschedule(refused, 10.0, Verdict.REJECTED.value, "STATUS_ERROR", True),
            Reschedule(waited, -5.0, Verdict.AUTH.value, "waiting", False, attempted=False),
            Reschedule(dead, 1.0, Verdict.RETRY.value, "must not land", False),
        ],
    )

    assert changed == 3
    assert await store.reschedule(daemon, []) == 0
    rows = await by_delivery(admin)
    now = (await (await admin.execute("SELECT now()")).fetchone() or [None])[0]
    assert (rows[tried]["tries"], rows[tried]["rejections"]) == (1, 0)
    assert rows[tried]["last_verdict"] == "retry"
    assert rows[tried]["last_error"] == "HTTP 502: bad gateway"
    assert timedelta(seconds=25) < rows[tried]["due_at"] - now <= timedelta(seconds=30)
    assert (rows[refused]["tries"], rows[refused]["rejections"]) == (1, 1)
    # Not attempted: no try counted, and a negative delay is "now", not the past.
    assert (rows[waited]["tries"], rows[waited]["rejections"]) == (0, 0)
    assert rows[waited]["last_verdict"] == "auth"
    assert abs((rows[waited]["due_at"] - now).total_seconds()) < 5
    assert rows[dead]["last_error"] is None
    assert rows[dead]["tries"] == 0


async def test_bury_makes_dead_letters_counting_the_last_attempt(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    await recorded(admin, daemon, 3)
    retried, rejected, untouched = (row["delivery_id"] for row in await outbox_rows(admin))

    assert (
        await store.bury(
            daemon,
            [
                (retried, Verdict.RETRY.value, "timed out after 20 s"),
                (rejected, Verdict.REJECTED.value, "TENANT_MISMATCH"),
            ],
        )
        == 2
    )
    assert await store.bury(daemon, [(retried, Verdict.RETRY.value, "twice")]) == 0
    assert await store.bury(daemon, []) == 0

    rows = await by_delivery(admin)
    assert rows[retried]["dead_at"] is not None
    assert (rows[retried]["tries"], rows[retried]["rejections"]) == (1, 0)
    assert rows[retried]["last_error"] == "timed out after 20 s"
    assert (rows[rejected]["tries"], rows[rejected]["rejections"]) == (1, 1)
    assert rows[untouched]["dead_at"] is None
    assert [e.delivery_id for e in await store.due(daemon, 10)] == [untouched]


# --- the operator's queries ---------------------------------------------------------------


async def test_summary_counts_by_state_and_outcome_with_the_oldest_age(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    empty = await store.summary(daemon)
    assert (empty.undelivered, empty.dead, empty.oldest_undelivered_age) == (0, 0, None)

    await recorded(admin, daemon, 3, "done")
    await recorded(admin, daemon, 2, "failed")
    rows = await outbox_rows(admin)
    await admin.execute(
        sql.SQL(
            "UPDATE {} SET recorded_at = now() - interval '2 hours' WHERE delivery_id = %s"
        ).format(OUTBOX),
        (rows[1]["delivery_id"],),
    )
    await store.bury(daemon, [(rows[0]["delivery_id"], "rejected", "no")])
    await store.reschedule(
        daemon, [Reschedule(rows[4]["delivery_id"], 60, Verdict.AUTH.value, "401", False)]
    )

    summary = await store.summary(daemon)

    assert (summary.undelivered, summary.dead, summary.auth_waiting) == (4, 1, 1)
    assert dict(summary.by_outcome) == {"done": 2, "failed": 2}
    assert summary.oldest_undelivered_age is not None
    assert 7190 < summary.oldest_undelivered_age < 7300


async def test_listing_filters_dead_letters_newest_first_with_a_limit(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    await recorded(admin, daemon, 4)
    rows = await outbox_rows(admin)
    for n, row in enumerate(rows):  # distinct recording times, oldest first
        await admin.execute(
            sql.SQL(
                "UPDATE {} SET recorded_at = now() - make_interval(mins => %s) WHERE delivery_id = %s"
            ).format(OUTBOX),
            (10 - n, row["delivery_id"]),
        )
    ids = [row["delivery_id"] for row in rows]
    await store.bury(daemon, [(ids[0], "retry", "x"), (ids[2], "retry", "y")])

    def listed(entries: list[Entry]) -> list[uuid.UUID]:
        return [e.delivery_id for e in entries]

    assert listed(await store.listing(daemon, dead=True, limit=10)) == [ids[2], ids[0]]
    assert listed(await store.listing(daemon, dead=False, limit=10)) == [ids[3], ids[1]]
    assert listed(await store.listing(daemon, dead=None, limit=3)) == [ids[3], ids[2], ids[1]]


async def test_entries_are_found_by_delivery_or_order_id_and_may_be_locked(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    orders = await recorded(admin, daemon, 3)
    rows = await outbox_rows(admin)

    by_delivery_id = rows[0]["delivery_id"]
    by_order_id = next(o for o in orders if o != rows[0]["order_id"])
    found = await store.entries(daemon, [by_delivery_id, by_order_id, uuid.uuid4()])
    assert {e.order_id for e in found} == {rows[0]["order_id"], by_order_id}
    assert await store.entries(daemon, []) == []

    # FOR UPDATE needs UPDATE on a column: the bookkeeping grant is enough.
    async with daemon.transaction():
        locked = await store.entries(daemon, [orders[1]], lock=True)
    assert [e.order_id for e in locked] == [orders[1]]


async def test_requeue_revives_dead_letters_only_from_zero(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    await recorded(admin, daemon, 3)
    one, two, alive = (row["delivery_id"] for row in await outbox_rows(admin))
    await store.bury(daemon, [(one, "rejected", "a"), (two, "rejected", "b")])
    await store.reschedule(daemon, [Reschedule(alive, 600, "retry", "later", False)])

    assert await store.requeue(daemon, [one, alive]) == 1  # an entry still retried is the relay's
    rows = await by_delivery(admin)
    assert rows[one]["dead_at"] is None
    assert rows[one]["requeued_at"] is not None
    assert (rows[one]["tries"], rows[one]["rejections"]) == (0, 0)
    assert rows[two]["dead_at"] is not None
    assert rows[alive]["tries"] == 1
    assert rows[alive]["requeued_at"] is None
    assert one in {e.delivery_id for e in await store.due(daemon, 10)}

    assert await store.requeue(daemon, None) == 1  # every (remaining) dead letter
    assert (await store.summary(daemon)).dead == 0


async def test_drop_forgets_dead_letters_only(
    admin: Conn, daemon: Conn, store: OutboxStore
) -> None:
    await recorded(admin, daemon, 2)
    dead, alive = (row["delivery_id"] for row in await outbox_rows(admin))
    await store.bury(daemon, [(dead, "rejected", "a")])

    assert await store.drop(daemon, [dead, alive]) == 1
    assert set(await by_delivery(admin)) == {alive}


# --- what the role may not do -----------------------------------------------------------


async def test_the_role_cannot_insert_an_entry_or_rewrite_what_one_delivers(
    admin: Conn, daemon: Conn
) -> None:
    (order,) = await recorded(admin, daemon, 1)
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await daemon.execute(
            sql.SQL("INSERT INTO {} (order_id, outcome) VALUES (%s, 'done')").format(OUTBOX),
            (uuid.uuid4(),),
        )
    for column, value in (
        ("outcome", "failed"),
        ("order_id", uuid.uuid4()),
        ("columns", '{"tenantId": "other"}'),
        ("provider_message", "forged"),
        ("recorded_at", "2000-01-01T00:00:00Z"),
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await daemon.execute(
                sql.SQL("UPDATE {} SET {} = %s").format(OUTBOX, sql.Identifier(column)), (value,)
            )
    (row,) = await outbox_rows(admin)
    assert (row["order_id"], row["outcome"], row["provider_message"]) == (
        order,
        "done",
        "provider says so",
    )


async def test_the_role_cannot_truncate_or_alter_the_outbox(daemon: Conn) -> None:
    for statement in (
        sql.SQL("TRUNCATE {}").format(OUTBOX),
        sql.SQL("ALTER TABLE {} ADD COLUMN x int").format(OUTBOX),
        sql.SQL("DROP TABLE {}").format(OUTBOX),
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await daemon.execute(statement)


# --- hostile texts ------------------------------------------------------------------------


@settings(
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.text(alphabet=st.characters(exclude_categories=()), max_size=2000))
@example("\x00" * 10 + "\ud800 \udfff\x1b[31m" + "ü" * 1_000_000)
def test_any_error_text_the_relay_keeps_is_stored_and_read_back_as_kept(
    outbox_db: str, text: str
) -> None:
    """What an application answers ends in last_error: NUL, lone surrogates, megabytes."""
    kept = _clean_error(text)
    assert len(kept) <= 500

    async def roundtrip() -> Entry:
        store = OutboxStore(Layout())
        async with (
            await psycopg.AsyncConnection.connect(outbox_db, autocommit=True) as admin,
            await psycopg.AsyncConnection.connect(as_daemon(outbox_db), autocommit=True) as daemon,
        ):
            await admin.execute(sql.SQL("DELETE FROM {}").format(OUTBOX))
            await recorded(admin, daemon, 1)
            (entry,) = await store.due(daemon, 1)
            await store.reschedule(daemon, [Reschedule(entry.delivery_id, 0, "retry", kept, False)])
            (again,) = await store.entries(daemon, [entry.delivery_id])
            return again

    assert asyncio.run(roundtrip()).last_error == kept
