"""lag: how late due checks are taken off the schedule at a share of capacity."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
from common import (
    PROVIDER_ID,
    cpu_meter,
    daemon_settings,
    percentile,
    running,
)

from order_monitor.engine.policy import BackoffPolicy
from order_monitor.metrics import counter_total
from scenarios.context import Context, RecordingScheduler


async def scenario_lag(ctx: Context, n: int, load: float, capacity: float) -> dict[str, Any]:
    """How late due checks are taken off the schedule, at a fixed share of capacity.

    n orders pending for ever, their dispatch times spread evenly over one
    gap, so their checks fall due evenly at n / gap per second = load x
    capacity. The start sweep schedules them; the first gap is warm-up, the
    next four are measured.
    """
    gap = n / (load * capacity)
    policy = BackoffPolicy(
        initial_delay=gap, base=gap, cap=gap, jitter=0.1, max_attempts=20, max_age=86400.0
    )
    dsn = ctx.server.fresh(f"lag{n}")
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
        conn.transaction(),
    ):
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            """INSERT INTO product_orders
                       (provider_referans, "providerId", "externalStatus", "sentAt")
                   SELECT 'w.lag.' || g, %s, 'sent', now() - random() * make_interval(secs => %s)
                   FROM generate_series(1, %s) g""",
            (PROVIDER_ID, gap, n),
        )
    await ctx.fake.reset()
    scheduler = RecordingScheduler()
    gauge: list[float] = []
    async with running(daemon_settings(dsn, ctx.fake.url, policy), scheduler) as daemon:
        await asyncio.sleep(gap)
        checks_before = counter_total(daemon.metrics.checks)
        scheduler.recording = True
        started = time.monotonic()
        with cpu_meter(ctx.fake) as cpu:
            while time.monotonic() - started < 4 * gap:
                gauge.append(scheduler.lag(time.monotonic()))
                await asyncio.sleep(0.05)
        window = time.monotonic() - started
        scheduler.recording = False
        checks = counter_total(daemon.metrics.checks) - checks_before
    lags_ms = [lag * 1000 for lag in scheduler.lags]
    return {
        "orders": n,
        "load": load,
        "gap_s": gap,
        "offered_checks_per_s": n / gap,
        "achieved_checks_per_s": checks / window,
        "checks_measured": len(lags_ms),
        "p50_ms": percentile(lags_ms, 0.5),
        "p99_ms": percentile(lags_ms, 0.99),
        "max_ms": max(lags_ms) if lags_ms else float("nan"),
        "queue_lag_gauge_p99_ms": percentile(gauge, 0.99) * 1000,
        **cpu,
    }
