"""The safety net: a periodic keyset scan of every order in flight.

Runs every sweep_interval, after each listener (re)connect and after a
reload. Pages by id on the partial index, so each page is an index range
scan however large the table. Orders already in the schedule keep their
place; missing ones are scheduled where the policy says they stand, from
their dispatch and last-sync times, so a restarted daemon resumes the
backoff instead of starting it over.

A page that fails on one row's values is narrowed down to that row
(Queries.sweep_page_narrowed): the row is skipped and warned about by id
(``sweep.row_unreadable``), every other order is still found. An order whose
dispatch time is unusable gets its age from engine.anchors.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from order_monitor.db import ManagedConnection, Queries, SweepRow
from order_monitor.db.queries import Unreadable
from order_monitor.engine.anchors import DispatchAnchors
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.engine.unreadable import UnreadableRows
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics

log = get_logger()


@dataclass(frozen=True, slots=True)
class SweepResult:
    found: int
    scheduled: int
    seconds: float


#: Which providers' orders may be pulled forward into a shared request: the
#: provider id for a batched provider, else None (Checker.group_for).
GroupFor = Callable[[str | None], str | None]


def no_groups(provider_id: str | None) -> str | None:
    return None


def schedule_row(
    scheduler: Scheduler, policy: BackoffPolicy, row: SweepRow, now: float, group_for: GroupFor
) -> bool:
    """Offer an order found in the table at its next slot; True if the head moved earlier."""
    key = row.id.int
    slot = policy.next_slot(key, row.last_checked)
    if slot is None:
        # No slot left means a give-up that was never written (the daemon
        # died first): check once more now, and the checker gives up properly.
        return scheduler.offer(key, now, reference=row.reference)
    return scheduler.offer(
        key,
        now + max(0.0, slot.offset - row.elapsed),
        group=group_for(row.provider_id),
        opens=now + max(0.0, slot.pull_from - row.elapsed),
        reference=row.reference,
    )


async def sweep_once(
    conn: ManagedConnection,
    queries: Queries,
    scheduler: Scheduler,
    policy: BackoffPolicy,
    clock: Callable[[], float],
    page_size: int,
    group_for: GroupFor = no_groups,
    *,
    anchors: DispatchAnchors | None = None,
    unreadable: Unreadable | None = None,
) -> SweepResult:
    """One full sweep; without *unreadable* a failing page fails it, as without *anchors*
    an order with an unusable dispatch time reads as dispatched just now."""
    started = time.perf_counter()
    found = scheduled = 0
    anchored: set[int] = set()
    after = None
    while True:
        if unreadable is None:
            rows = await queries.sweep_page(await conn.get(), after, page_size)
            after = rows[-1].id if len(rows) == page_size else None
        else:
            rows, after = await queries.sweep_page_narrowed(
                await conn.get(), after, page_size, unreadable
            )
        now = clock()
        if anchors is not None:
            rows = anchors.settle(rows, now)
            if anchors:
                anchored.update(row.id.int for row in rows if row.id.int in anchors)
        for row in rows:
            if row.id.int not in scheduler:
                schedule_row(scheduler, policy, row, now, group_for)
                scheduled += 1
        found += len(rows)
        if after is None:
            break
        # Let notifications and checks run between pages of a big sweep.
        await asyncio.sleep(0)
    if anchors is not None:
        # A complete sweep saw every order in flight: an anchor it did not
        # meet, and that the schedule does not hold, belongs to an order gone.
        anchors.retain(lambda key: key in anchored or key in scheduler)
    return SweepResult(found, scheduled, time.perf_counter() - started)


class Sweeper:
    def __init__(
        self,
        conn: ManagedConnection,
        queries: Queries,
        scheduler: Scheduler,
        *,
        policy: BackoffPolicy,
        interval: float,
        page_size: int,
        metrics: Metrics,
        clock: Callable[[], float],
        on_scheduled: Callable[[], None],
        group_for: GroupFor = no_groups,
        anchors: DispatchAnchors,
    ) -> None:
        self._anchors = anchors
        # Once per order per interval: a bad row is met again at every sweep.
        self._unreadable = UnreadableRows(
            "sweep.row_unreadable", where="sweep", metrics=metrics, clock=clock, interval=interval
        )
        self._conn = conn
        self._queries = queries
        self._scheduler = scheduler
        self.policy = policy
        self._group_for = group_for
        self.interval = interval
        self._page_size = page_size
        self._metrics = metrics
        self._clock = clock
        self._on_scheduled = on_scheduled
        self._requested = asyncio.Event()
        self.last_completed: float | None = None  # time.monotonic()
        self.completed = 0

    def request(self) -> None:
        """Ask for a sweep as soon as possible (requests made meanwhile coalesce)."""
        self._requested.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._requested.wait(), self.interval)
            self._requested.clear()
            await self.sweep()

    async def sweep(self) -> SweepResult | None:
        try:
            result = await sweep_once(
                self._conn,
                self._queries,
                self._scheduler,
                self.policy,
                self._clock,
                self._page_size,
                self._group_for,
                anchors=self._anchors,
                unreadable=self._unreadable,
            )
        except psycopg.Error as exc:
            await self._conn.reset()
            log.error(
                "sweep.failed",
                error=str(exc).strip(),
                retry_in_s=min(self.interval, 10.0),
            )
            # Try again soon rather than a whole interval later.
            asyncio.get_running_loop().call_later(min(self.interval, 10.0), self.request)
            return None
        except Exception:
            # A bug or a row we cannot make sense of: the sweep is the safety
            # net, so it must not take the daemon down (and, at every restart,
            # down again). Say so loudly and try again at the next interval.
            log.exception("sweep.unexpected_error", retry_in_s=self.interval)
            return None
        self.completed += 1
        self.last_completed = time.monotonic()
        self._metrics.sweeps.inc()
        self._metrics.sweep_seconds.observe(result.seconds)
        self._metrics.sweep_found.set(result.found)
        log.info(
            "sweep.finished",
            found=result.found,
            scheduled=result.scheduled,
            duration_s=round(result.seconds, 3),
            pending=len(self._scheduler),
        )
        if result.scheduled:
            self._on_scheduled()
        return result
