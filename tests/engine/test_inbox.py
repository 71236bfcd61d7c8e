"""The notification inbox: bounded, de-duplicated, oldest first (pure)."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from order_monitor.config import Layout
from order_monitor.db import ManagedConnection, Queries, SweepRow
from order_monitor.engine.inbox import Confirmer, Inbox
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.metrics import Metrics
from tests.engine.test_flow import FailsOnceScheduler


def test_ids_come_out_oldest_first_once_each() -> None:
    inbox = Inbox(capacity=10)
    for order in (3, 1, 3, 2, 1):
        assert inbox.add(order)
    assert inbox.take(2) == [3, 1]
    assert inbox.take(10) == [2]
    assert len(inbox) == 0


def test_a_full_inbox_drops_and_counts_what_it_cannot_hold() -> None:
    inbox = Inbox(capacity=2)
    assert [inbox.add(o) for o in (1, 2, 3, 4, 1)] == [True, True, False, False, True]
    assert inbox.take_dropped() == 2
    assert inbox.take_dropped() == 0
    assert inbox.take(5) == [1, 2]
    assert inbox.add(3)  # room again


@given(
    capacity=st.integers(1, 50),
    steps=st.lists(st.one_of(st.integers(0, 100), st.just(-1)), max_size=300),
)
def test_never_holds_more_than_its_capacity_and_loses_nothing_silently(
    capacity: int, steps: list[int]
) -> None:
    inbox = Inbox(capacity)
    held: dict[int, None] = {}
    dropped = 0
    for step in steps:
        if step < 0:
            out = inbox.take(3)
            assert out == list(held)[:3]
            for order in out:
                del held[order]
        elif inbox.add(step):
            held.setdefault(step, None)
        else:
            assert step not in held
            dropped += 1
        assert len(inbox) == len(held) <= capacity
        assert inbox.high_water <= capacity
    assert inbox.take_dropped() == dropped


def test_a_bug_scheduling_a_busy_reads_rows_asks_for_a_sweep_and_does_not_raise() -> None:
    """found() runs in the handoff's task: raising there would stop the busy reads."""
    scheduler = FailsOnceScheduler()
    lost: list[None] = []
    confirmer = Confirmer(
        Inbox(10),
        ManagedConnection("", "unused"),  # found() reads nothing
        Queries(Layout()),
        scheduler,
        policy=BackoffPolicy(),
        batch_size=10,
        metrics=Metrics(),
        clock=lambda: 100.0,
        on_scheduled=lambda: None,
        on_lost=lambda: lost.append(None),
    )
    rows = [SweepRow(uuid.uuid4(), "fake", 1.0, None, "R") for _ in range(2)]
    with capture_logs() as logs:
        confirmer.found(rows)
    assert [e["event"] for e in logs] == ["handoff.schedule_unexpected_error"]
    assert lost == [None]
    confirmer.found(rows)
    assert all(row.id.int in scheduler for row in rows)
