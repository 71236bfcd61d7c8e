"""The busy read's mark and interval (pure): which transactions' rows the next read returns."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from order_monitor.engine.changes import (
    MAX_MARK_AGE,
    MAX_READ_INTERVAL,
    MIN_READ_INTERVAL,
    READ_COST_FACTOR,
    Mark,
    read_interval,
    rows_pay,
)


def test_a_new_mark_reads_everything_then_from_the_last_snapshot() -> None:
    mark = Mark()
    assert mark.since() is None
    mark.read(1000)
    assert mark.since() == 1000
    mark.read(1500)
    assert mark.since() == 1500


def test_the_release_sets_the_mark_even_backwards() -> None:
    """Going busy: the snapshot taken with the release is the boundary, nothing older matters."""
    mark = Mark()
    mark.read(5000)
    mark.released(4000)
    assert mark.since() == 4000


def test_a_mark_is_exact_until_it_is_too_old_for_32_bit_ages() -> None:
    mark = Mark()
    assert not mark.exact_at(1000)  # no mark: the read takes everything anyway
    mark.read(1000)
    assert mark.exact_at(1000 + MAX_MARK_AGE)
    # A read after a long stall (a billion transactions without one): its
    # filtered result may have left rows out, so everything is read instead.
    assert not mark.exact_at(1000 + MAX_MARK_AGE + 1)


@given(st.integers(3, 2**40), st.integers(0, 2**33))
def test_an_exact_mark_is_always_within_32_bit_age_range(mark_xid: int, later: int) -> None:
    """Where exact_at holds, age(row xmin) and age(mark) are both below 2^31: no wrap."""
    mark = Mark()
    mark.read(mark_xid)
    if mark.exact_at(mark_xid + later):
        assert later < 2**31


def test_the_32_bit_id_skips_the_special_ids_after_a_wraparound() -> None:
    mark = Mark()
    mark.read(2**32 + 1)  # epoch 1, xid 1: not a normal id
    assert mark.since() is None
    mark.read(2**32 + 7)
    assert mark.since() == 7


@given(st.lists(st.integers(3, 2**40), max_size=50))
def test_the_mark_never_moves_back_on_reads_and_is_always_a_32_bit_normal_id(
    reads: list[int],
) -> None:
    mark = Mark()
    previous: int | None = None
    for xmin in reads:
        mark.read(xmin)
        if mark.value is not None and previous is not None:
            assert mark.value >= previous
        previous = mark.value
        since = mark.since()
        assert since is None or 3 <= since < 2**32


def test_the_interval_is_a_tenth_of_the_initial_delay_within_bounds() -> None:
    assert read_interval(60.0, 0.0) == MAX_READ_INTERVAL
    assert read_interval(5.0, 0.0) == 0.5
    assert read_interval(0.0, 0.0) == MIN_READ_INTERVAL


@given(st.floats(0, 86400), st.floats(0, 60))
def test_reads_never_take_more_than_a_tenth_of_the_time(delay: float, took: float) -> None:
    interval = read_interval(delay, took)
    assert interval >= READ_COST_FACTOR * took
    assert interval >= MIN_READ_INTERVAL
    assert interval <= max(MAX_READ_INTERVAL, READ_COST_FACTOR * took)


def test_rows_are_read_while_most_of_what_a_read_returns_is_new() -> None:
    assert rows_pay(taken=0, known=0)  # nothing yet: the next read's orders are new
    assert rows_pay(taken=5, known=5)
    assert not rows_pay(taken=4, known=5)  # the mark held back: ids cost less
    assert not rows_pay(taken=0, known=1)
