"""NOTIFY while quiet, reading what changed while busy: the handoff, and the switch.

A transaction that has NOTIFYed takes one lock for the whole cluster at
COMMIT and keeps it through its WAL flush, so the application's notifying
commits run one at a time (pgbench on 2 cores: a quarter of its dispatch
throughput, for every application in the cluster that NOTIFYs). And any
function our trigger calls per row costs the application 12-25 % of its
dispatch throughput on 2 cores. So the trigger (install.sql, version 5 and
later) calls its function, which NOTIFYs, only while the daemon holds its
*idle lock*; otherwise its WHEN is false and nothing of ours runs (since
version 6 the WHEN is the lock's try alone, and the function tests whether
the order entered flight: PostgreSQL prepares a WHEN for every statement,
and the rule there cost up to a third of the dispatch throughput). While busy the
daemon reads, every :func:`~order_monitor.engine.changes.read_interval`,
the orders in flight changed since its last read
(:mod:`order_monitor.engine.changes`). The first check of an order is
``INITIAL_DELAY`` after its dispatch time, so an order found within a second
is checked at its slot.

Why nothing is missed at either switch, with one advisory lock:

* The trigger's WHEN tries the lock *shared*, without waiting, on every
  insert and every update of the reference or a status. It fails while the
  daemon holds it, or is waiting for it, and then the function NOTIFYs an
  order that entered flight; the daemon always LISTENs, so it hears it after
  COMMIT. It succeeds while the daemon neither holds nor wants it: nothing
  is called, and the transaction keeps the shared lock until it ends (so
  does one that wrote a row not in flight: the switch to idle waits for it
  too, which costs a retry at most).
* Going busy, the daemon releases the lock in a statement that also takes
  a snapshot, before the release: its xmin is the mark from which the busy
  reads start. A transaction that tried before the release NOTIFYs; one
  after, was running at that snapshot or started later, so the reads
  return its rows.
* Going idle, the daemon asks for the lock and *waits*: it is granted only
  when every transaction holding it shared (every one the trigger left
  unannounced) has ended, and a transaction's locks are released after its
  commit is visible. The daemon then reads once more, and sees every one of
  them. A transaction trying while the daemon waits fails its try (it does
  not queue behind a waiting request) and NOTIFYs.
* Nobody holds the lock when the daemon is down or has lost its connection:
  nothing is announced, and the next engine's first read takes every order
  in flight (as does its sweep).

On a version 2 to 4 install (a daemon upgraded before install.sql is run,
as the README says to), the old trigger writes ids to the UNLOGGED inbox
while busy: the daemon also empties it, every few milliseconds, until
install.sql drops it.

:class:`ModeRule` (pure, injected clock) decides when to switch;
:class:`Handoff` does the I/O on one session, which holds the lock as a
session lock.

Which session: the leader lock's own (:class:`LeaderSession`), in the
daemon. A leader whose lock session was cut keeps running until it notices
(the lock check's interval, plus its timeout on a half-open connection),
while a standby may have taken over and swept already. Had it its own
connection, its handoff would go on emptying the inbox all that time, and
the ids it took would die with its engine: those orders would wait for the
next sweep. On the lock's session it cannot: once the session is gone, so
is every read, and every read made before was committed while the lock was
still held, before the new leader's first sweep looked at the table, which
finds those orders. No check of ``pg_locks`` per read (it takes every
lock-manager partition), no second sweep, no timing argument.

``ORDER_MONITOR_HANDOFF=scan`` (:attr:`Handoff.use_notify` False): the
daemon never takes the idle lock, so the trigger never NOTIFYs and the
daemon always reads. For applications that dispatch in a ``PREPARE
TRANSACTION`` (two-phase commit), which PostgreSQL refuses once the
transaction has NOTIFYed.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Protocol

import psycopg

from order_monitor.db import (
    CONNECTION_ERRORS,
    AsyncConn,
    Queries,
    SweepRow,
    close_within,
    connect_forever,
)
from order_monitor.db.changes import Changed, ChangeStatements, Install
from order_monitor.db.inbox import InboxStatements
from order_monitor.db.queries import is_row_error
from order_monitor.engine.changes import Mark, read_interval, rows_pay
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics
from order_monitor.ops.installed import InstallHealth, is_missing

log = get_logger()


class Mode(enum.Enum):
    #: The daemon holds the idle lock: the trigger NOTIFYs.
    IDLE = "idle"
    #: The daemon does not hold it: the trigger calls nothing, the daemon reads changes.
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class HandoffTiming:
    """When to switch, and how often to read the inbox (versions 2 to 4) while busy."""

    #: Orders per second (seen over ``burst_window``) at which NOTIFY starts to
    #: cost the application more than the daemon's reads.
    busy_rate: float = 50.0
    burst_window: float = 0.2
    #: Below this many orders per second over ``calm_window`` the daemon goes
    #: back to NOTIFY (hysteresis: well below ``busy_rate``).
    idle_rate: float = 10.0
    calm_window: float = 2.0
    #: While busy, how long an empty inbox is left before it is read again:
    #: the most an order waits there, on top of the round trip. Doubled at
    #: each read that finds it still empty, up to ``poll_max``, and back to
    #: ``poll_interval`` at the first id: with a long transaction open
    #: somewhere, dead inbox rows are not reclaimed and an empty read costs
    #: 4 ms instead of 0.2, so reading 200 times a second would cost a core.
    poll_interval: float = 0.005
    poll_max: float = 0.2
    #: How long one request for the idle lock may wait for the transactions
    #: that hold it shared; on timeout the daemon stays busy and tries again
    #: after ``idle_retry``.
    lock_wait: float = 0.2
    idle_retry: float = 1.0
    #: While idle, how often the inbox is read anyway (it should be empty),
    #: and the cluster's NOTIFY queue looked at.
    idle_check: float = 5.0
    #: pg_notification_queue_usage() from which the daemon stays busy (one
    #: listener anywhere in the cluster that stopped reading fills the queue,
    #: and then every COMMIT that NOTIFYed fails: the application's dispatches
    #: too, while the trigger NOTIFYs). Below the write function's own limit
    #: for announcing results, so the application's NOTIFYs stop first.
    queue_busy: float = 0.25

    def __post_init__(self) -> None:
        if not 0 < self.idle_rate < self.busy_rate:
            raise ValueError("need 0 < idle_rate < busy_rate")
        for name in ("burst_window", "calm_window", "poll_interval", "lock_wait", "idle_retry"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.calm_window < self.burst_window:
            raise ValueError("calm_window must be >= burst_window")
        if self.poll_max < self.poll_interval:
            raise ValueError("poll_max must be >= poll_interval")
        if not 0 < self.queue_busy <= 1:
            raise ValueError("need 0 < queue_busy <= 1")


class EmptyPolls:
    """How long to wait before the next read of the inbox while busy (pure)."""

    __slots__ = ("_next", "timing")

    def __init__(self, timing: HandoffTiming) -> None:
        self.timing = timing
        self._next = timing.poll_interval

    def after(self, taken: int) -> float:
        """The wait after a read that took *taken* ids: short after any, doubling while none."""
        if taken:
            self._next = self.timing.poll_interval
            return self._next
        wait = self._next
        self._next = min(wait * 2, self.timing.poll_max)
        return wait


class ModeRule:
    """Counts announced orders over time and says which mode the daemon should be in.

    Pure: the caller passes ``now``. Counts are kept in buckets of a tenth
    of the burst window, for the length of the calm window, so memory is
    constant whatever the rate.
    """

    __slots__ = ("_buckets", "_width", "timing")

    def __init__(self, timing: HandoffTiming) -> None:
        self.timing = timing
        self._width = timing.burst_window / 10
        self._buckets: deque[list[float]] = deque()  # [bucket start, count]

    def observe(self, now: float, count: int = 1) -> None:
        if count <= 0:
            return
        start = now - (now % self._width)
        if self._buckets and self._buckets[-1][0] == start:
            self._buckets[-1][1] += count
        else:
            self._buckets.append([start, float(count)])
        self._forget(now)

    def seen_within(self, now: float, span: float) -> float:
        """Orders announced in the last *span* seconds (to bucket precision)."""
        self._forget(now)
        since = now - span
        return sum(count for start, count in self._buckets if start + self._width > since)

    def wants(self, mode: Mode, now: float, *, since: float) -> Mode:
        """The mode to be in, being in *mode* since time *since*."""
        t = self.timing
        if mode is Mode.IDLE:
            busy = self.seen_within(now, t.burst_window) >= t.busy_rate * t.burst_window
            return Mode.BUSY if busy else Mode.IDLE
        # A whole calm window in busy mode before judging it calm: the rate
        # is measured over that window.
        if now - since < t.calm_window:
            return Mode.BUSY
        calm = self.seen_within(now, t.calm_window) < t.idle_rate * t.calm_window
        return Mode.IDLE if calm else Mode.BUSY

    def _forget(self, now: float) -> None:
        horizon = now - self.timing.calm_window - self._width
        while self._buckets and self._buckets[0][0] < horizon:
            self._buckets.popleft()


#: Installs on which the daemon cannot read changes: it holds the idle lock.
_NOTIFY_ALWAYS: Final = (Install.NOTIFY_ONLY, Install.GATED_UNREADABLE)


class HandoffSession(Protocol):
    """Where the handoff's session comes from, and what a failure on it means."""

    async def open(self) -> AsyncConn: ...

    async def failed(self, conn: AsyncConn, error: str) -> None:
        """After a statement on *conn* failed with *error*; the next :meth:`open` follows."""
        ...

    async def stopped(self, conn: AsyncConn) -> None:
        """The handoff was cancelled (the engine stops) while using *conn*."""
        ...


