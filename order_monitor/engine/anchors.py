"""An age for orders whose dispatch time cannot be used: when the daemon first saw them.

The schedule is a function of the time since dispatch (engine.policy). An
order whose "sentAt" (else "createdAt") is NULL, infinite or in the future
reads as dispatched just now (db.dispatch), so on its own it would be checked
every initial_delay for ever and never given up: 1,440 requests a day each.
Here such an order is anchored on the first moment this process saw it, and
every row read of it (sweep, confirm, re-read) carries the age since then:
the schedule advances, and max_age and max_attempts bind as for any order.

Decided:

* the anchor is per process, in memory: a restarted daemon starts such an
  order's schedule over (its max_age counts from the restart). Persisting it
  would mean writing to the application's row, which only outcomes do;
* a future dispatch time is treated as "dispatched now" (a shop storing
  local time as UTC would otherwise have every order parked for hours);
  once that time has passed the anchor still wins while it is older, so the
  schedule does not jump back;
* an order keeps its anchor while it is live: entries are dropped when it
  leaves flight (the checker's re-read does not find it) or when a complete
  sweep neither found it nor left it in the schedule, so memory is bounded
  by the orders in flight whose time is unusable;
* each such order is counted once in
  ``order_monitor_dispatch_time_unusable_total{reason}`` and warned about
  once while it is anchored (``order.dispatch_time_unusable`` /
  ``order.dispatch_time_in_future``), at most :data:`WARNINGS_PER_INTERVAL`
  lines an interval: a shop whose every order is stamped hours ahead would
  otherwise write a line per order, and past journald's rate limit the
  daemon's own errors are the lines dropped. The rest of an interval is one
  ``order.dispatch_time_warnings_suppressed`` line with their count.

Pure apart from the log and the metric; the clock is the caller's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Final, TypeVar

from order_monitor.config import Layout
from order_monitor.db import InFlightRow, SweepRow
from order_monitor.db.dispatch import DispatchIssue
from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics

log = get_logger()

Row = TypeVar("Row", SweepRow, InFlightRow)

#: Orders named one by one per interval; the rest are counted in one line.
WARNINGS_PER_INTERVAL: Final = 10
WARNING_INTERVAL: Final = 60.0


class DispatchAnchors:
    """First-seen times of orders whose dispatch time is unusable, by order key."""

    __slots__ = (
        "_first_seen",
        "_interval_started",
        "_layout",
        "_metrics",
        "_suppressed",
        "_warned",
    )

    def __init__(self, layout: Layout, metrics: Metrics) -> None:
        self._layout = layout
        self._metrics = metrics
        self._first_seen: dict[int, float] = {}
        self._interval_started = float("-inf")
        self._warned = 0
        self._suppressed = 0

    def settle(self, rows: Sequence[Row], now: float) -> list[Row]:
        """*rows*, those of anchored orders with their age since first seen.

        *now* is the caller's clock at the moment the rows were read.
        """
        if not self._first_seen and all(row.dispatch_issue is None for row in rows):
            return list(rows)  # the usual case, and a sweep's pages are big
        return [self._settle(row, now) for row in rows]

    def _settle(self, row: Row, now: float) -> Row:
        key = row.id.int
        first = self._first_seen.get(key)
        issue = row.dispatch_issue
        if first is None:
            if issue is None:
                return row
            first = self._first_seen[key] = now
            self._announce(row, issue, now)
        anchored = now - first
        if issue is None and row.elapsed >= anchored:
            return row  # the time became usable, and is the older
        # The last check's time is on the row's own scale, not the anchor's:
        # dropped, so at worst one check comes early after a re-schedule.
        return replace(row, elapsed=max(row.elapsed, anchored), last_checked=None)

    def _announce(self, row: SweepRow | InFlightRow, issue: DispatchIssue, now: float) -> None:
        self._metrics.dispatch_time_unusable.labels(issue.reason).inc()
        if now - self._interval_started >= WARNING_INTERVAL:
            if self._suppressed:
                log.warning(
                    "order.dispatch_time_warnings_suppressed",
                    orders=self._suppressed,
                    interval_s=WARNING_INTERVAL,
                    note="more orders with an unusable dispatch time: see "
                    "order_monitor_dispatch_time_unusable_total and `order-monitor status`",
                )
            self._interval_started, self._warned, self._suppressed = now, 0, 0
        if self._warned >= WARNINGS_PER_INTERVAL:
            self._suppressed += 1
            return
        self._warned += 1
        if issue.why == "future":
            log.warning(
                "order.dispatch_time_in_future",
                order_id=str(row.id),
                column=issue.column,
                seconds_ahead=round(issue.ahead_s or 0.0, 1),
                note="treated as dispatched when first seen (is local time stored as UTC?)",
            )
            return
        log.warning(
            "order.dispatch_time_unusable",
            order_id=str(row.id),
            column=issue.column,
            why=issue.describe(self._layout),
            note="its checks are scheduled from when the daemon first saw it",
        )

    def drop(self, keys: Iterable[int]) -> None:
        """Forget these orders (they left flight)."""
        for key in keys:
            self._first_seen.pop(key, None)

    def retain(self, keep: Callable[[int], bool]) -> int:
        """Keep only the orders *keep* says are live; returns how many were dropped."""
        gone = [key for key in self._first_seen if not keep(key)]
        self.drop(gone)
        return len(gone)

    def __contains__(self, key: object) -> bool:
        return key in self._first_seen

    def __len__(self) -> int:
        return len(self._first_seen)
