"""The handoff's mode rule, with an injected clock (plain numbers)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from order_monitor.engine.handoff import HandoffTiming, Mode, ModeRule

T = HandoffTiming(busy_rate=50, burst_window=0.2, idle_rate=10, calm_window=2.0)


def test_a_burst_makes_an_idle_daemon_busy_and_a_trickle_does_not() -> None:
    rule = ModeRule(T)
    for n in range(9):  # 9 in 0.2 s: 45/s, under 50/s
        rule.observe(100 + n * 0.02)
    assert rule.wants(Mode.IDLE, 100.18, since=0) is Mode.IDLE
    rule.observe(100.19)  # the tenth: 50/s
    assert rule.wants(Mode.IDLE, 100.19, since=0) is Mode.BUSY


def test_busy_lasts_a_whole_calm_window_then_ends_when_the_rate_falls() -> None:
    rule = ModeRule(T)
    rule.observe(10.0, 100)
    assert rule.wants(Mode.BUSY, 11.0, since=10.0) is Mode.BUSY  # too soon to judge
    assert rule.wants(Mode.BUSY, 11.9, since=9.0) is Mode.BUSY  # the burst is in the window
    assert rule.wants(Mode.BUSY, 12.1, since=9.0) is Mode.IDLE  # calm for a whole window


def test_hysteresis_a_rate_between_the_thresholds_keeps_either_mode() -> None:
    rule = ModeRule(T)
    now = 0.0
    for _ in range(400):  # 20/s: above idle_rate, below busy_rate
        now += 0.05
        rule.observe(now)
    assert rule.wants(Mode.BUSY, now, since=0) is Mode.BUSY
    assert rule.wants(Mode.IDLE, now, since=0) is Mode.IDLE


@given(st.lists(st.tuples(st.floats(0, 1000), st.integers(1, 100)), max_size=300))
def test_memory_stays_bounded_and_counts_never_exceed_what_was_seen(
    events: list[tuple[float, int]],
) -> None:
    rule = ModeRule(T)
    now = 0.0
    total = 0
    for gap, count in events:
        now += gap / 100
        rule.observe(now, count)
        total += count
        assert rule.seen_within(now, T.calm_window) <= total
    # Buckets of a tenth of the burst window, kept for the calm window.
    assert len(rule._buckets) <= T.calm_window / (T.burst_window / 10) + 2


@pytest.mark.parametrize(
    "bad",
    [
        {"idle_rate": 60.0},
        {"idle_rate": 0.0},
        {"poll_interval": 0.0},
        {"calm_window": 0.1},
        {"poll_max": 0.001},
        {"queue_busy": 0.0},
        {"queue_busy": 1.5},
    ],
)
def test_nonsensical_timings_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must be|need"):
        HandoffTiming(**bad)  # type: ignore[arg-type]
