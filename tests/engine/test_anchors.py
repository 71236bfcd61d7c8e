"""Orders whose dispatch time is unusable: anchored on when the daemon first saw them.

Pure: rows as the queries return them for such an order (elapsed 0, an issue
named), an injected clock, the real policy and decisions.
"""

from __future__ import annotations

import uuid

from structlog.testing import capture_logs

from order_monitor.config import Layout, OutcomeWrites
from order_monitor.db import ColumnLimits, InFlightRow, SweepRow
from order_monitor.db.dispatch import DispatchIssue
from order_monitor.engine.anchors import DispatchAnchors
from order_monitor.engine.decisions import decide
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.metrics import Metrics, counter_total
from order_monitor.providers.base import Outcome

POLICY = BackoffPolicy(
    initial_delay=60, base=30, cap=600, jitter=0.1, max_attempts=20, max_age=3600
)
LIMITS = ColumnLimits(pin_code=120, provider_message=None, last_message=250)
INFINITE = DispatchIssue("infinity", "sentAt")


def unusable_row(order: int, issue: DispatchIssue = INFINITE) -> InFlightRow:
    """The re-read of an order whose "sentAt" is unusable: read as dispatched just now."""
    return InFlightRow(uuid.UUID(int=order), "REF", "fake", None, 0.0, None, issue)


def test_an_unusable_dispatch_time_is_checked_on_schedule_and_given_up() -> None:
    """Without an anchor such an order reads as dispatched now at every check:
    polled every initial_delay for ever (1,440 requests a day at the default)."""
    anchors = DispatchAnchors(Layout(), Metrics())
    now, checks, kinds = 1000.0, 0, []
    while checks < 200:
        (row,) = anchors.settle([unusable_row(7)], now)
        decision = decide(
            row,
            "fake",
            Outcome.pending(),
            elapsed=row.elapsed,
            policy=POLICY,
            writes=OutcomeWrites(),
            limits=LIMITS,
        )
        checks += 1
        kinds.append(decision.kind)
        if decision.next_check_in is None:
            break
        now += decision.next_check_in
    assert kinds[-1] == "gave_up"
    assert checks <= POLICY.max_attempts + 1
    # Given up at max_age (or max_attempts) after it was first seen, not sooner.
    assert now - 1000.0 >= POLICY.slots(7)[-1].offset * 0.9


def test_each_such_order_is_warned_about_and_counted_once() -> None:
    metrics = Metrics()
    anchors = DispatchAnchors(Layout(), metrics)
    future = DispatchIssue("future", "sentAt", ahead_s=10800.4)
    missing = DispatchIssue("missing", None)
    with capture_logs() as logs:
        for now in (0.0, 5.0, 300.0):
            anchors.settle(
                [unusable_row(1), unusable_row(2, future), unusable_row(3, missing)], now
            )
    unusable = [e for e in logs if e["event"] == "order.dispatch_time_unusable"]
    ahead = [e for e in logs if e["event"] == "order.dispatch_time_in_future"]
    assert [(e["order_id"], e["column"]) for e in unusable] == [
        (str(uuid.UUID(int=1)), "sentAt"),
        (str(uuid.UUID(int=3)), None),
    ]
    assert unusable[0]["why"] == "sentAt is infinity"
    assert unusable[1]["why"] == "sentAt and createdAt are both NULL"
    assert [(e["order_id"], e["seconds_ahead"]) for e in ahead] == [
        (str(uuid.UUID(int=2)), 10800.4)
    ]
    assert all(e["log_level"] == "warning" for e in unusable + ahead)
    assert counter_total(metrics.dispatch_time_unusable) == 3
    assert counter_total(metrics.dispatch_time_unusable, reason="infinite") == 1
    assert counter_total(metrics.dispatch_time_unusable, reason="future") == 1
    assert counter_total(metrics.dispatch_time_unusable, reason="missing") == 1


def test_the_age_counts_from_first_seen_and_a_future_time_that_passes_does_not_reset_it() -> None:
    anchors = DispatchAnchors(Layout(), Metrics())
    future = DispatchIssue("future", "sentAt", ahead_s=120.0)
    key = 9
    (first,) = anchors.settle([SweepRow(uuid.UUID(int=key), "fake", 0.0, None, None, future)], 50.0)
    assert first.elapsed == 0.0
    (later,) = anchors.settle([unusable_row(key, future)], 110.0)
    assert later.elapsed == 60.0
    # Its "sentAt" has come: the server now says 10 s, the anchor 200 s.
    usable = InFlightRow(uuid.UUID(int=key), "REF", "fake", None, 10.0, 5.0)
    (after,) = anchors.settle([usable], 250.0)
    assert after.elapsed == 200.0
    assert after.last_checked is None  # on the server's scale, not the anchor's
    # An order with a usable time and no anchor is left as it is.
    plain = InFlightRow(uuid.UUID(int=10), "REF", "fake", None, 30.0, 20.0)
    assert anchors.settle([plain], 250.0) == [plain]
    assert 10 not in anchors


def test_anchors_are_kept_only_for_live_orders() -> None:
    anchors = DispatchAnchors(Layout(), Metrics())
    anchors.settle([unusable_row(n) for n in range(100)], 0.0)
    assert len(anchors) == 100
    anchors.drop([0, 1])
    assert len(anchors) == 98
    assert anchors.retain(lambda key: key % 2 == 0) == 49
    assert len(anchors) == 49
    # An order met again after it was dropped is anchored anew.
    (row,) = anchors.settle([unusable_row(1)], 500.0)
    assert row.elapsed == 0.0


def test_a_table_of_unusable_times_is_warned_about_ten_orders_an_interval_not_a_line_each() -> None:
    # A shop stamping every order hours ahead (local time stored as UTC):
    # a line per order would flood the journal; each is still counted.
    metrics = Metrics()
    anchors = DispatchAnchors(Layout(), metrics)
    with capture_logs() as logs:
        anchors.settle([unusable_row(n) for n in range(1, 501)], 1000.0)
        anchors.settle([unusable_row(n) for n in range(501, 601)], 1030.0)
        anchors.settle([unusable_row(601)], 1060.0)
    named = [e for e in logs if e["event"] == "order.dispatch_time_unusable"]
    suppressed = [e for e in logs if e["event"] == "order.dispatch_time_warnings_suppressed"]
    assert len(named) == 11  # ten in the first interval, the first of the next
    assert [e["orders"] for e in suppressed] == [590]
    assert counter_total(metrics.dispatch_time_unusable) == 601
