"""What is happening: counts from the table and the daemon, and the live view that shows them."""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, TextIO

import psycopg
from psycopg import sql

from order_monitor.config import Layout, OutcomeWrites
from order_monitor.daemon import Daemon
from order_monitor.delivery.store import OutboxStore
from order_monitor.demo.application import Application
from order_monitor.metrics import counter_total
from order_monitor.providers.fake import FakeProvider


@dataclass(frozen=True, slots=True)
class Snapshot:
    elapsed: float
    orders: int
    dispatched: int
    pending: int
    done: int
    failed: int
    gave_up: int
    checks: float
    checks_per_s: float
    requests: int
    errors: float
    #: The daemon's backoff queue: orders waiting for their next check...
    waiting: int
    #: ...and orders whose check is under way.
    checking: int
    next_in: float | None
    lag: float
    #: Orders the application finished (its status word), through the actions.
    approved: int = 0
    rejected: int = 0
    #: Outbox entries not delivered yet, and the dead letters.
    undelivered: int = 0
    dead: int = 0

    @property
    def ended(self) -> int:
        return self.done + self.failed + self.gave_up

    @property
    def all_ended(self) -> bool:
        return self.dispatched == self.orders and self.ended == self.orders

    @property
    def all_delivered(self) -> bool:
        """Every order ended and every delivery is settled (delivered, or a dead letter).

        The write function records an order's delivery in the transaction
        that ends it, so an ended order with nothing undelivered is delivered.
        """
        return self.all_ended and self.undelivered == 0


class Tally:
    """Counts from the table (the truth) and from the daemon (its queue and checks)."""

    def __init__(
        self,
        app: Application,
        daemon: Daemon,
        fake: FakeProvider,
        writes: OutcomeWrites,
        layout: Layout,
    ) -> None:
        self._app = app
        self._outbox = OutboxStore(layout)
        self._daemon = daemon
        self._fake = fake
        self._started = time.monotonic()
        self._window: deque[tuple[float, float]] = deque()
        self._count = sql.SQL(
            "SELECT pg_catalog.count(*) FILTER (WHERE provider_referans IS NOT NULL),"
            ' pg_catalog.count(*) FILTER (WHERE "externalStatus" = {done}),'
            ' pg_catalog.count(*) FILTER (WHERE "externalStatus" = {failed}),'
            ' pg_catalog.count(*) FILTER (WHERE "externalStatus" = {gave_up}),'
            " pg_catalog.count(*) FILTER (WHERE status = 'approved'),"
            " pg_catalog.count(*) FILTER (WHERE status = 'rejected')"
            " FROM product_orders"
        ).format(
            done=sql.Literal(writes.done_external_status),
            failed=sql.Literal(writes.failed_external_status),
            gave_up=sql.Literal(writes.gave_up_external_status),
        )

    async def snapshot(self, conn: psycopg.AsyncConnection[Any]) -> Snapshot:
        cursor = await conn.execute(self._count)
        row = await cursor.fetchone()
        assert row is not None
        in_table, done, failed, gave_up, approved, rejected = (int(v) for v in row)
        outbox = await self._outbox.summary(conn)
        now = time.monotonic()
        metrics = self._daemon.metrics
        checks = counter_total(metrics.checks)
        # Checks per second over the last two seconds: steady, yet current.
        self._window.append((now, checks))
        while len(self._window) > 2 and now - self._window[0][0] > 2.0:
            self._window.popleft()
        first_at, first_checks = self._window[0]
        per_s = (checks - first_checks) / (now - first_at) if now > first_at else 0.0
        scheduler = self._daemon.scheduler
        next_due = scheduler.next_due()
        return Snapshot(
            elapsed=now - self._started,
            orders=len(self._app.references),
            dispatched=self._app.dispatched,
            pending=in_table - done - failed - gave_up,
            done=done,
            failed=failed,
            gave_up=gave_up,
            checks=checks,
            checks_per_s=per_s,
            requests=self._fake.requests_total,
            errors=counter_total(metrics.checks, outcome="error"),
            waiting=scheduler.scheduled,
            checking=scheduler.in_flight,
            # The daemon's clock is time.monotonic (its default).
            next_in=None if next_due is None else max(0.0, next_due - now),
            lag=scheduler.lag(now),
            approved=approved,
            rejected=rejected,
            undelivered=outbox.undelivered,
            dead=outbox.dead,
        )


