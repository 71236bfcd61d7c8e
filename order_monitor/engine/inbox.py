"""Notified order ids, confirmed in flight before they are scheduled.

Anyone who may connect may NOTIFY on our channel, and a NOTIFY carries no
proof that the order exists. Scheduling every notified id at once let one
statement of 300,000 random uuids put 300,000 phantom orders in memory. So
a notification only lands in a bounded inbox; a confirmer reads the ids
back in batches (one indexed query per batch) and schedules only the rows
that are really in flight, where the policy says they stand. When the inbox
is full, further ids are dropped and a sweep is asked for: the sweep is the
safety net that finds every real order, so memory stays bounded by the
real orders in flight and nothing real is lost.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import psycopg

from order_monitor.db import ManagedConnection, Queries, SweepRow
from order_monitor.engine.anchors import DispatchAnchors
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.engine.sweep import GroupFor, no_groups, schedule_row
from order_monitor.engine.unreadable import UnreadableRows
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics

log = get_logger()


class Inbox:
    """A bounded, ordered set of notified order ids (pure: no I/O, no clock)."""

    __slots__ = ("_ids", "added", "capacity", "dropped", "high_water")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: dict[int, None] = {}
        #: Ids refused since the last :meth:`take_dropped`.
        self.dropped = 0
        #: The most ids ever held at once.
        self.high_water = 0
        #: Ids ever added (not counting one already held): the inbox is FIFO,
        #: so the first *n* added are out of it once *n* have been taken.
        self.added = 0

    def add(self, order: int, *, bounded: bool = True) -> bool:
        """Keep *order* for confirmation; False when the inbox is full and it was dropped.

        Not *bounded*: ids read from the table (the busy reads, the slot), which
        are orders in flight, as many as the schedule will hold anyway. The
        capacity is for notifications, which anyone may send.
        """
        if order in self._ids:
            return True
        if bounded and len(self._ids) >= self.capacity:
            self.dropped += 1
            return False
        self._ids[order] = None
        self.added += 1
        self.high_water = max(self.high_water, len(self._ids))
        return True

    def take(self, limit: int) -> list[int]:
        """Up to *limit* ids, oldest first, removed from the inbox."""
        taken: list[int] = []
        for order in self._ids:
            if len(taken) == limit:
                break
            taken.append(order)
        for order in taken:
            del self._ids[order]
        return taken

    def take_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped

    def __len__(self) -> int:
        return len(self._ids)


class Confirmer:
    """Drains the inbox: confirms ids in flight, schedules them, drops the rest."""

    def __init__(
        self,
        inbox: Inbox,
        conn: ManagedConnection,
        queries: Queries,
        scheduler: Scheduler,
        *,
        policy: BackoffPolicy,
        batch_size: int,
        metrics: Metrics,
        clock: Callable[[], float],
        on_scheduled: Callable[[], None],
        on_lost: Callable[[], None],
        group_for: GroupFor = no_groups,
        anchors: DispatchAnchors | None = None,
    ) -> None:
        self.inbox = inbox
        #: Ages for orders whose dispatch time is unusable (shared with the
        #: sweep and the checker); None: they read as dispatched just now.
        self._anchors = anchors
        # A row that fails the confirm is skipped, not its whole batch; the
        # sweep meets it again, so once per order per sweep interval is enough.
        self._unreadable = UnreadableRows(
            "listener.row_unreadable", where="confirm", metrics=metrics, clock=clock, interval=300.0
        )
        self._group_for = group_for
        self._conn = conn
        self._queries = queries
        self._scheduler = scheduler
        #: Read at each batch: a reload may change it.
        self.policy = policy
        self._batch_size = batch_size
        self._metrics = metrics
        self._clock = clock
        self._on_scheduled = on_scheduled
        #: Called when notified ids were dropped or could not be confirmed:
        #: a sweep finds whichever of them are real.
        self._on_lost = on_lost
        self._wake = asyncio.Event()
        #: Ids taken out of the inbox and through the confirm (see settled).
        self._settled = 0

    def notified(self, order: uuid.UUID) -> None:
        self.inbox.add(order.int)
        self._wake.set()

    def taken(self, orders: list[uuid.UUID]) -> int:
        """Ids the handoff took from the inbox table: confirmed like notified ones.

        None is dropped: they were read from the table, not notified (see
        :meth:`Inbox.add`). Returns a ticket: :meth:`settled` says when every one of them (and
        every id handed in before) has been confirmed and scheduled, or
        dropped as not in flight, or left to a sweep.
        """
        for order in orders:
            self.inbox.add(order.int, bounded=False)
        self._wake.set()
        return self.inbox.added

    def room(self) -> int:
        return max(0, self.inbox.capacity - len(self.inbox))

    def settled(self, ticket: int) -> bool:
        """Whether the ids of :meth:`taken`'s *ticket* are all through (see there)."""
        return self._settled >= ticket

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self.inbox):
                ids = self.inbox.take(self._batch_size)
                try:
                    await self._confirm(ids)
                except Exception:
                    # A bug, not database trouble (handled in _confirm): say so
                    # loudly and let the sweep find these orders, rather than
                    # take the whole daemon down at every notification.
                    self._lost_to_a_bug("listener.confirm_unexpected_error", len(ids))
            dropped = self.inbox.take_dropped()
            if dropped:
                self._metrics.notifications.labels("dropped").inc(dropped)
                log.warning(
                    "listener.inbox_full",
                    dropped=dropped,
                    capacity=self.inbox.capacity,
                    note="more notifications than the inbox holds (a flood, or someone "
                    "NOTIFYing junk); a sweep now finds every real order among them",
                )
                self._on_lost()

    async def _confirm(self, ids: list[int]) -> None:
        try:
            await self._confirm_batch(ids)
        finally:
            # Taken oldest first: the first _settled ids ever added are through.
            self._settled += len(ids)

    async def _confirm_batch(self, ids: list[int]) -> None:
        try:
            rows = await self._queries.confirm(
                await self._conn.get(),
                [uuid.UUID(int=i) for i in ids],
                unreadable=self._unreadable,
            )
        except psycopg.Error as exc:
            await self._conn.reset()
            log.error(
                "listener.confirm_failed",
                orders=len(ids),
                error=str(exc).strip() or type(exc).__name__,
                note="a sweep finds these orders instead",
            )
            self._on_lost()
            return
        if len(rows) < len(ids):
            # Not an order in flight (finished already, or never one): not ours.
            self._metrics.notifications.labels("not_in_flight").inc(len(ids) - len(rows))
        self._schedule(rows)

    def found(self, rows: list[SweepRow]) -> None:
        """Orders read in flight, with what a confirm reads (a busy read's rows): scheduled.

        Nothing to confirm: they were read from the table, in flight, by the
        same columns a confirm reads (db.changes).
        """
        try:
            self._schedule(rows)
        except Exception:
            # As in run(): a bug here must not take the busy reads down with it.
            self._lost_to_a_bug("handoff.schedule_unexpected_error", len(rows))

    def _lost_to_a_bug(self, event: str, orders: int) -> None:
        """Log the exception being handled; a sweep finds the *orders* it cost."""
        log.exception(event, orders=orders, note="a sweep finds these orders instead")
        self._on_lost()

    def _schedule(self, rows: list[SweepRow]) -> None:
        now = self._clock()
        if self._anchors is not None:
            rows = self._anchors.settle(rows, now)
        woke = False
        for row in rows:
            woke |= schedule_row(self._scheduler, self.policy, row, now, self._group_for)
        if woke:
            self._on_scheduled()