class OwnSession:
    """A connection of the handoff's own, reconnected after any failure (tests, tools)."""

    def __init__(self, dsn: str, *, max_backoff: float = 30.0) -> None:
        self._dsn = dsn
        self._max_backoff = max_backoff

    async def open(self) -> AsyncConn:
        return await connect_forever(
            self._dsn, "handoff", event="handoff.connect_failed", max_wait=self._max_backoff
        )

    async def failed(self, conn: AsyncConn, error: str) -> None:
        # The idle lock goes with the session: orders wait in the inbox
        # until the next connection empties it.
        await close_within(conn, 5.0)

    async def stopped(self, conn: AsyncConn) -> None:
        await close_within(conn, 5.0)


class LeaderLockSession(Protocol):
    """What :class:`LeaderSession` needs of :class:`~order_monitor.ops.leader.LeaderLock`."""

    @property
    def connection(self) -> AsyncConn | None: ...

    def session_failed(self, reason: str) -> None: ...


class LeaderSession:
    """The leader lock's own session (see the module docstring): no inbox read outlives the lock."""

    def __init__(self, lock: LeaderLockSession, *, retry: float = 1.0) -> None:
        self._lock = lock
        self._retry = retry

    async def open(self) -> AsyncConn:
        conn = self._lock.connection
        if conn is None or conn.closed or conn.broken:
            # Leadership is gone or going: the engine is being stopped, and
            # this task with it. Never fall back to another connection.
            self._lock.session_failed("the leader lock's session is closed")
            await asyncio.Future()
        assert conn is not None
        return conn

    async def failed(self, conn: AsyncConn, error: str) -> None:
        if conn.closed or conn.broken:
            # Say so now rather than at the lock's next check: every moment
            # the engine runs on after this, a standby may be working too.
            self._lock.session_failed(f"the leader lock's session failed: {error}")
            return
        # A statement failed on a live session (the inbox dropped under us,
        # a privilege revoked): the lock is still ours; try again shortly.
        await asyncio.sleep(self._retry)

    async def stopped(self, conn: AsyncConn) -> None:
        # The lock's owner closes the session once the engine has stopped,
        # and the idle lock goes with it.
        return