class LiveView:
    """The run as it happens.

    On a terminal the block of lines is redrawn in place (plain ANSI: cursor
    up, clear line); elsewhere (a pipe, a CI log) one line a second, so the
    output stays readable as a log.
    """

    HIDE_CURSOR: Final = "\x1b[?25l"
    SHOW_CURSOR: Final = "\x1b[?25h"

    def __init__(self, out: TextIO, header: str, *, tty: bool | None = None) -> None:
        self._out = out
        self._header = header
        self.tty = _is_terminal(out) if tty is None else tty
        self._drawn = 0
        self._last_line = float("-inf")
        self._last_text = ""
        self._closed = False

    @property
    def period(self) -> float:
        """How often to sample: smooth on a terminal, calm in a log."""
        return 0.25 if self.tty else 0.5

    def start(self) -> None:
        self._write(self._header + "\n")
        if self.tty:
            self._write(self.HIDE_CURSOR)

    def update(self, snap: Snapshot, *, final: bool = False) -> None:
        if self.tty:
            self._redraw(self.frame(snap))
        elif final or snap.elapsed - self._last_line >= 1.0:
            self._last_line = snap.elapsed
            line = self.line(snap)
            if line != self._last_text:  # the final sample often repeats the last line
                self._last_text = line
                self._write(line + "\n")

    def note(self, text: str) -> None:
        """A line above the progress (the frame, on a terminal, is drawn again below it)."""
        if self.tty and self._drawn:
            # Up to the frame's first line, clear to the end of the screen.
            self._write(f"\x1b[{self._drawn}A\r\x1b[J")
            self._drawn = 0
        self._write(text + "\n")

    def close(self) -> None:
        if self.tty and not self._closed:
            self._closed = True
            self._write(self.SHOW_CURSOR)

    def frame(self, s: Snapshot) -> list[str]:
        ended = s.ended / s.orders if s.orders else 1.0
        width = 40
        filled = round(width * ended)
        next_in = "-" if s.next_in is None else f"{s.next_in:.1f} s"
        return [
            f"  elapsed {s.elapsed:6.1f} s    dispatched {s.dispatched:>6} / {s.orders}",
            f"  pending {s.pending:>6}    done {s.done:>6}    failed {s.failed:>5}"
            f"    gave up {s.gave_up:>5}",
            f"  checks/s {s.checks_per_s:7.1f}    provider requests {s.requests:>6}"
            f"    errors {s.errors:>5.0f}",
            f"  backoff queue {s.waiting:>6} waiting, {s.checking:>4} being checked,"
            f" next in {next_in}, lag {s.lag:.2f} s",
            f"  application: approved {s.approved:>6}    rejected {s.rejected:>5}"
            f"    undelivered {s.undelivered:>5}    dead letters {s.dead:>4}",
            f"  [{'#' * filled}{'.' * (width - filled)}] {ended:4.0%} ended",
        ]

    def line(self, s: Snapshot) -> str:
        return (
            f"[{s.elapsed:5.1f}s] dispatched {s.dispatched}/{s.orders}  pending {s.pending}"
            f"  done {s.done}  failed {s.failed}  gave up {s.gave_up}"
            f"  checks/s {s.checks_per_s:.1f}  backoff queue {s.waiting}"
            f" (+{s.checking} being checked)  lag {s.lag:.2f}s"
            f"  approved {s.approved}  rejected {s.rejected}  undelivered {s.undelivered}"
        )

    def _redraw(self, lines: list[str]) -> None:
        up = f"\x1b[{self._drawn}A" if self._drawn else ""
        self._write(up + "".join(f"\r\x1b[2K{text}\n" for text in lines))
        self._drawn = len(lines)

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


def _is_terminal(out: TextIO) -> bool:
    try:
        return out.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False
