"""Taking due orders off the schedule and asking their providers.

The dispatcher pops due orders in batches, re-reads them in one query (an
order finished meanwhile by the application or an operator is dropped
before any provider is asked), groups them by provider and hands each group
to that provider's LimitedProvider. Groups run as separate tasks, so a slow
provider holds up only its own orders; a per-provider cap on orders under way
keeps one stuck provider from filling the global in-flight budget.

A re-read that fails on one row's values is narrowed down to that row: it is
skipped and warned about by id (``checker.row_unreadable``), the rest of the
batch is checked. Orders with an unusable dispatch time get their age from
engine.anchors before any decision is made, so decisions need not know.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from order_monitor.config import OutcomeWrites
from order_monitor.db import ColumnLimits, InFlightRow, ManagedConnection, Queries
from order_monitor.engine.anchors import DispatchAnchors
from order_monitor.engine.decisions import decide
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.engine.unreadable import UnreadableRows
from order_monitor.engine.writer import Writer
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics
from order_monitor.providers.base import OrderRef, Outcome, Provider

log = get_logger()

# An order whose provider already has its share of orders under way waits
# for room: it is offered again the moment that provider's checks finish,
# and at the latest after this long (a fallback, should no check finish).
DEFER_BUSY = 5.0
RETRY_AFTER_READ_FAILURE = 5.0
RETRY_AFTER_BUG = 60.0
#: An unreadable row is warned about at most once this often (it is met again
#: at each sweep, every sweep_interval by default).
UNREADABLE_WARN_EVERY = 300.0


@dataclass(frozen=True, slots=True)
class CheckerLimits:
    batch_size: int
    #: Orders under way at once (popped, not yet written), all providers.
    max_in_flight: int
    #: Orders under way at once for one provider.
    max_in_flight_per_provider: int


def spare_in_request(orders: int, batch_size: int, room: int) -> int:
    """How many more orders the requests for *orders* can carry at no extra request.

    The last of the ``ceil(orders / batch_size)`` requests has room for the
    rest of a batch, within *room* (what the in-flight limits still allow).
    """
    return max(0, min(-orders % batch_size, room))


class Checker:
    def __init__(
        self,
        *,
        conn: ManagedConnection,
        queries: Queries,
        providers: Callable[[str | None], Provider | None],
        scheduler: Scheduler,
        writer: Writer,
        policy: BackoffPolicy,
        writes: OutcomeWrites,
        columns: ColumnLimits,
        limits: CheckerLimits,
        metrics: Metrics,
        clock: Callable[[], float],
        anchors: DispatchAnchors,
    ) -> None:
        self._conn = conn
        self._queries = queries
        self._anchors = anchors
        self._unreadable = UnreadableRows(
            "checker.row_unreadable",
            where="reread",
            metrics=metrics,
            clock=clock,
            interval=UNREADABLE_WARN_EVERY,
        )
        self._providers = providers
        self._scheduler = scheduler
        self._writer = writer
        self.policy = policy
        self._writes = writes
        self._columns = columns
        self._limits = limits
        self._metrics = metrics
        self._clock = clock
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_provider: Counter[str] = Counter()
        #: Orders put back because their provider was at its cap, by provider
        #: (a dict as an ordered set: an order deferred twice waits once).
        self._waiting_for_room: defaultdict[str, dict[int, None]] = defaultdict(dict)
        self._unconfigured_warned: set[str] = set()
        self._stopping = False

    def group_for(self, provider_id: str | None) -> str | None:
        """The pull-forward group of *provider_id*'s orders: itself if its requests batch."""
        provider = self._providers(provider_id)
        return provider_id if provider is not None and provider.batch_size > 1 else None

    def _under_way(self) -> int:
        """Orders that count against the in-flight budget.

        Those being checked, not those whose results merely wait for the
        database: the scheduler holds them as in flight, so no second check
        starts, but they cost no request.
        """
        return self._scheduler.in_flight - self._writer.held

    def wake(self) -> None:
        """Something became due earlier than the dispatcher is waiting for."""
        self._wake.set()

    def reconfigure(
        self, providers: Callable[[str | None], Provider | None], policy: BackoffPolicy
    ) -> None:
        """Use new providers and policy from the next batch on (SIGHUP)."""
        self._providers = providers
        self.policy = policy
        self._unconfigured_warned.clear()

    async def run(self) -> None:
        """Dispatch until :meth:`stop`; returns once nothing new will start."""
        while not self._stopping:
            room = self._limits.max_in_flight - self._under_way()
            ids = self._scheduler.pop_due(self._clock(), min(self._limits.batch_size, room))
            if ids:
                task = asyncio.create_task(self._check_batch(ids))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                continue
            self._wake.clear()
            next_due = self._scheduler.next_due()
            # Never sleep long: a full in-flight budget frees up without a wake.
            timeout = 1.0 if next_due is None or room <= 0 else next_due - self._clock()
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(timeout, 1.0))

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def drain(self, grace: float) -> int:
        """Wait up to *grace* seconds for checks under way, then cancel the rest.

        Returns how many batches were cancelled.
        """
        pending = set(self._tasks)
        if not pending:
            return 0
        _, still = await asyncio.wait(pending, timeout=grace)
        for task in still:
            task.cancel()
        if still:
            await asyncio.gather(*still, return_exceptions=True)
        return len(still)

    @property
    def under_way(self) -> int:
        return len(self._tasks)

    async def _check_batch(self, ids: list[int]) -> None:
        try:
            await self._check_batch_inner(ids)
        except Exception:
            # A bug, not provider or database trouble (those are handled
            # below): say so loudly, and give the orders back to the schedule
            # so none is stranded as "being checked" for ever.
            log.exception("checker.unexpected_error", orders=len(ids))
            retry_at = self._clock() + RETRY_AFTER_BUG
            for order in ids:
                if order in self._scheduler and self._scheduler.due_in(order) is None:
                    self._scheduler.complete(order, retry_at)

    async def _check_batch_inner(self, ids: list[int]) -> None:
        uuids = [uuid.UUID(int=i) for i in ids]
        try:
            conn = await self._conn.get()
            rows = await self._queries.fetch_in_flight(conn, uuids, unreadable=self._unreadable)
        except psycopg.Error as exc:
            await self._conn.reset()
            log.error(
                "checker.reread_failed",
                orders=len(ids),
                error=str(exc).strip(),
                retry_in_s=RETRY_AFTER_READ_FAILURE,
            )
            retry_at = self._clock() + RETRY_AFTER_READ_FAILURE
            for order in ids:
                self._scheduler.complete(order, retry_at)
            return
        read_at = self._clock()
        rows = self._anchors.settle(rows, read_at)
        found = {row.id.int for row in rows}
        for order in ids:
            if order not in found:
                # Finished by someone else, or no longer dispatched: not ours.
                # (Or a row that cannot be read: the sweep finds it again.)
                self._scheduler.forget(order)
                self._anchors.drop((order,))
                log.debug("order.left_flight", order_id=str(uuid.UUID(int=order)))

        groups: dict[str | None, list[InFlightRow]] = defaultdict(list)
        for row in rows:
            groups[row.provider_id].append(row)
        async with asyncio.TaskGroup() as tg:
            for provider_id, group in groups.items():
                tg.create_task(self._check_group(provider_id, group, read_at))

    async def _check_group(
        self, provider_id: str | None, rows: list[InFlightRow], read_at: float
    ) -> None:
        provider = self._providers(provider_id)
        if provider is None:
            self._unconfigured(provider_id, rows)
            return
        name = provider.name
        room = self._limits.max_in_flight_per_provider - self._per_provider[name]
        if room < len(rows):
            busy, rows = rows[max(room, 0) :], rows[: max(room, 0)]
            retry_at = self._clock() + DEFER_BUSY
            for row in busy:
                self._scheduler.complete(row.id.int, retry_at)
                self._waiting_for_room[name][row.id.int] = None
            if not rows:
                return
        still_waiting = self._waiting_for_room.get(name)
        if still_waiting:
            # Going ahead now: no longer waiting for room.
            for row in rows:
                still_waiting.pop(row.id.int, None)
        reads = [(rows, read_at)]
        group = self.group_for(provider_id)
        spare = spare_in_request(
            len(rows),
            provider.batch_size,
            min(room - len(rows), self._limits.max_in_flight - self._under_way()),
        )
        if group is not None and spare:
            pulled = await self._pull_forward(group, spare)
            if pulled is not None:
                reads.append(pulled)
        checked = [row for group_rows, _ in reads for row in group_rows]
        self._per_provider[name] += len(checked)
        try:
            outcomes = await provider.check(
                [OrderRef(r.id, r.reference, r.external_order_id) for r in checked]
            )
        finally:
            self._per_provider[name] -= len(checked)
            self._make_room(name, len(checked))
        now = self._clock()
        for group_rows, at in reads:
            for row in group_rows:
                outcome = outcomes.get(row.id) or Outcome.unknown()
                self._writer.submit(
                    decide(
                        row,
                        name,
                        outcome,
                        elapsed=row.elapsed + (now - at),
                        policy=self.policy,
                        writes=self._writes,
                        limits=self._columns,
                        group=group,
                    )
                )

    async def _pull_forward(
        self, provider_id: str, spare: int
    ) -> tuple[list[InFlightRow], float] | None:
        """Orders of *provider_id* whose slot is near, to fill a request that goes out anyway.

        Re-read like every order before its check: one that left flight, or
        moved to another provider, is not asked about here.
        """
        pulled = self._scheduler.pull_open(provider_id, self._clock(), spare)
        if not pulled:
            return None
        ids = [order for order, _ in pulled]
        try:
            rows = await self._queries.fetch_in_flight(
                await self._conn.get(),
                [uuid.UUID(int=i) for i in ids],
                unreadable=self._unreadable,
            )
        except psycopg.Error as exc:
            # Not worth a failed batch: they were not due yet, so they go
            # back to their slots untouched.
            await self._conn.reset()
            log.warning(
                "checker.pull_forward_failed",
                orders=len(ids),
                error=str(exc).strip(),
                note="each is checked at its own slot instead",
            )
            for order, due in pulled:
                self._scheduler.complete(order, due)
            return None
        read_at = self._clock()
        rows = self._anchors.settle(rows, read_at)
        same = [row for row in rows if row.provider_id == provider_id]
        kept = {row.id.int for row in same}
        moved = {row.id.int for row in rows} - kept
        for order in ids:
            if order in moved:
                self._scheduler.complete(order, read_at)  # its new provider, at once
            elif order not in kept:
                self._scheduler.forget(order)
        self._metrics.pulled_forward.labels(provider_id).inc(len(same))
        return same, read_at

    def _make_room(self, name: str, freed: int) -> None:
        """Bring forward as many orders waiting for *name* as its finished checks freed."""
        waiting = self._waiting_for_room.get(name)
        if not waiting:
            return
        now = self._clock()
        for order in list(itertools.islice(waiting, freed)):
            del waiting[order]
            # Only an order still waiting on the schedule: one being checked,
            # or finished, must not be pulled forward (a second poll).
            if self._scheduler.due_in(order) is not None:
                self._scheduler.offer(order, now)
        self.wake()

    def _unconfigured(self, provider_id: str | None, rows: list[InFlightRow]) -> None:
        """Orders whose provider is not in the providers file.

        Logged once per provider id (not once per order or check) and not
        checked. Every sweep finds them again (one re-read each, counted in
        the metric), so the first sweep after a reload that names the
        provider picks them up.
        """
        key = provider_id if provider_id is not None else "<none>"
        self._metrics.unconfigured.inc(len(rows))
        if key not in self._unconfigured_warned:
            self._unconfigured_warned.add(key)
            log.warning(
                "provider.not_configured",
                provider_id=key,
                orders=len(rows),
                example_order_id=str(rows[0].id),
                hint="add an entry whose provider_ids names it to the providers file, "
                "then reload (SIGHUP)",
            )
        for row in rows:
            self._scheduler.complete(row.id.int, None)
