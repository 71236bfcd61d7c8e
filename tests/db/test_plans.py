"""Every statement of ours is planned for the table as it is when it runs.

psycopg prepares a statement it has run five times, and the server then
keeps a generic plan when that costs no more than the custom ones. Planned
on a small table, the generic plan of the confirm is a sequential scan, and
it stayed one as the table grew: every batch of ids read the whole table.
"""

from __future__ import annotations

import json
import uuid

import psycopg
from psycopg import sql

from order_monitor.config import Layout
from order_monitor.db import Queries
from order_monitor.db.connections import connect
from tests.conftest import as_daemon

IN_FLIGHT = """INSERT INTO product_orders ("providerId", "externalStatus", "sentAt", provider_referans)
               SELECT 'fake', 'sent', now(), 'ref-' || g FROM generate_series(1, %s) AS g
               RETURNING id"""


def dispatch(db: str, orders: int) -> list[uuid.UUID]:
    with psycopg.connect(db, autocommit=True) as conn:
        return [row[0] for row in conn.execute(IN_FLIGHT, (orders,)).fetchall()]


async def test_a_statement_first_run_on_a_small_table_uses_the_index_once_it_has_grown(
    db: str,
) -> None:
    few = dispatch(db, 10)
    queries = Queries(Layout())
    conn = await connect(as_daemon(db), "test")
    try:
        # psycopg prepares on the sixth run; the server plans the first five
        # runs of a prepared statement for their values, then may keep a generic plan.
        for _ in range(12):
            assert len(await queries.confirm(conn, few[:5])) == 5
        many = dispatch(db, 20_000)
        assert len(await queries.confirm(conn, many[-5:])) == 5

        cursor = await conn.execute(
            "SELECT name, generic_plans, custom_plans FROM pg_catalog.pg_prepared_statements"
            " WHERE statement LIKE '%= ANY(%'"
        )
        (name, generic, custom) = (await cursor.fetchone()) or (None, None, None)
        assert name is not None, "psycopg did not prepare the confirm: the test proves nothing"
        assert generic == 0
        assert custom == 8  # every run since it was prepared
        explained = await conn.execute(
            sql.SQL("EXPLAIN (FORMAT JSON) EXECUTE {}({})").format(
                sql.Identifier(name), sql.Literal(many[-5:])
            )
        )
        (plan,) = (await explained.fetchone()) or ("[]",)
        text = plan if isinstance(plan, str) else json.dumps(plan)
        assert '"Node Type": "Seq Scan"' not in text
        assert "Index Scan" in text
    finally:
        await conn.close()
