"""The parser on what a real server's pgoutput writes, through the SQL interface the daemon will use.

A publication of the orders table restricted to the columns the in-flight
rule reads (a PostgreSQL 15 column list), a pgoutput slot, the application's
kinds of writes, then ``pg_logical_slot_peek_binary_changes``: every row must
parse, and exactly the committed inserts and updates of the orders table must
come out.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import psycopg
import pytest
from psycopg.rows import TupleRow

from order_monitor.decoding.pgoutput import (
    Begin,
    Commit,
    Message,
    Relation,
    Update,
    changed_rows,
    parse_message,
)

SLOT = "om_test_slot"
PUBLICATION = "om_test_pub"
#: The published columns, in the table's order (not the column list's).
COLUMNS = ("id", "status", "externalStatus", "provider_referans")
PEEK = (
    "SELECT lsn::text, xid::text, data FROM pg_catalog.pg_logical_slot_peek_binary_changes("
    f"'{SLOT}', NULL, NULL, 'proto_version', '1', 'publication_names', '{PUBLICATION}')"
)
INSERT = (
    'INSERT INTO product_orders (id, "provider_referans", "externalStatus", status)'
    " VALUES (%s, %s, %s, %s)"
)


def set_up(conn: psycopg.Connection[TupleRow]) -> None:
    conn.execute(
        f"CREATE PUBLICATION {PUBLICATION} FOR TABLE product_orders"
        ' (id, "provider_referans", "externalStatus", status)'
        " WITH (publish = 'insert, update')"
    )
    conn.execute(f"SELECT pg_catalog.pg_create_logical_replication_slot('{SLOT}', 'pgoutput')")


def tear_down(conn: psycopg.Connection[TupleRow]) -> None:
    conn.execute(f"SELECT pg_catalog.pg_drop_replication_slot('{SLOT}')")
    conn.execute(f"DROP PUBLICATION {PUBLICATION}")


def peek(conn: psycopg.Connection[TupleRow]) -> list[tuple[str, str, bytes]]:
    return [(str(lsn), str(xid), bytes(data)) for lsn, xid, data in conn.execute(PEEK)]


def test_the_committed_rows_of_the_orders_table_come_out(orders_db: str) -> None:
    a, b, c, d, e, f, g = (str(uuid.uuid4()) for _ in range(7))
    quoted = "R-'1\" \\ ; DROP TABLE x; --"
    unicode = "Sipariş ödendi ✓ 🚀 \u200b\t\n"
    with psycopg.connect(orders_db, autocommit=True) as conn:
        set_up(conn)
        try:
            conn.execute("CREATE TABLE unpublished (x int)")
            with conn.transaction():
                conn.execute(INSERT, (a, quoted, "sent", unicode))
            with conn.transaction():  # one transaction, two rows, one with a NULL
                conn.execute(INSERT, (b, "R-2", "processing", "pending"))
                conn.execute(INSERT, (c, None, "sent", "pending"))
            with conn.transaction():  # a savepoint rolled back in between
                conn.execute(INSERT, (d, "R-4", "sent", "pending"))
                conn.execute("SAVEPOINT before_e")
                conn.execute(INSERT, (e, "R-5", "sent", "pending"))
                conn.execute("ROLLBACK TO SAVEPOINT before_e")
                conn.execute(INSERT, (f, "R-6", "sent", "pending"))
            with conn.transaction():  # a transaction rolled back whole
                conn.execute(INSERT, (g, "R-7", "sent", "pending"))
                raise psycopg.Rollback()
            conn.execute(
                'UPDATE product_orders SET "externalStatus" = %s WHERE id = %s', ("done", a)
            )
            # Only a column the publication leaves out.
            conn.execute('UPDATE product_orders SET "manualNote" = %s WHERE id = %s', ("n", b))
            conn.execute("INSERT INTO unpublished VALUES (1)")  # another table
            conn.execute("DELETE FROM product_orders WHERE id = %s", (c,))  # not published

            rows = peek(conn)
            messages = [parse_message(data) for _, _, data in rows]
        finally:
            tear_down(conn)

    kinds = Counter(type(message).__name__ for message in messages)
    # One transaction each for A, B+C, D+F, A's update and B's: the rolled
    # back one, the other table's and the delete that is not published make
    # no empty Begin/Commit pair.
    assert kinds == Counter(Begin=5, Commit=5, Relation=1, Insert=5, Update=2), kinds
    for (_, xid, _), message in zip(rows, messages, strict=True):
        if isinstance(message, Begin):
            assert str(message.xid) == xid
    relation = next(m for m in messages if isinstance(m, Relation))
    assert (relation.namespace, relation.name) == ("public", "product_orders")
    assert tuple(column.name for column in relation.columns) == COLUMNS
    assert [column.name for column in relation.columns if column.is_key] == ["id"]

    found = changed_rows(messages, "public", "product_orders")
    assert found == [
        {"id": a, "provider_referans": quoted, "externalStatus": "sent", "status": unicode},
        {"id": b, "provider_referans": "R-2", "externalStatus": "processing", "status": "pending"},
        {"id": c, "provider_referans": None, "externalStatus": "sent", "status": "pending"},
        {"id": d, "provider_referans": "R-4", "externalStatus": "sent", "status": "pending"},
        {"id": f, "provider_referans": "R-6", "externalStatus": "sent", "status": "pending"},
        {"id": a, "provider_referans": quoted, "externalStatus": "done", "status": unicode},
        # The update of an unpublished column is sent all the same, unchanged values and all.
        {"id": b, "provider_referans": "R-2", "externalStatus": "processing", "status": "pending"},
    ]
    updates = [m for m in messages if isinstance(m, Update)]
    # The key did not change: no old tuple under the default replica identity.
    assert [(u.old, u.old_kind) for u in updates] == [(None, None), (None, None)]
    commits = [m for m in messages if isinstance(m, Commit)]
    assert all(m.flags == 0 for m in commits)


#: 10,000 dispatched orders, as one transaction and as a transaction each (as
#: an application dispatching one order at a time writes them).
TEN_THOUSAND = {
    "one transaction": (
        'INSERT INTO product_orders (id, "provider_referans", "externalStatus", status)'
        " SELECT gen_random_uuid(), 'R-' || i, 'sent', 'pending'"
        " FROM generate_series(1, 10000) AS i"
    ),
    "a transaction each": (
        "DO $$ BEGIN FOR i IN 1..10000 LOOP"
        ' INSERT INTO product_orders (id, "provider_referans", "externalStatus", status)'
        " VALUES (gen_random_uuid(), 'R-' || i, 'sent', 'pending'); COMMIT;"
        " END LOOP; END $$"
    ),
}


@pytest.mark.parametrize("shape", list(TEN_THOUSAND))
def test_peek_and_parse_of_ten_thousand_rows(orders_db: str, shape: str) -> None:
    """How long the daemon would spend reading 10,000 dispatched orders: printed, not asserted."""
    with psycopg.connect(orders_db, autocommit=True) as conn:
        set_up(conn)
        try:
            conn.execute(TEN_THOUSAND[shape])
            started = time.perf_counter()
            rows = peek(conn)
            peeked = time.perf_counter()
            messages: list[Message] = [parse_message(data) for _, _, data in rows]
            found = changed_rows(messages, "public", "product_orders")
            parsed = time.perf_counter()
        finally:
            tear_down(conn)
    assert len(found) == 10_000
    print(
        f"\npgoutput, 10,000 inserted rows in {shape} ({len(rows)} messages,"
        f" {sum(len(data) for _, _, data in rows)} bytes): peek {peeked - started:.3f} s,"
        f" parse {parsed - peeked:.3f} s, together {parsed - started:.3f} s"
    )