class Handoff:
    """Holds or releases the idle lock, and reads what changed while busy.

    A busy read returns, for each new order, what a confirm would read of
    it: the rows go to *on_rows* (the confirmer schedules them as they
    are), every new one (they are orders in flight, which the schedule
    holds anyway). Ids go where notified ids go, to *on_orders* (the
    confirmer reads them back): those of a busy read that returns ids only
    (when rows do not pay, :func:`~order_monitor.engine.changes.rows_pay`,
    or one cannot be read), and those of version 4's inbox, which is
    emptied no faster than the confirmer has room (*room*), so that
    backlog waits in the table. Orders already scheduled (*known*) are
    dropped at once.
    """

    def __init__(
        self,
        dsn: str,
        queries: Queries,
        *,
        on_orders: Callable[[list[uuid.UUID]], object],
        on_rows: Callable[[list[SweepRow]], object],
        room: Callable[[], int],
        known: Callable[[uuid.UUID], bool] = lambda order: False,
        initial_delay: float = 60.0,
        listening: Callable[[], bool],
        metrics: Metrics,
        clock: Callable[[], float],
        timing: HandoffTiming | None = None,
        batch_size: int = 500,
        max_backoff: float = 30.0,
        session: HandoffSession | None = None,
        use_notify: bool = True,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        health: InstallHealth | None = None,
        queue_usage: Callable[[AsyncConn], Awaitable[float]] | None = None,
    ) -> None:
        self._statements = InboxStatements(queries.layout)
        self._changes = ChangeStatements(queries.layout)
        self._known = known
        #: The first check's delay, which sets the busy reads' interval (SIGHUP changes it).
        self.initial_delay = initial_delay
        #: Where the next busy read starts (None: every order in flight).
        self.mark = Mark()
        self._next_read = clock()
        self._session: HandoffSession = session or OwnSession(dsn, max_backoff=max_backoff)
        self._on_orders = on_orders
        self._on_rows = on_rows
        #: Whether the next busy read returns rows (engine.changes.rows_pay).
        self._rows_next = True
        self._room = room
        self._listening = listening
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self.timing = timing or HandoffTiming()
        self.rule = ModeRule(self.timing)
        self._polls = EmptyPolls(self.timing)
        self._batch_size = batch_size
        #: False (ORDER_MONITOR_HANDOFF=scan): never take the idle lock, so
        #: the trigger never NOTIFYs (two-phase commit in the application).
        self.use_notify = use_notify
        self.mode = Mode.BUSY
        metrics.handoff_busy.set(1)
        self._mode_since = clock()
        self._idle_refused_at: float | None = None
        #: None until the first connection tells; checked again every idle_check.
        self.install: Install | None = None
        self._install_checked_at = clock()
        self._wake = asyncio.Event()
        #: Told when the inbox vanishes under us (uninstall) and when it is back.
        self._health = health or InstallHealth()
        self._queue_usage = queue_usage or self._statements.queue_usage
        self._queue_checked_at = clock()
        self._queue_filled = False

    def use_session(self, session: HandoffSession) -> None:
        """Run on *session* from the next (re)connection on (the daemon: the leader lock's)."""
        self._session = session

    def notified(self) -> None:
        """An order arrived by NOTIFY (called by the listener for each one)."""
        self.rule.observe(self._clock())
        if self.mode is Mode.IDLE:
            self._wake.set()

    async def run(self) -> None:
        """Forever; returns only by cancellation."""
        while True:
            conn = await self._session.open()
            try:
                await self._serve(conn)
            except CONNECTION_ERRORS as exc:
                error = str(exc).strip() or type(exc).__name__
                log.warning("handoff.lost", error=error)
                if is_missing(exc):
                    self._health.missing("handoff", error)
                if self.mode is Mode.IDLE:
                    await self._give_back(conn)
                self._set_mode(Mode.BUSY, reason="connection closed")
                await self._session.failed(conn, error)
            except BaseException:
                if self.mode is Mode.IDLE:
                    # The leader's session lives on while the engine drains:
                    # orders arriving meanwhile go unannounced, rather than
                    # NOTIFY a listener about to stop; whoever leads next
                    # reads every order in flight when it starts.
                    await self._give_back(conn)
                self._set_mode(Mode.BUSY, reason="stopped")
                await self._session.stopped(conn)
                raise

    async def _give_back(self, conn: AsyncConn) -> None:
        """Release the idle lock on a session that outlives this failure (the leader's)."""
        if conn.closed or conn.broken:
            # The lock went with the session: the mark kept is older (engine.changes).
            return
        try:
            async with asyncio.timeout(2.0):
                await self._release(conn)
        except CONNECTION_ERRORS as exc:
            log.debug("handoff.give_back_failed", error=str(exc).strip() or type(exc).__name__)

    async def _release(self, conn: AsyncConn) -> None:
        """Release the idle lock, and read from just before the release on."""
        self.mark.released(await self._changes.release_idle_lock(conn))
        self._next_read = self._clock()

    async def _serve(self, conn: AsyncConn) -> None:
        await self._installed(conn)
        while True:
            if self._clock() - self._install_checked_at >= self.timing.idle_check:
                # An uninstall (or role.sql's grants) under a running daemon:
                # said in /readyz, and the idle lock held while it cannot read.
                await self._installed(conn)
            if self.install in _NOTIFY_ALWAYS:
                await self._hold_until_installed(conn)
            elif self.mode is Mode.BUSY:
                await self._serve_busy(conn)
            else:
                await self._serve_idle(conn)

    async def _installed(self, conn: AsyncConn) -> Install:
        install = await self._changes.install(conn)
        self._install_checked_at = self._clock()
        if install is not Install.NOTIFY_ONLY:
            self._health.present("handoff")
        elif self.install not in (None, Install.NOTIFY_ONLY):
            self._health.missing("handoff", "the trigger's function is gone, or the inbox's grants")
        if install is Install.NOTIFY_ONLY and self.install is not Install.NOTIFY_ONLY:
            log.warning(
                "handoff.version_1_install",
                note="the installed trigger NOTIFYs for every order, which serialises the "
                "application's commits; run this release's install.sql, then role.sql, to let it "
                "stay quiet while the daemon is busy",
            )
        elif install is Install.GATED_UNREADABLE and self.install is not install:
            log.warning(
                "handoff.xmin_not_granted",
                note="install.sql (version 5 or later) is in, role.sql not yet: this role may "
                "not read xmin, so the daemon cannot find orders itself while busy; until "
                "role.sql is run it holds the idle lock and the trigger NOTIFYs every order",
            )
        elif install is Install.INBOX and self.install is not Install.INBOX:
            log.warning(
                "handoff.version_4_install",
                note="the installed trigger calls a function for every order, which costs the "
                "application a fifth of its dispatch throughput; run this release's install.sql, "
                "then role.sql, with this daemon running",
            )
        self.install = install
        return install

    async def _hold_until_installed(self, conn: AsyncConn) -> None:
        """Hold the idle lock until the daemon can read changes (version 1; no xmin grant).

        Held so that the trigger NOTIFYs every order meanwhile: none waits
        for a read the daemon cannot make. Not held without NOTIFY
        (``use_notify`` False): orders then wait for the sweep, as that
        setting asks.
        """
        if self.use_notify and self.mode is Mode.BUSY:
            while not await self._statements.take_idle_lock(conn, self.timing.lock_wait):
                pass
            self._set_mode(Mode.IDLE, reason="cannot read changes yet")
        installed = self.install or Install.NOTIFY_ONLY
        while installed in _NOTIFY_ALWAYS:
            await self._sleep(self.timing.idle_check)
            installed = await self._installed(conn)
        log.info("handoff.trigger_installed", install=installed.value)
        if self.use_notify:
            await self._release(conn)
        self._set_mode(Mode.BUSY, reason="new trigger installed")

    async def _serve_busy(self, conn: AsyncConn) -> None:
        taken, more = await self._drain(conn) if self.install is Install.INBOX else (0, False)
        now = self._clock()
        if self.install is Install.GATED and now >= self._next_read:
            await self._read_changes(conn)
            now = self._clock()
        calm = self.rule.wants(Mode.BUSY, now, since=self._mode_since) is Mode.IDLE
        may_retry = (
            self._idle_refused_at is None or now - self._idle_refused_at >= self.timing.idle_retry
        )
        # Only with the listener up: a NOTIFY nobody hears is lost (the
        # sweep would find the order, but late).
        if self.use_notify and calm and may_retry and self._listening():
            if not await self._queue_filling(conn) and await self._go_idle(conn):
                return
            self._idle_refused_at = now
        if more:
            return
        if self.install is Install.INBOX:
            wait = self._polls.after(taken)
        else:
            wait = self._next_read - self._clock()
        await self._sleep(max(wait, 0.0))

    async def _serve_idle(self, conn: AsyncConn) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), self.timing.idle_check)
            woken = True
        except TimeoutError:
            woken = False
        now = self._clock()
        if self.rule.wants(Mode.IDLE, now, since=self._mode_since) is Mode.BUSY:
            reason = "orders arriving fast"
        elif not self._listening():
            # Nobody would hear a NOTIFY: let the reads find the orders instead.
            reason = "listener down"
        elif now - self._queue_checked_at >= self.timing.idle_check and (
            await self._queue_filling(conn)
        ):
            reason = "NOTIFY queue filling"
        else:
            reason = None
        if reason is not None:
            await self._release(conn)
            self._set_mode(Mode.BUSY, reason=reason)
            return
        if woken or self.install is not Install.INBOX:
            return
        strays, _ = await self._drain(conn)
        if strays:
            log.warning(
                "handoff.inbox_not_empty_while_idle",
                orders=strays,
                note="taken and checked; something other than our trigger writes to the inbox",
            )

    async def _queue_filling(self, conn: AsyncConn) -> bool:
        self._queue_checked_at = self._clock()
        usage = await self._queue_usage(conn)
        filling = usage >= self.timing.queue_busy
        if filling == self._queue_filled:
            return filling
        self._queue_filled = filling
        if not filling:
            log.info("handoff.notify_queue_drained", usage=round(usage, 3))
        else:
            log.warning(
                "handoff.notify_queue_filling",
                usage=round(usage, 3),
                note="staying busy: the trigger NOTIFYs no more; a session that "
                "LISTENs and does not read fills the queue (doctor names it)",
            )
        return filling

    async def _go_idle(self, conn: AsyncConn) -> bool:
        if not await self._statements.take_idle_lock(conn, self.timing.lock_wait):
            log.debug("handoff.idle_lock_busy", waited_s=self.timing.lock_wait)
            return False
        self._set_mode(Mode.IDLE, reason="orders arriving slowly")
        # Every transaction the trigger left unannounced has ended (it held
        # the lock shared): these reads see the last of them.
        if self.install is Install.INBOX:
            while (await self._drain(conn))[1]:
                pass
        if self.install is Install.GATED:
            await self._read_changes(conn)
        return True

    async def _read_changes(self, conn: AsyncConn) -> None:
        """Read the orders changed since the mark, and hand on the new ones."""
        started = self._clock()
        changed = await self._read_from_mark(conn)
        seconds = self._clock() - started
        self._metrics.busy_reads.observe(seconds)
        # All of them, whatever the confirmer holds: leaving some for the next
        # read would keep the mark where it is, and every read after would
        # return more (a confirmer behind at 9,000 orders/s made each read
        # return the same rows two or three times over).
        if changed.rows is not None:
            rows = [row for row in changed.rows if not self._known(row.id)]
            taken = len(rows)
        else:
            ids = [order for order in changed.ids if not self._known(order)]
            taken = len(ids)
        known = len(changed.ids) - taken
        self._rows_next = rows_pay(taken, known)
        self._next_read = self._clock() + read_interval(self.initial_delay, seconds)
        counts = self._metrics.busy_read_orders
        counts.labels("known").inc(known)
        if taken:
            counts.labels("taken").inc(taken)
            self.rule.observe(self._clock(), taken)
            if changed.rows is not None:
                self._on_rows(rows)
            else:
                self._on_orders(ids)

    async def _read_from_mark(self, conn: AsyncConn) -> Changed:
        """The busy read: rows when they pay, else ids (and ids when a row cannot be read)."""
        if not self._rows_next:
            return await self._changes.read_from(conn, self.mark)
        try:
            return await self._changes.read_from(conn, self.mark, rows=True)
        except psycopg.Error as exc:
            if not is_row_error(exc, conn):
                raise
            # One row's columns fail (a custom type's cast, say): its id still
            # reads, and the confirmer narrows the confirm down to that row,
            # reports it, and schedules the others. The mark has not moved.
            log.debug("handoff.rows_unreadable", error=str(exc).strip() or type(exc).__name__)
            return await self._changes.read_from(conn, self.mark)

    async def _drain(self, conn: AsyncConn) -> tuple[int, bool]:
        """Take what the inbox holds, as far as there is room: (taken, more may wait)."""
        room = min(self._batch_size, self._room())
        if room <= 0:
            # The confirmer is behind: leave the ids in the table for now.
            await self._sleep(self.timing.poll_interval)
            return 0, True
        try:
            ids = await self._statements.take(conn, room)
        except psycopg.errors.UndefinedTable:
            # install.sql (version 5 or later) dropped the inbox: its trigger writes
            # there no more, and the reads find every order it would have held.
            if await self._installed(conn) not in (Install.GATED, Install.GATED_UNREADABLE):
                raise
            # Orders the new trigger left unannounced may have committed
            # before this moment: the first read takes every order in flight.
            self.mark = Mark()
            self._next_read = self._clock()
            log.info(
                "handoff.inbox_dropped", note="version 5 or later installed; reading changes now"
            )
            return 0, True
        if ids:
            self.rule.observe(self._clock(), len(ids))
            self._metrics.inbox_taken.inc(len(ids))
            self._on_orders(ids)
        return len(ids), len(ids) >= room

    def _set_mode(self, mode: Mode, *, reason: str) -> None:
        if mode is self.mode:
            return
        self.mode = mode
        self._mode_since = self._clock()
        self._idle_refused_at = None
        self._metrics.handoff_busy.set(1 if mode is Mode.BUSY else 0)
        self._metrics.handoff_switches.labels(mode.value).inc()
        log.info("handoff.mode", mode=mode.value, reason=reason)
