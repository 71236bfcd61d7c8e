"""While the engine runs: a database round trip, the queue metric, STATUS= and the watchdog."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import psycopg

from order_monitor.db import ManagedConnection
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics
from order_monitor.ops.sdnotify import Notifier

log = get_logger()

#: The share of the notification queue in use at which to say so (here and in
#: doctor): when it is full, the application's COMMITs that NOTIFY fail.
QUEUE_WARN: Final = 0.5


async def housekeeping(
    reader: ManagedConnection,
    *,
    metrics: Metrics,
    notifier: Notifier,
    status: Callable[[], str],
    interval: float,
    database_seen: Callable[[], None],
) -> None:
    """Every *interval* seconds, forever; returns only by cancellation.

    WATCHDOG=1 is sent when this loop completes an iteration: a frozen event
    loop, or this coroutine hanging, stops it and systemd restarts us. (A
    hung checker shows in the queue-lag metric, a stuck writer in the
    unwritten-result age, not here.) The database query is bounded by a
    timeout, so a database outage, which the engine rides out by itself,
    does not stop the pings.
    """
    while True:
        try:
            async with asyncio.timeout(interval):
                cursor = await (await reader.get()).execute(
                    "SELECT pg_catalog.pg_notification_queue_usage()"
                )
                row = await cursor.fetchone()
            if row is not None:
                metrics.notification_queue.set(float(row[0]))
                database_seen()
                if row[0] > QUEUE_WARN:
                    log.warning(
                        "database.notification_queue_filling",
                        usage=round(float(row[0]), 3),
                        note="when full, the application's COMMITs that NOTIFY fail",
                    )
        except TimeoutError:
            # Slow, or queued behind a sweep page on the shared connection:
            # not a reason to cut that connection under the others.
            log.warning("database.slow", waited_s=interval)
        except (psycopg.Error, OSError) as exc:
            await reader.reset()
            log.warning("database.unreachable", error=str(exc).strip() or type(exc).__name__)
        notifier.status(status())
        notifier.watchdog()
        await asyncio.sleep(interval)
