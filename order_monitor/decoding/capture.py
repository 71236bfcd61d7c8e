"""The leader's reads of the logical replication slot (``ORDER_MONITOR_CAPTURE=decoding``).

In place of the handoff: no trigger, no NOTIFY, no idle lock. Every
:func:`~order_monitor.engine.changes.read_interval` (a tenth of the first
check's delay, at most 1 s, at least ten times the last read) the daemon
peeks at the slot's changes (whole transactions, through decoding.sql's
functions: its role has no REPLICATION), parses them (:mod:`.pgoutput`),
and hands the ids that may be in flight to the confirmer, which reads each
row and schedules those in flight.

Decided:

* the slot is advanced to the end of a read only once the confirmer has
  scheduled (or dropped as not in flight) every id handed to it up to that
  read (:meth:`Confirmer.settled` of the read's ticket), and only past
  changes whose ids all fitted: a daemon killed before that reads them
  again from the slot, and its successor's start-up sweep finds them too.
  Reads keep coming meanwhile, each with its own position and ticket, so a
  steady stream of orders never holds the slot back more than a read or two;
* the slot is advanced right before each read, not after: a peek decodes
  from the slot's position, so a peek before the advance decoded the last
  read's WAL a second time (and the advance a third). A read that filled
  its batch (a backlog) waits for the confirmer, at most one read interval,
  before the next;
* the reads run on the leader lock's own session, as the handoff's do: a
  leader whose session is gone cannot advance the slot past orders its
  dying engine took;
* a slot invalidated for falling behind (``wal_status`` lost) or dropped is
  recreated (decoding.sql's function refuses while the slot is healthy),
  then a sweep finds whatever was dispatched meanwhile; said in the log and
  ``order_monitor_decoding_slot_recreated_total``;
* a message the parser refuses cannot be read past by reading again: its
  batch's orders are left to a sweep (requested at once), the slot is
  advanced past it, and the log says so with an escaped excerpt;
* the slot's lag is read every ``status_interval`` into
  ``order_monitor_decoding_slot_lag_bytes`` (alerted on).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections import deque
from collections.abc import Awaitable, Callable

import psycopg

from order_monitor.config import Layout
from order_monitor.db import CONNECTION_ERRORS, AsyncConn
from order_monitor.decoding.orders import order_ids
from order_monitor.decoding.pgoutput import PgoutputError, changed_rows, parse_message
from order_monitor.decoding.statements import DecodingStatements
from order_monitor.engine.changes import read_interval
from order_monitor.engine.handoff import HandoffSession
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics
from order_monitor.ops.installed import InstallHealth, is_missing
from order_monitor.schema.decoding import READ_CHANGES

log = get_logger()

#: How often a read that filled its batch looks whether its ids are through.
SETTLE_POLL = 0.005

#: A read that keeps failing with the same error is logged again at most this often.
REPEATED_FAILURE_LOG = 60.0

#: What a read of a slot raises when the slot is gone (dropped) or invalidated.
SLOT_GONE = (psycopg.errors.UndefinedObject, psycopg.errors.ObjectNotInPrerequisiteState)


class Capture:
    def __init__(
        self,
        layout: Layout,
        *,
        session: HandoffSession,
        on_orders: Callable[[list[uuid.UUID]], int],
        known: Callable[[uuid.UUID], bool],
        settled: Callable[[int], bool],
        on_lost: Callable[[], None],
        metrics: Metrics,
        clock: Callable[[], float],
        initial_delay: float = 60.0,
        batch: int = READ_CHANGES,
        status_interval: float = 5.0,
        retry: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        health: InstallHealth | None = None,
    ) -> None:
        self._layout = layout
        self._statements = DecodingStatements(layout)
        self._session = session
        self._on_orders = on_orders
        self._known = known
        self._settled = settled
        self._on_lost = on_lost
        self._metrics = metrics
        self._clock = clock
        #: Sets the reads' interval (SIGHUP changes it).
        self.initial_delay = initial_delay
        self._batch = batch
        self._status_interval = status_interval
        self._retry = retry
        self._sleep = sleep
        self._health = health or InstallHealth()
        #: Read ends not confirmed yet, oldest first, with the confirmer's
        #: ticket for the ids handed on up to each.
        self._unconfirmed: deque[tuple[str, int]] = deque()
        self._ticket = 0
        self._advanced: str | None = None
        self._status_at: float | None = None
        #: The error of the failing reads, when the last one failed; how many
        #: failed since it was first seen, and when it was last logged.
        self._failure: str | None = None
        self._failures = 0
        self._failure_logged_at = -math.inf
        #: Reads made, and the last slot state seen (status, tests).
        self.reads = 0
        self.lag_bytes: int | None = None

    def use_session(self, session: HandoffSession) -> None:
        self._session = session

    async def run(self) -> None:
        """Forever; returns only by cancellation."""
        while True:
            conn = await self._session.open()
            try:
                await self._serve(conn)
            except SLOT_GONE as exc:
                await self._slot_gone(conn, exc)
            except CONNECTION_ERRORS as exc:
                error = str(exc).strip() or type(exc).__name__
                self._read_failed(error)
                if is_missing(exc):
                    self._health.missing("capture", error)
                await self._session.failed(conn, error)
            except BaseException:
                await self._session.stopped(conn)
                raise

    async def _serve(self, conn: AsyncConn) -> None:
        while True:
            # Advance before reading: a peek decodes from the slot's position,
            # so one made before the advance decodes the last read's changes
            # again (and the advance decodes them once more).
            await self._confirm_settled(conn)
            started = self._clock()
            more = await self._read(conn)
            seconds = self._clock() - started
            self._health.present("capture")
            if self._failure is not None:
                log.info("capture.read_recovered", failed_reads=self._failures)
                self._failure, self._failures = None, 0
            now = self._clock()
            if self._status_at is None or now - self._status_at >= self._status_interval:
                await self._read_status(conn)
            pause = read_interval(self.initial_delay, seconds)
            if more:
                # A backlog: read on as soon as the confirmer is through with
                # this batch, so that the next peek starts past it.
                await self._until_settled(pause)
            else:
                await self._sleep(pause)

    async def _until_settled(self, within: float) -> None:
        """Wait, at most *within* s, for the confirmer to be through with every id handed on."""
        deadline = self._clock() + within
        while not self._settled(self._ticket) and self._clock() < deadline:
            await self._sleep(SETTLE_POLL)

    def _read_failed(self, error: str) -> None:
        """Log a failed read: the first, then the same error at most once per interval.

        The leader retries every second; a function dropped under a running
        daemon (uninstall, decoding.sql not run on a new primary) must not
        write a line a second until someone comes.
        """
        now = self._clock()
        if error != self._failure:
            self._failure, self._failures, self._failure_logged_at = error, 0, -math.inf
        self._failures += 1
        if now - self._failure_logged_at < REPEATED_FAILURE_LOG:
            return
        self._failure_logged_at = now
        log.warning(
            "capture.read_failed",
            error=error,
            failed_reads=self._failures,
            note=f"retried every second; the same error is logged again at most every "
            f"{REPEATED_FAILURE_LOG:g} s, with the count of failed reads since the first",
        )

    def _read_to(self, lsn: str) -> None:
        """Everything up to *lsn* was read and handed on (under the current ticket)."""
        if self._unconfirmed and self._unconfirmed[-1][1] == self._ticket:
            # The same ids to wait for: only the later position matters.
            self._unconfirmed[-1] = (lsn, self._ticket)
        else:
            self._unconfirmed.append((lsn, self._ticket))

    async def _confirm_settled(self, conn: AsyncConn) -> None:
        """Advance the slot to the last read end whose ids the confirmer is through with."""
        upto = None
        while self._unconfirmed and self._settled(self._unconfirmed[0][1]):
            upto = self._unconfirmed.popleft()[0]
        if upto is not None and upto != self._advanced:
            await self._statements.advance(conn, upto)
            self._advanced = upto

    async def _read(self, conn: AsyncConn) -> bool:
        """One read of the slot; True when more waits (a full batch)."""
        started = self._clock()
        read = await self._statements.changes(conn, self._batch)
        changes = read.messages
        self.reads += 1
        # Fewer than asked: everything up to the flushed position was read.
        full = len(changes) >= self._batch
        last = changes[-1][0] if full else read.flushed
        if not changes:
            self._metrics.decoding_reads.observe(self._clock() - started)
            # Nothing of ours: confirm that much, or the slot holds back the
            # WAL of every other table while no order is dispatched.
            self._read_to(last)
            return False
        try:
            rows = changed_rows(
                (parse_message(data) for _, data in changes),
                self._layout.schema,
                self._layout.table,
            )
        except PgoutputError as exc:
            self._metrics.decoding_errors.labels("unreadable").inc()
            log.error(
                "capture.unreadable_changes",
                error=str(exc),
                upto=last,
                note="these changes are skipped (the slot is advanced past them); a sweep "
                "now finds their orders",
            )
            self._on_lost()
            self._read_to(last)
            return False
        ids, junk = order_ids(rows, self._layout)
        if junk:
            log.warning("capture.unreadable_ids", count=junk, note="not an order id: skipped")
        self._metrics.decoding_reads.observe(self._clock() - started)
        # All of them, whatever the confirmer holds (Inbox.add): leaving some
        # would keep the slot where it is, and every read after would decode
        # more again.
        taken = [order for order in ids if not self._known(order)]
        counts = self._metrics.decoding_orders
        counts.labels("known").inc(len(ids) - len(taken))
        if taken:
            counts.labels("taken").inc(len(taken))
            self._ticket = self._on_orders(taken)
        self._read_to(last)
        # A full batch ends at a transaction's end before the slot's: read on.
        return full

    async def _read_status(self, conn: AsyncConn) -> None:
        self._status_at = self._clock()
        state = await self._statements.slot(conn)
        if state is None or state.lag_bytes is None:
            return
        self.lag_bytes = state.lag_bytes
        self._metrics.decoding_slot_lag.set(state.lag_bytes)

    async def _slot_gone(self, conn: AsyncConn, exc: psycopg.Error) -> None:
        error = str(exc).strip()
        if isinstance(exc, psycopg.errors.UndefinedObject) and "replication slot" not in error:
            # A function missing (decoding.sql not run, or uninstalled).
            self._health.missing("capture", error)
            log.error(
                "capture.not_installed",
                error=error,
                note="run sql/decoding.sql as a superuser (after install.sql and role.sql), "
                "or set ORDER_MONITOR_CAPTURE=trigger",
            )
            await self._session.failed(conn, error)
            return
        self._metrics.decoding_errors.labels("slot").inc()
        try:
            lsn = await self._statements.recreate(conn)
        except CONNECTION_ERRORS as again:
            log.error("capture.slot_not_recreated", error=error, refused=str(again).strip())
            await self._session.failed(conn, error)
            return
        self._unconfirmed.clear()
        self._metrics.decoding_slot_recreated.inc()
        log.error(
            "capture.slot_recreated",
            error=error,
            lsn=lsn,
            note="the slot was invalidated (it fell behind by more than "
            "max_slot_wal_keep_size) or dropped: a new one reads from now on, and a sweep "
            "finds the orders dispatched meanwhile",
        )
        self._on_lost()
