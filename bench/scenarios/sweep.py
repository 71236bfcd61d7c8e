"""sweep: sweep_once over a large table with a tenth of it in flight."""

from __future__ import annotations

import statistics
import time
from typing import Any

import psycopg
from common import (
    BATCH_SIZE,
    PROVIDER_ID,
    say,
)

from order_monitor import schema
from order_monitor.config import Layout
from order_monitor.db import ManagedConnection, Queries
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.engine.sweep import sweep_once
from scenarios.context import Context


async def scenario_sweep(ctx: Context, rows: int, pending: int, runs: int = 3) -> dict[str, Any]:
    """sweep_once over a big table: pages of the daemon's batch size on the partial index."""
    dsn = ctx.server.fresh("sweep")
    every = rows // pending
    say(f"sweep: loading {rows:,} rows ({pending:,} in flight)")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            # Finished orders carry what the daemon writes; in-flight ones are
            # spread over the last day, some already checked.
            await conn.execute(
                """INSERT INTO product_orders
                       (provider_referans, "providerId", "externalStatus", "sentAt", "createdAt",
                        "lastSyncAt", "completedAt", "pinCode", "lastMessage", price,
                        "userIdentifier")
                   SELECT 'w.s.' || g, %(provider)s,
                          CASE WHEN g %% %(every)s = 0 THEN 'sent' ELSE 'done' END,
                          now() - (g %% 86400) * interval '1 second',
                          now() - (g %% 86400) * interval '1 second' - interval '2 seconds',
                          CASE WHEN g %% 3 = 0
                               THEN now() - (g %% 86400) * interval '1 second' + interval '60 s'
                          END,
                          CASE WHEN g %% %(every)s <> 0 THEN now() END,
                          CASE WHEN g %% %(every)s <> 0 THEN 'PIN-' || g END,
                          'İşlem tamamlandı', 9.99, '05' || lpad(g::text, 9, '0')
                   FROM generate_series(1, %(rows)s) g""",
                {"provider": PROVIDER_ID, "every": every, "rows": rows},
            )
        await conn.execute("VACUUM ANALYZE product_orders")
        cursor = await conn.execute(
            "SELECT pg_size_pretty(pg_total_relation_size('product_orders')),"
            " pg_size_pretty(pg_relation_size(%s::regclass))",
            (schema.Names(Layout()).index_name,),
        )
        sizes = await cursor.fetchone()
        assert sizes is not None
    queries = Queries(Layout())
    durations: list[float] = []
    found = scheduled = 0
    connection = ManagedConnection(dsn, "sweep")
    try:
        await connection.get()
        for _ in range(runs):
            scheduler = Scheduler()
            result = await sweep_once(
                connection, queries, scheduler, BackoffPolicy(), time.monotonic, BATCH_SIZE
            )
            durations.append(result.seconds)
            found, scheduled = result.found, result.scheduled
    finally:
        await connection.close()
    return {
        "rows": rows,
        "in_flight": pending,
        "page_size": BATCH_SIZE,
        "table_size": sizes[0],
        "index_size": sizes[1],
        "found": found,
        "scheduled": scheduled,
        "seconds": durations,
        "seconds_median": statistics.median(durations),
        "seconds_first": durations[0],
    }
