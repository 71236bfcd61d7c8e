"""Applying decisions to the table: batched, guarded, announced.

Decisions queue up while providers answer; the writer takes whatever has
accumulated (up to a batch) and writes it in one statement whose WHERE still
requires the row to be in flight with the same provider reference. A result
that lost a race (an operator finished the order, the application re-sent it
with a new reference) is dropped, never written over the newer truth.

A result the database did not take is not the row's fault and not a reason
to ask the provider again: a row another transaction holds (skipped, the
write function says 'locked') or a statement that failed (the link, a
lock_timeout, the COMMIT) leaves the decision held in ``engine.unwritten``
and written again with a backoff. Only a value the database refuses is
narrowed down to its row and counted against the order's policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from order_monitor import schema
from order_monitor.config import OutcomeWrites
from order_monitor.db import AsyncConn, ColumnLimits, ManagedConnection, Queries, Written
from order_monitor.engine.decisions import Decision, after_refusal, describe_outcome, write_batch
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.engine.unwritten import Held, Reason, Unwritten
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics
from order_monitor.ops.installed import MISSING_ERRORS, InstallHealth

log = get_logger()

#: The writer's lock_timeout: a backstop. Row locks are skipped (the write
#: function's SKIP LOCKED), but a lock on the whole table (an install, an
#: ALTER TABLE, a LOCK TABLE) would otherwise hold the writer, and every
#: result behind it, for as long as it lasts.
LOCK_TIMEOUT = "2s"
#: Skipped announcements are logged at most this often, with their count.
ANNOUNCEMENT_LOG_INTERVAL = 60.0


class _PartlyWritten(Exception):
    """A database failure while writing row by row, after some rows went in."""

    def __init__(self, written: dict[uuid.UUID, Written], refused: dict[uuid.UUID, str]) -> None:
        super().__init__("partly written")
        self.written = written
        self.refused = refused


@dataclass(frozen=True, slots=True)
class _Item:
    decision: Decision
    #: When the decision reached the writer.
    since: float
    #: Set when this is a retry of a held decision.
    held: Held | None = None


class Writer:
    def __init__(
        self,
        conn: ManagedConnection,
        queries: Queries,
        scheduler: Scheduler,
        metrics: Metrics,
        clock: Callable[[], float],
        batch_size: int,
        *,
        policy: BackoffPolicy,
        writes: OutcomeWrites,
        columns: ColumnLimits,
        unwritten: Unwritten | None = None,
        health: InstallHealth | None = None,
    ) -> None:
        self._conn = conn
        self._health = health or InstallHealth()
        #: Read at each refusal: a reload may change it.
        self.policy = policy
        self._writes = writes
        self._columns = columns
        self._queries = queries
        self._scheduler = scheduler
        self._metrics = metrics
        self._clock = clock
        self._batch_size = batch_size
        self._queue: deque[_Item] = deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._unwritten = unwritten or Unwritten()
        #: The connection lock_timeout was set on (a new one needs it again).
        self._configured: AsyncConn | None = None
        #: What run() knows of the batch it hands to flush(): since when each
        #: decision waits, and whether it is a retry.
        self._taken: dict[int, _Item] = {}
        #: While a statement runs: when the oldest decision it carries arrived.
        self._writing_since: float | None = None
        self._unannounced = 0
        self._next_announcement_log = -math.inf
        #: Called after a batch is settled: orders went back on the schedule,
        #: possibly due before whatever the dispatcher is waiting for.
        self.on_rescheduled: Callable[[], None] = lambda: None
        #: Called after a batch wrote a result whose outcome an action delivers
        #: (the write function recorded it in the outbox): the relay looks now.
        self.on_delivery: Callable[[], None] = lambda: None
        #: Called for each result written that finished its order (the operator
        #: page keeps the ones that gave up).
        self.on_finished: Callable[[Decision], None] = lambda decision: None

    def submit(self, decision: Decision) -> None:
        self._queue.append(_Item(decision, self._clock()))
        self._wake.set()

    async def close(self) -> None:
        """Write everything submitted so far, then make :meth:`run` return."""
        self._closing = True
        self._wake.set()

    @property
    def held(self) -> int:
        """Checked orders whose results wait for the database (locked rows, failed writes).

        Their checks are over: the checker does not count them against its
        budget, or an admin's lock over many rows would stop every other check.
        At most one per order, so this is bounded by the orders in flight.
        """
        return len(self._unwritten)

    @property
    def backlog(self) -> int:
        """Decisions not written yet: queued, and held after a write that did not take them."""
        return len(self._queue) + len(self._unwritten)

    def unwritten_age(self) -> float:
        """Seconds since the oldest decision not yet written reached the writer (0: none).

        The queued ones count too: a writer stuck on its statement shows here
        while the schedule's lag stays 0 (its orders are "being checked").
        """
        oldest = [t for t in (self._unwritten.oldest_since(), self._writing_since) if t is not None]
        if self._queue:
            oldest.append(self._queue[0].since)
        return max(0.0, self._clock() - min(oldest)) if oldest else 0.0

    async def run(self) -> None:
        while True:
            now = self._clock()
            self._drop_expired(now)
            items = [
                _Item(h.decision, h.since, h)
                for h in self._unwritten.take_due(now, self._batch_size)
            ]
            while len(items) < self._batch_size and self._queue:
                items.append(self._queue.popleft())
            if items:
                self._taken = {i.decision.row.id.int: i for i in items}
                await self.flush([i.decision for i in items])
                continue
            if self._closing:
                await self._last_try()
                return
            self._wake.clear()
            retry_at = self._unwritten.next_retry_at()
            delay = None if retry_at is None else max(0.0, retry_at - now)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _last_try(self) -> None:
        """At stop, one more try for the held decisions; what still does not go is said."""
        held = self._unwritten.take_all()
        if not held:
            return
        self._taken = {h.decision.row.id.int: _Item(h.decision, h.since, h) for h in held}
        await self.flush([h.decision for h in held])
        left = self._unwritten.take_all()
        if left:
            log.error(
                "writer.unwritten_at_exit",
                orders=len(left),
                finished=sum(h.decision.finished for h in left),
                note="the next daemon asks the provider again where the schedule stands",
            )

    def _drop_expired(self, now: float) -> None:
        """Pending decisions past their order's next slot: the slot's check replaces them."""
        expired = self._unwritten.take_expired(now)
        if expired:
            # One line for all of them: a database outage can expire
            # thousands at once, and a line each would flood the journal.
            log.info(
                "writer.pending_results_dropped",
                orders=len(expired),
                order_ids=[str(h.decision.row.id) for h in expired[:20]],
                reasons=sorted({h.reason for h in expired}),
                note="only lastSyncAt was unwritten; each order is checked at its slot",
            )
        for held in expired:
            decision = held.decision
            assert held.expires_at is not None
            self._scheduler.complete(
                decision.row.id.int,
                held.expires_at,
                group=decision.group,
                checked=decision.row.reference,
            )
        if expired:
            self.on_rescheduled()

    async def flush(self, batch: list[Decision]) -> None:
        """Write *batch* now; what the database does not take is held (see :meth:`run`)."""
        now = self._clock()
        taken, self._taken = self._taken, {}
        items = []
        for decision in batch:
            item = taken.get(decision.row.id.int)
            items.append(
                _Item(decision, now) if item is None else _Item(decision, item.since, item.held)
            )
        self._writing_since = min((i.since for i in items), default=None)
        try:
            await self._flush(items)
        finally:
            self._writing_since = None

    async def _flush(self, items: list[_Item]) -> None:
        to_write = [item.decision for item in items if item.decision.writes]
        refused: dict[uuid.UUID, str] = {}
        try:
            try:
                results = await self._write(to_write) if to_write else {}
            except psycopg.OperationalError:
                raise
            except MISSING_ERRORS as exc:
                # The write function (or our grant on it) is gone: no row is
                # at fault, so nothing is refused; the results wait for a
                # reinstall like any other write the database could not take.
                self._health.missing("write function", database_error(exc))
                raise psycopg.OperationalError(database_error(exc)) from exc
            except Exception:  # narrowed row by row just below
                # The database refused a value (a constraint, a length, another
                # application's trigger), or a value could not even be sent:
                # find the row at fault instead of failing the whole batch.
                results, refused = await self._write_one_by_one(to_write)
        except (psycopg.OperationalError, _PartlyWritten) as exc:
            # The link, the server, a lock_timeout or the COMMIT (a full NOTIFY
            # queue, a disk): what this statement carried was not written, and
            # none of it is the rows' fault. Keep the answers, write them again.
            await self._conn.reset()
            done: set[uuid.UUID] = set()
            if isinstance(exc, _PartlyWritten):
                results, refused = exc.written, exc.refused
                done = set(results) | set(refused)
                cause = exc.__cause__ or exc
            else:
                results, cause = {}, exc
            unsettled = [i for i in items if i.decision.writes and i.decision.row.id not in done]
            self._hold(unsettled, "database", error=database_error(cause))
            self._settle_all([i for i in items if i not in unsettled], results, refused)
            return
        self._settle_all(items, results, refused)

    def _settle_all(
        self,
        items: list[_Item],
        results: dict[uuid.UUID, Written],
        refused: dict[uuid.UUID, str],
    ) -> None:
        now = self._clock()
        finished: Counter[str] = Counter()
        locked: list[_Item] = []
        unannounced = 0
        recorded = False
        for item in items:
            decision = item.decision
            result = results.get(decision.row.id)
            reason = refused.get(decision.row.id)
            if reason is not None:
                self._refused(decision, reason, now)
            elif result is not None and result.outcome == schema.LOCKED:
                locked.append(item)
            else:
                if result is not None and result.outcome in self._writes.deliver:
                    recorded = True
                if result is not None and decision.finished and not result.announced:
                    unannounced += 1
                if self._settle(decision, result, now):
                    finished[decision.kind] += 1
        for kind, count in finished.items():
            self._metrics.finished.labels(kind).inc(count)
        if locked:
            self._hold(locked, "locked")
        if unannounced:
            self._announcements_skipped(unannounced, now)
        if recorded:
            self.on_delivery()
        self.on_rescheduled()

    def _hold(self, items: list[_Item], reason: Reason, *, error: str | None = None) -> None:
        if not items:
            return
        now = self._clock()
        first_time = 0
        retry_in = math.inf
        for item in items:
            held = self._unwritten.hold(
                item.decision, reason=reason, since=item.since, now=now, previous=item.held
            )
            retry_in = min(retry_in, held.retry_at - now)
            if item.held is None:
                first_time += 1
        self._metrics.writes_deferred.labels(reason).inc(len(items))
        fields: dict[str, object] = {
            "orders": len(items),
            "newly_held": first_time,
            "held": len(self._unwritten),
            "retry_in_s": round(retry_in, 3),
            "note": "kept and written again; the provider is not asked again",
        }
        if reason == "locked":
            # Logged once per batch, not per retry of the same orders: a row
            # held for an hour must not fill the journal.
            if first_time:
                log.warning(
                    "writer.rows_locked",
                    order_ids=[str(i.decision.row.id) for i in items if i.held is None][:20],
                    **fields,
                )
        else:
            log.error("writer.failed", error=error, **fields)

    def _announcements_skipped(self, count: int, now: float) -> None:
        self._metrics.announcements_skipped.inc(count)
        self._unannounced += count
        if now >= self._next_announcement_log:
            log.warning(
                "writer.announcements_skipped",
                results=self._unannounced,
                interval_s=ANNOUNCEMENT_LOG_INTERVAL,
                reason="the NOTIFY queue is at least half full (a listener is stuck somewhere); "
                "the rows are written, the result channel misses them",
            )
            self._unannounced = 0
            self._next_announcement_log = now + ANNOUNCEMENT_LOG_INTERVAL

    async def _write_one_by_one(
        self, decisions: list[Decision]
    ) -> tuple[dict[uuid.UUID, Written], dict[uuid.UUID, str]]:
        """Write each decision alone; return what became of each and why the rest was refused.

        A row another transaction holds comes back 'locked', not as an
        error: it is held and written later, never counted as a refusal.
        """
        written: dict[uuid.UUID, Written] = {}
        refused: dict[uuid.UUID, str] = {}
        for decision in decisions:
            try:
                written.update(await self._write([decision]))
            except psycopg.OperationalError as exc:
                # Those written alone so far are written: only the rest is held.
                raise _PartlyWritten(written, refused) from exc
            except Exception as exc:  # one row's trouble is that row's alone
                reason = refusal_reason(exc)
                refused[decision.row.id] = reason
                log.error(
                    "writer.row_rejected",
                    order_id=str(decision.row.id),
                    provider=decision.provider,
                    outcome=decision.kind,
                    error=reason,
                    hint="the database refused this row's values; see the error, "
                    "then fix the column or the ORDER_MONITOR_*_STATUS settings",
                )
        return written, refused

    def _refused(self, decision: Decision, reason: str, now: float) -> None:
        """Count a refused write against the order's policy (decisions.after_refusal)."""
        follow_up = after_refusal(
            decision,
            policy=self.policy,
            writes=self._writes,
            limits=self._columns,
            reason=reason,
        )
        order = decision.row.id.int
        if isinstance(follow_up, Decision):
            # The order's checks are used up: the give-up is written in a later
            # batch, and the order stays "being checked" until then.
            self.submit(follow_up)
        else:
            # A sweep or a notification that read this very reference while
            # the check was out brings nothing new: the refusal's slot stands.
            self._scheduler.complete(order, now + follow_up, checked=decision.row.reference)

    async def _write(self, decisions: list[Decision]) -> dict[uuid.UUID, Written]:
        conn = await self._conn.get()
        if conn is not self._configured:
            # Per connection, as a new one after a failure starts without it.
            await conn.execute(
                "SELECT pg_catalog.set_config('lock_timeout', %s, false)", (LOCK_TIMEOUT,)
            )
            self._configured = conn
            log.info("writer.session_configured", lock_timeout=LOCK_TIMEOUT)
        written = await self._queries.write(conn, write_batch(decisions))
        self._health.present("write function")
        return written

    def _settle(self, decision: Decision, result: Written | None, now: float) -> bool:
        """Log the decision and give the order back to the schedule; True if it finished."""
        order = decision.row.id
        if decision.writes and result is None:
            self._metrics.stale_results.inc()
            log.info(
                "order.result_stale",
                order_id=str(order),
                provider=decision.provider,
                outcome=decision.kind,
                reason="the row left flight or changed its provider reference since it was read",
            )
            # Look again at once: the re-read drops a finished row and picks up
            # a new reference.
            self._scheduler.complete(order.int, now, checked=decision.row.reference)
            return False
        if decision.finished:
            log.info(
                "order.finished",
                order_id=str(order),
                provider=decision.provider,
                outcome=decision.kind,
                external_status=decision.external_status,
                pin_written=decision.pin is not None,
                answer=describe_outcome(decision.outcome),
            )
            self._scheduler.complete(order.int, None, checked=decision.row.reference)
            self.on_finished(decision)
            return True
        next_due = None if decision.next_check_in is None else now + decision.next_check_in
        log.debug(
            "order.checked" if decision.kind == "pending" else "order.deferred",
            order_id=str(order),
            provider=decision.provider,
            answer=describe_outcome(decision.outcome),
            due_in_s=round(decision.next_check_in or 0.0, 3),
        )
        opens = None if decision.pull_in is None else now + decision.pull_in
        self._scheduler.complete(
            order.int,
            next_due,
            group=decision.group,
            opens=opens,
            checked=decision.row.reference,
        )
        return False


def refusal_reason(exc: BaseException) -> str:
    """Why a row was refused, without the row's values.

    A psycopg error's full text may carry a DETAIL with the whole failing row
    (a PIN among it): only its class, SQLSTATE and primary message are kept.
    """
    kind = type(exc).__name__
    if not isinstance(exc, psycopg.Error):
        return kind
    code = f" {exc.sqlstate}" if exc.sqlstate else ""
    return f"{kind}{code}: {exc.diag.message_primary or 'no message'}"


def database_error(exc: BaseException) -> str:
    """What failed a write, for the log: the server's words, else the client's (a lost link)."""
    if isinstance(exc, psycopg.Error) and exc.sqlstate:
        return refusal_reason(exc)
    # libpq's own messages (connection refused, server closed the connection)
    # name the host and port, never the password.
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line or 'no message'}"
