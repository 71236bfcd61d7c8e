"""NOTIFY while quiet, the inbox while busy: the handoff, and the switch between the two.

A transaction that has NOTIFYed takes one lock for the whole cluster at
COMMIT and keeps it through its WAL flush, so the application's notifying
commits run one at a time (pgbench on 2 cores: a quarter of its dispatch
throughput, for every application in the cluster that NOTIFYs). So the
trigger (install.sql, version 2) NOTIFYs only while the daemon holds its
*idle lock*; otherwise it writes the order id to an UNLOGGED inbox table,
which the daemon empties every few milliseconds. Appending to the inbox
takes no lock that other commits wait for.

Why nothing is missed at either switch, with one advisory lock:

* The trigger tries the lock *shared*, without waiting. It fails while the
  daemon holds it, or is waiting for it, and then the order is NOTIFYed;
  the daemon always LISTENs, so it hears it after COMMIT. It succeeds while
  the daemon neither holds nor wants it: the order goes to the inbox, and
  the transaction keeps the shared lock until it ends.
* Going busy, the daemon releases the lock and reads the inbox from then
  on. A transaction that tried before the release NOTIFYs; one after, uses
  the inbox. Both are seen.
* Going idle, the daemon asks for the lock and *waits*: it is granted only
  when every transaction holding it shared (every one that wrote to the
  inbox) has ended, and a transaction's locks are released after its
  commit is visible. The daemon then empties the inbox once more, and sees
  every one of them. A transaction trying while the daemon waits fails its
  try (it does not queue behind a waiting request) and NOTIFYs.
* Nobody holds the lock when the daemon is down or has lost its connection:
  orders wait in the inbox, and the next connection starts by emptying it.

:class:`ModeRule` (pure, injected clock) decides when to switch;
:class:`Handoff` does the I/O on a connection of its own, which holds the
lock as a session lock.
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from order_monitor.db import CONNECTION_ERRORS, AsyncConn, Queries, close_within, connect_forever
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics

log = get_logger()


class Mode(enum.Enum):
    #: The daemon holds the idle lock: the trigger NOTIFYs.
    IDLE = "idle"
    #: The daemon does not hold it: the trigger writes to the inbox.
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class HandoffTiming:
    """When to switch, and how often to read the inbox while busy."""

    #: Orders per second (seen over ``burst_window``) at which NOTIFY starts to
    #: cost the application more than an inbox read every ``poll_interval``.
    busy_rate: float = 50.0
    burst_window: float = 0.2
    #: Below this many orders per second over ``calm_window`` the daemon goes
    #: back to NOTIFY (hysteresis: well below ``busy_rate``).
    idle_rate: float = 10.0
    calm_window: float = 2.0
    #: While busy, how long an empty inbox is left before it is read again:
    #: the most an order waits there, on top of the round trip.
    poll_interval: float = 0.005
    #: How long one request for the idle lock may wait for the transactions
    #: that hold it shared; on timeout the daemon stays busy and tries again
    #: after ``idle_retry``.
    lock_wait: float = 0.2
    idle_retry: float = 1.0
    #: While idle, how often the inbox is read anyway (it should be empty).
    idle_check: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.idle_rate < self.busy_rate:
            raise ValueError("need 0 < idle_rate < busy_rate")
        for name in ("burst_window", "calm_window", "poll_interval", "lock_wait", "idle_retry"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.calm_window < self.burst_window:
            raise ValueError("calm_window must be >= burst_window")


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


class Handoff:
    """Holds or releases the idle lock, and empties the inbox while busy.

    Ids taken from the inbox go where notified ids go (*on_orders*: the
    confirmer), never more than it has room for (*room*), so a backlog
    waits in the table, not in memory.
    """

    def __init__(
        self,
        dsn: str,
        queries: Queries,
        *,
        on_orders: Callable[[list[uuid.UUID]], None],
        room: Callable[[], int],
        listening: Callable[[], bool],
        metrics: Metrics,
        clock: Callable[[], float],
        timing: HandoffTiming | None = None,
        batch_size: int = 500,
        max_backoff: float = 30.0,
    ) -> None:
        self._dsn = dsn
        self._queries = queries
        self._on_orders = on_orders
        self._room = room
        self._listening = listening
        self._metrics = metrics
        self._clock = clock
        self.timing = timing or HandoffTiming()
        self.rule = ModeRule(self.timing)
        self._batch_size = batch_size
        self._max_backoff = max_backoff
        self.mode = Mode.BUSY
        metrics.handoff_busy.set(1)
        self._mode_since = clock()
        self._idle_refused_at: float | None = None
        #: None until the first connection tells; False on a version 1 install.
        self.inbox_installed: bool | None = None
        self._wake = asyncio.Event()

    def notified(self) -> None:
        """An order arrived by NOTIFY (called by the listener for each one)."""
        self.rule.observe(self._clock())
        if self.mode is Mode.IDLE:
            self._wake.set()

    async def run(self) -> None:
        """Forever; returns only by cancellation."""
        while True:
            conn = await self._connect()
            try:
                await self._serve(conn)
            except CONNECTION_ERRORS as exc:
                log.warning("handoff.lost", error=str(exc).strip() or type(exc).__name__)
            finally:
                # The lock goes with the session: orders wait in the inbox
                # until the next connection empties it.
                self._set_mode(Mode.BUSY, reason="connection closed")
                await close_within(conn, 5.0)

    async def _connect(self) -> AsyncConn:
        return await connect_forever(
            self._dsn, "handoff", event="handoff.connect_failed", max_wait=self._max_backoff
        )

    async def _serve(self, conn: AsyncConn) -> None:
        if not await self._installed(conn):
            await self._hold_until_installed(conn)
        while True:
            if self.mode is Mode.BUSY:
                await self._serve_busy(conn)
            else:
                await self._serve_idle(conn)

    async def _installed(self, conn: AsyncConn) -> bool:
        installed = await self._queries.inbox_installed(conn)
        if not installed and self.inbox_installed is not False:
            log.warning(
                "handoff.version_1_install",
                note="the installed trigger NOTIFYs for every order, which serialises the "
                "application's commits; run install.sql (version 2), then role.sql, to let it "
                "use the inbox",
            )
        self.inbox_installed = installed
        return installed

    async def _hold_until_installed(self, conn: AsyncConn) -> None:
        """On a version 1 install: hold the idle lock until version 2 appears.

        Held so that the moment the version 2 trigger is installed it
        NOTIFYs: no order waits in an inbox that nobody reads yet.
        """
        while not await self._queries.take_idle_lock(conn, self.timing.lock_wait):
            pass
        self._set_mode(Mode.IDLE, reason="version 1 install")
        installed = False
        while not installed:
            await asyncio.sleep(self.timing.idle_check)
            installed = await self._installed(conn)
        log.info("handoff.version_2_installed")
        await self._queries.give_idle_lock(conn)
        self._set_mode(Mode.BUSY, reason="version 2 installed")

    async def _serve_busy(self, conn: AsyncConn) -> None:
        _, more = await self._drain(conn)
        now = self._clock()
        calm = self.rule.wants(Mode.BUSY, now, since=self._mode_since) is Mode.IDLE
        may_retry = (
            self._idle_refused_at is None or now - self._idle_refused_at >= self.timing.idle_retry
        )
        # Only with the listener up: a NOTIFY nobody hears is lost (the
        # sweep would find the order, but late).
        if calm and may_retry and self._listening():
            if await self._go_idle(conn):
                return
            self._idle_refused_at = now
        if not more:
            await asyncio.sleep(self.timing.poll_interval)

    async def _serve_idle(self, conn: AsyncConn) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), self.timing.idle_check)
            woken = True
        except TimeoutError:
            woken = False
        if self.rule.wants(Mode.IDLE, self._clock(), since=self._mode_since) is Mode.BUSY:
            reason = "orders arriving fast"
        elif not self._listening():
            # Nobody would hear a NOTIFY: let orders wait in the inbox instead.
            reason = "listener down"
        else:
            reason = None
        if reason is not None:
            await self._queries.give_idle_lock(conn)
            self._set_mode(Mode.BUSY, reason=reason)
            return
        if woken:
            return
        strays, _ = await self._drain(conn)
        if strays:
            log.warning(
                "handoff.inbox_not_empty_while_idle",
                orders=strays,
                note="taken and checked; something other than our trigger writes to the inbox",
            )

    async def _go_idle(self, conn: AsyncConn) -> bool:
        if not await self._queries.take_idle_lock(conn, self.timing.lock_wait):
            log.debug("handoff.idle_lock_busy", waited_s=self.timing.lock_wait)
            return False
        self._set_mode(Mode.IDLE, reason="orders arriving slowly")
        # Every transaction that wrote to the inbox has ended (it held the
        # lock shared): this read sees the last of them.
        while (await self._drain(conn))[1]:
            pass
        return True

    async def _drain(self, conn: AsyncConn) -> tuple[int, bool]:
        """Take what the inbox holds, as far as there is room: (taken, more may wait)."""
        room = min(self._batch_size, self._room())
        if room <= 0:
            # The confirmer is behind: leave the ids in the table for now.
            await asyncio.sleep(self.timing.poll_interval)
            return 0, True
        ids = await self._queries.drain_inbox(conn, room)
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
