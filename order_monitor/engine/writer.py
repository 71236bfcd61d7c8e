"""Applying decisions to the table: batched, guarded, announced.

Decisions queue up while providers answer; the writer takes whatever has
accumulated (up to a batch) and writes it in one statement whose WHERE still
requires the row to be in flight with the same provider reference. A result
that lost a race (an operator finished the order, the application re-sent it
with a new reference) is dropped, never written over the newer truth.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable

import psycopg

from order_monitor import schema
from order_monitor.config import OutcomeWrites
from order_monitor.db import ColumnLimits, ManagedConnection, Queries
from order_monitor.engine.decisions import Decision, after_refusal, describe_outcome, write_batch
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics

log = get_logger()

# After a failed write the orders are checked again this much later: the
# provider is asked once more rather than results being held in memory
# across a database outage of unknown length.
RETRY_AFTER_WRITE_FAILURE = 5.0


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
    ) -> None:
        self._conn = conn
        #: Read at each refusal: a reload may change it.
        self.policy = policy
        self._writes = writes
        self._columns = columns
        self._queries = queries
        self._scheduler = scheduler
        self._metrics = metrics
        self._clock = clock
        self._batch_size = batch_size
        self._queue: asyncio.Queue[Decision | None] = asyncio.Queue()
        #: Called after a batch is settled: orders went back on the schedule,
        #: possibly due before whatever the dispatcher is waiting for.
        self.on_rescheduled: Callable[[], None] = lambda: None

    def submit(self, decision: Decision) -> None:
        self._queue.put_nowait(decision)

    async def close(self) -> None:
        """Write everything submitted so far, then make :meth:`run` return."""
        self._queue.put_nowait(None)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    async def run(self) -> None:
        closing = False
        while not closing:
            first = await self._queue.get()
            batch: list[Decision] = []
            if first is None:
                closing = True
            else:
                batch.append(first)
            while len(batch) < self._batch_size and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    closing = True
                else:
                    batch.append(item)
            if batch:
                await self.flush(batch)

    async def flush(self, batch: list[Decision]) -> None:
        to_write = [d for d in batch if d.writes]
        refused: dict[uuid.UUID, str] = {}
        try:
            try:
                written = await self._write(to_write) if to_write else {}
            except psycopg.OperationalError:
                raise
            except Exception:  # narrowed row by row just below
                # The database refused a value (a constraint, a length, another
                # application's trigger), or a value could not even be sent:
                # find the row at fault instead of failing the whole batch.
                written, refused = await self._write_one_by_one(to_write)
        except psycopg.OperationalError as exc:
            await self._conn.reset()
            log.error(
                "writer.failed",
                orders=len(to_write),
                error=str(exc).strip(),
                retry_in_s=RETRY_AFTER_WRITE_FAILURE,
            )
            now = self._clock()
            for decision in batch:
                self._scheduler.complete(
                    decision.row.id.int,
                    now + RETRY_AFTER_WRITE_FAILURE,
                    checked=decision.row.reference,
                )
            self.on_rescheduled()
            return
        now = self._clock()
        finished: Counter[str] = Counter()
        for decision in batch:
            reason = refused.get(decision.row.id)
            if reason is not None:
                self._refused(decision, reason, now)
            elif self._settle(decision, written, now):
                finished[decision.kind] += 1
        for kind, count in finished.items():
            self._metrics.finished.labels(kind).inc(count)
        self.on_rescheduled()

    async def _write_one_by_one(
        self, decisions: list[Decision]
    ) -> tuple[dict[uuid.UUID, str], dict[uuid.UUID, str]]:
        """Write each decision alone; return what was written and why the rest was refused."""
        written: dict[uuid.UUID, str] = {}
        refused: dict[uuid.UUID, str] = {}
        for decision in decisions:
            try:
                written.update(await self._write([decision]))
            except psycopg.OperationalError:
                raise
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

    async def _write(self, decisions: list[Decision]) -> dict[uuid.UUID, str]:
        conn = await self._conn.get()
        results = await self._queries.write(conn, write_batch(decisions))
        return {order: r.outcome for order, r in results.items() if r.outcome != schema.LOCKED}

    def _settle(self, decision: Decision, written: dict[uuid.UUID, str], now: float) -> bool:
        """Log the decision and give the order back to the schedule; True if it finished."""
        order = decision.row.id
        if decision.writes and order not in written:
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
