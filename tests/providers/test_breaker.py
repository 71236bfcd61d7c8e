"""The token bucket and the circuit breaker (breaker.py): pure, plain numbers, no sleeping."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from order_monitor.providers.breaker import Admission, BreakerState, CircuitBreaker, TokenBucket
from tests.providers import state_of


def test_bucket_lets_a_burst_through_then_spaces_requests_by_one_over_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)
    assert [bucket.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.reserve(0.0) == pytest.approx(0.5)
    assert bucket.reserve(0.0) == pytest.approx(1.0)


def test_bucket_refills_with_time_but_never_beyond_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=2, now=0.0)
    bucket.reserve(0.0)
    bucket.reserve(0.0)
    assert bucket.reserve(0.5) == pytest.approx(0.5)  # half a token came back
    # A long idle spell saves up at most `burst` tokens.
    assert [bucket.reserve(100.0) for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


def test_bucket_ignores_a_clock_that_goes_backwards() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.reserve(10.0) == 0.0
    assert bucket.reserve(5.0) == pytest.approx(1.0)


@given(
    rate=st.floats(min_value=0.5, max_value=50),
    burst=st.integers(min_value=1, max_value=5),
    gaps=st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=60),
)
def test_bucket_never_allows_more_than_burst_plus_rate_times_window(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst, now=0.0)
    now, sends = 0.0, []
    for gap in gaps:
        now += gap
        sends.append(now + bucket.reserve(now))
    sends.sort()
    for i, start in enumerate(sends):
        for j in range(i, len(sends)):
            window = sends[j] - start
            assert j - i + 1 <= burst + rate * window + 1e-6


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=0, burst=1, now=0)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(rate=1, burst=0, now=0)


GO = Admission(allowed=True)


def test_breaker_opens_after_threshold_consecutive_failures_only() -> None:
    b = CircuitBreaker(threshold=3, cooldown=30)
    b.record_failure(GO, now=0)
    b.record_failure(GO, now=1)
    b.record_success(GO)  # breaks the streak
    b.record_failure(GO, now=2)
    b.record_failure(GO, now=3)
    assert state_of(b) is BreakerState.CLOSED
    b.record_failure(GO, now=4)
    assert state_of(b) is BreakerState.OPEN
    assert b.failures == 3


def test_open_breaker_defers_for_the_rest_of_the_cooldown() -> None:
    b = CircuitBreaker(threshold=1, cooldown=30)
    b.record_failure(GO, now=100)
    assert b.blocked_for(110) == pytest.approx(20)
    admission = b.admit(110)
    assert not admission.allowed
    assert admission.retry_after == pytest.approx(20)
    assert state_of(b) is BreakerState.OPEN


def test_after_cooldown_exactly_one_probe_goes() -> None:
    b = CircuitBreaker(threshold=1, cooldown=30, probe_wait=7)
    b.record_failure(GO, now=0)
    assert b.blocked_for(30) is None
    probe = b.admit(30)
    assert probe.allowed
    assert probe.probe
    assert state_of(b) is BreakerState.HALF_OPEN
    second = b.admit(30.1)
    assert not second.allowed
    assert second.retry_after == 7
    assert b.blocked_for(31) == 7


def test_probe_success_closes_and_failure_reopens_for_a_full_cooldown() -> None:
    b = CircuitBreaker(threshold=2, cooldown=30)
    b.record_failure(GO, now=0)
    b.record_failure(GO, now=0)
    probe = b.admit(30)
    b.record_failure(probe, now=31)
    assert state_of(b) is BreakerState.OPEN
    assert b.blocked_for(40) == pytest.approx(21)
    probe = b.admit(61)
    b.record_success(probe)
    assert state_of(b) is BreakerState.CLOSED
    assert b.failures == 0
    b.record_failure(GO, now=62)  # the count starts over
    assert state_of(b) is BreakerState.CLOSED


def test_results_of_requests_sent_before_opening_change_nothing() -> None:
    b = CircuitBreaker(threshold=1, cooldown=30)
    straggler = b.admit(0)
    b.record_failure(GO, now=0)
    b.record_success(straggler)  # answered late, while open
    assert state_of(b) is BreakerState.OPEN
    b.admit(30)  # the probe is out
    b.record_success(straggler)
    b.record_failure(straggler, now=31)
    assert state_of(b) is BreakerState.HALF_OPEN


def test_a_released_probe_lets_the_next_request_probe() -> None:
    b = CircuitBreaker(threshold=1, cooldown=30)
    b.record_failure(GO, now=0)
    probe = b.admit(30)
    b.release(probe)
    assert state_of(b) is BreakerState.HALF_OPEN
    assert b.admit(31).probe
