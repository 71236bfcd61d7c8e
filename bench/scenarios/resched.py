"""resched: orders that answer pending twice, on a gap that keeps the daemon saturated."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from common import (
    cpu_meter,
    daemon_settings,
    insert_dispatched,
    percentile,
    running,
    wait_finished,
)

from order_monitor.engine.policy import BackoffPolicy
from order_monitor.metrics import counter_total
from scenarios.context import Context, RecordingScheduler


async def scenario_resched(ctx: Context, n: int, capacity_hint: float) -> dict[str, Any]:
    """Pending checks/s: every order answers "pending" twice, then done.

    A constant gap of n / (2 x capacity_hint) makes the due checks come at
    about twice what the daemon can do, so it is saturated throughout;
    twenty slots span ten times the time one round takes, so no order runs
    out of slots (the figure reports any that did).
    """
    pending_polls = 2
    gap = max(0.01, n / (2 * capacity_hint))
    policy = BackoffPolicy(
        initial_delay=0.0, base=gap, cap=gap, jitter=0.1, max_attempts=20, max_age=86400.0
    )
    dsn = ctx.server.fresh(f"resched{n}")
    prefix = f"d{pending_polls}.r{n}"
    await ctx.fake.reset()
    scheduler = RecordingScheduler()
    samples: list[tuple[float, float]] = []
    async with running(daemon_settings(dsn, ctx.fake.url, policy), scheduler) as daemon:

        async def sample() -> None:
            while True:
                samples.append(
                    (time.monotonic(), counter_total(daemon.metrics.checks, outcome="pending"))
                )
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        scheduler.recording = True
        with cpu_meter(ctx.fake) as cpu:
            await insert_dispatched(dsn, prefix, n)
            await wait_finished(daemon, n, within=max(300.0, n / 50))
        sampler.cancel()
        gave_up = counter_total(daemon.metrics.finished, outcome="gave_up")
        errors = counter_total(daemon.metrics.checks, outcome="error")
    total = pending_polls * n
    # The steady part: from 10 % to 90 % of the pending checks.
    start = next(s for s in samples if s[1] >= 0.1 * total)
    end = next((s for s in samples if s[1] >= 0.9 * total), samples[-1])
    rate = (end[1] - start[1]) / (end[0] - start[0])
    return {
        "orders": n,
        "pending_checks": total,
        "gap_s": gap,
        "pending_checks_per_s": rate,
        "gave_up": gave_up,
        "transport_errors": errors,
        "saturated_lag_p50_ms": percentile(scheduler.lags, 0.5) * 1000,
        "saturated_lag_p99_ms": percentile(scheduler.lags, 0.99) * 1000,
        **cpu,
    }
