"""bench/trigger.py's first-check and busy-cpu parts: the arithmetic their figures rest on.

An order's lateness is measured against its own first slot (INITIAL_DELAY
with its jitter), a check inside the slot's pull window is early by design
and one before it is not; a server process's CPU is read from its stat line
whatever its title holds. No database, no daemon.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

# The bench's scripts import their helpers as top-level modules (``common``).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from trigger_bench.busy_cpu import _ticks, whose
from trigger_bench.first_check import lateness

from order_monitor.engine.policy import BackoffPolicy

POLICY = BackoffPolicy(initial_delay=5.0)
SENT = 1_000_000.0


def order(n: int) -> tuple[str, int, float]:
    """A reference, its key, and where its first slot falls (seconds since the epoch)."""
    key = uuid.UUID(int=n * 7919 + 1).int
    slot = POLICY.next_slot(key, None)
    assert slot is not None
    return f"d0.x.{n}", key, SENT + slot.offset


def test_lateness_is_against_the_orders_own_slot() -> None:
    (ref_a, key_a, due_a), (ref_b, key_b, due_b) = order(1), order(2)
    rows = {ref_a: (key_a, SENT), ref_b: (key_b, SENT)}
    result = lateness(rows, {ref_a: [due_a + 0.25], ref_b: [due_b + 0.75, due_b + 30]}, POLICY)
    assert result["measured"] == 2
    assert result["min_s"] == pytest.approx(0.25)
    assert result["max_s"] == pytest.approx(0.75)
    assert result["early"] == result["before_pull_window"] == result["missed"] == 0
    assert result["checked_twice_or_more"] == 1
    # Against the nominal sentAt + INITIAL_DELAY the jitter shows.
    assert result["vs_nominal"]["min_s"] == pytest.approx(
        min(due_a + 0.25, due_b + 0.75) - SENT - 5
    )


def test_early_within_the_pull_window_and_before_it_and_never() -> None:
    (ref_a, key_a, due_a), (ref_b, key_b, _), (ref_c, key_c, _) = order(3), order(4), order(5)
    slot_b = POLICY.next_slot(key_b, None)
    assert slot_b is not None
    rows = {ref_a: (key_a, SENT), ref_b: (key_b, SENT), ref_c: (key_c, SENT)}
    polls = {ref_a: [due_a - 0.01], ref_b: [SENT + slot_b.pull_from - 0.01]}
    result = lateness(rows, polls, POLICY)
    assert result["early"] == 2
    assert result["before_pull_window"] == 1
    assert result["missed"] == 1
    assert result["missed_examples"] == [ref_c]


def test_stat_line_with_a_title_that_holds_parentheses_and_spaces() -> None:
    stat = "4242 (postgres: x (y) z) S 2227 4242 4242 0 -1 4194368 1 0 0 0 44 186 7 9 20 0 1 0"
    assert _ticks(stat) == (2227, 44 + 186, 7 + 9)


def test_sessions_are_told_apart_by_database_and_application_name() -> None:
    known = {
        1: ("om", "order-monitor 0.5.0 (leader lock)", "client backend"),
        2: ("om", "", "client backend"),
        3: ("other", "order-monitor 0.5.0 (reader)", "client backend"),
        4: ("", "", "checkpointer"),
    }
    assert whose(1, known, "om", 99) == ("daemon", "leader lock")
    assert whose(2, known, "om", 99) == ("application", "client backend")
    assert whose(3, known, "om", 99)[0] == "other"
    assert whose(4, known, "om", 99) == ("other", "checkpointer")
    assert whose(99, known, "om", 99)[0] == "other"
