"""The retry delays and the dead-letter age: plain numbers and datetimes, no clock."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from order_monitor.delivery.backoff import (
    AUTH_RETRY,
    FIRST_RETRY,
    MAX_RETRY,
    expired,
    retry_delay,
)
from order_monitor.delivery.model import Entry
from tests.delivery.test_requests import make_action

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def entry_at(recorded_at: datetime) -> Entry:
    return Entry(uuid.uuid4(), uuid.uuid4(), "done", None, None, {}, recorded_at)


def test_the_first_retry_waits_five_seconds_then_each_doubles() -> None:
    assert retry_delay(1) == 5.0
    assert [retry_delay(n) for n in range(2, 6)] == [10.0, 20.0, 40.0, 80.0]


def test_the_delay_is_capped_at_half_an_hour_so_money_is_looked_at_twice_an_hour() -> None:
    assert MAX_RETRY <= 1800.0
    capped = [n for n in range(1, 40) if retry_delay(n) == MAX_RETRY]
    # Reached, and kept from there on (not a spike back down).
    assert capped == list(range(capped[0], 40))
    assert retry_delay(capped[0] - 1) < MAX_RETRY


def test_days_of_retries_neither_overflow_nor_grow() -> None:
    # Three days at the cap is ~150 tries; a corrupt count far more.
    for tries in (150, 10_000, 10**9):
        assert retry_delay(tries) == MAX_RETRY


def test_a_count_below_one_is_the_first_retry_not_a_hot_loop() -> None:
    assert retry_delay(0) == retry_delay(-3) == FIRST_RETRY


@given(st.integers(min_value=-5, max_value=10**6))
def test_delays_are_positive_bounded_and_never_shrink(tries: int) -> None:
    delay = retry_delay(tries)
    assert FIRST_RETRY <= delay <= MAX_RETRY
    assert math.isfinite(delay)
    assert retry_delay(tries + 1) >= delay
    # Deterministic: no jitter (batched retries are one request anyway).
    assert retry_delay(tries) == delay


def test_a_refused_credential_waits_a_minute() -> None:
    assert AUTH_RETRY == 60.0


def test_expired_at_max_age_not_a_microsecond_before() -> None:
    action = make_action(max_age=3600.0)
    entry = entry_at(T0)
    assert not expired(entry, action, T0 + timedelta(seconds=3600) - timedelta(microseconds=1))
    assert expired(entry, action, T0 + timedelta(seconds=3600))
    assert expired(entry, action, T0 + timedelta(days=30))


def test_a_clock_behind_the_recording_is_not_expired() -> None:
    # Another instance's clock a little behind: young, not dead.
    assert not expired(entry_at(T0), make_action(max_age=60.0), T0 - timedelta(minutes=5))


@given(
    age=st.floats(min_value=0, max_value=10 * 86400, allow_nan=False),
    max_age=st.floats(min_value=1, max_value=5 * 86400, allow_nan=False),
)
def test_expired_is_age_at_least_max_age(age: float, max_age: float) -> None:
    now = T0 + timedelta(seconds=age)
    real_age = (now - T0).total_seconds()  # timedelta rounds to microseconds
    assert expired(entry_at(T0), make_action(max_age=max_age), now) is (real_age >= max_age)
