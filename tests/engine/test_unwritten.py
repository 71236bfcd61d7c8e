"""The held results: when each is tried again, when a pending one gives way to its slot."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from order_monitor.db import InFlightRow
from order_monitor.engine.decisions import Decision
from order_monitor.engine.unwritten import RETRY_CAP, RETRY_FIRST, Unwritten, retry_delay
from order_monitor.providers.base import Outcome


def _decision(kind: str, *, n: int = 1, next_check_in: float | None = None) -> Decision:
    row = InFlightRow(uuid.UUID(int=n), f"R{n}", "fake", None, elapsed=10.0, last_checked=None)
    return Decision(row, "fake", Outcome.unknown(), kind, next_check_in=next_check_in)


def test_retries_double_from_a_second_up_to_half_a_minute() -> None:
    assert [retry_delay(a) for a in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert retry_delay(10_000) == RETRY_CAP
    with pytest.raises(ValueError, match="counts from 1"):
        retry_delay(0)


def test_a_finished_result_is_held_until_written_however_long() -> None:
    held = Unwritten()
    done = _decision("done")
    first = held.hold(done, reason="locked", since=100.0, now=100.5)
    assert first.retry_at == 100.5 + RETRY_FIRST
    assert held.take_due(101.0, 10) == []
    (retry,) = held.take_due(101.5, 10)
    assert len(held) == 0  # handed out for the retry
    # The retry did not take either: the backoff goes on, the age does not restart.
    again = held.hold(done, reason="locked", since=101.5, now=101.6, previous=retry)
    assert (again.attempts, again.since, again.retry_at) == (2, 100.0, 101.6 + 2.0)
    now = 101.6
    for attempt in range(3, 40):
        (retry,) = held.take_due(held.next_retry_at() or now, 10)
        now = retry.retry_at
        retry = held.hold(done, reason="database", since=now, now=now, previous=retry)
        assert retry.attempts == attempt
    assert held.take_expired(now + 10 * 86_400) == []  # never dropped
    assert held.oldest_since() == 100.0


def test_a_pending_result_gives_way_to_the_orders_next_slot() -> None:
    held = Unwritten()
    pending = _decision("pending", next_check_in=2.5)
    entry = held.hold(pending, reason="database", since=10.0, now=10.0)
    assert entry.expires_at == 12.5
    (retry,) = held.take_due(11.0, 10)
    entry = held.hold(pending, reason="database", since=11.0, now=11.0, previous=retry)
    # The next try would be after the slot: it comes at the slot, and is a drop.
    assert entry.retry_at == 12.5
    assert held.take_due(12.5, 10) == []
    (dropped,) = held.take_expired(12.5)
    assert dropped.decision is pending
    assert len(held) == 0


def test_the_oldest_results_are_retried_first_within_a_batch() -> None:
    held = Unwritten()
    for n in range(5):
        held.hold(_decision("done", n=n), reason="locked", since=float(10 - n), now=20.0)
    taken = held.take_due(21.0, 2)
    assert [h.since for h in taken] == [6.0, 7.0]
    assert len(held) == 3


@given(
    st.lists(
        st.tuples(
            st.integers(0, 30),
            st.sampled_from(["done", "pending"]),
            st.floats(0, 5),
            st.booleans(),
        ),
        max_size=200,
    )
)
def test_at_most_one_result_is_held_per_order(
    events: list[tuple[int, str, float, bool]],
) -> None:
    held = Unwritten()
    model: set[int] = set()
    now = 0.0
    for order, kind, step, retry_first in events:
        now += step
        previous = None
        if retry_first:
            due = held.take_due(now, 100)
            gone = due + held.take_expired(now)
            model -= {h.decision.row.id.int for h in gone}
            previous = next((h for h in due if h.decision.row.id.int == order), None)
        decision = _decision(kind, n=order, next_check_in=3.0 if kind == "pending" else None)
        held.hold(decision, reason="locked", since=now, now=now, previous=previous)
        model.add(order)
        assert len(held) == len(model)
        assert all(o in held for o in model)
