"""The ledger of orders that gave up, with plain numbers for the clock."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from order_monitor.page.ledger import GaveUpLedger


def _ids(n: int) -> list[uuid.UUID]:
    return [uuid.UUID(int=i + 1) for i in range(n)]


def test_newest_first_and_nothing_older_than_the_window() -> None:
    ledger = GaveUpLedger(window=100.0)
    a, b, c = _ids(3)
    ledger.record(a, 10.0)
    ledger.record(b, 50.0)
    ledger.record(c, 90.0)
    assert ledger.recent(100.0) == [c, b, a]
    assert ledger.recent(120.0) == [c, b]


def test_a_seed_keeps_what_the_writer_recorded_while_it_ran() -> None:
    ledger = GaveUpLedger()
    a, b, c = _ids(3)
    ledger.record(c, 500.0)  # given up while the table was being read
    ledger.seed([(a, 100.0), (b, 200.0), (c, 480.0)], term=1)
    assert ledger.recent(600.0) == [c, b, a]
    assert ledger.seeded_for == 1


def test_forgotten_orders_leave_and_the_capacity_holds() -> None:
    ledger = GaveUpLedger(capacity=2)
    a, b, c = _ids(3)
    for at, order in enumerate((a, b, c)):
        ledger.record(order, float(at))
    assert ledger.recent(3.0) == [c, b]
    assert ledger.overflowed
    ledger.forget([b])
    assert ledger.recent(3.0) == [c]


@given(
    events=st.lists(st.tuples(st.integers(1, 20), st.floats(0, 50)), min_size=0, max_size=100),
    capacity=st.integers(1, 10),
)
def test_recent_is_ordered_unique_and_bounded(
    events: list[tuple[int, float]], capacity: int
) -> None:
    ledger = GaveUpLedger(window=200.0, capacity=capacity)
    now = 0.0
    for order, gap in events:
        now += gap
        ledger.record(uuid.UUID(int=order), now)
        recent = ledger.recent(now)
        assert len(recent) == len(set(recent)) <= capacity
        assert recent[0] == uuid.UUID(int=order)
