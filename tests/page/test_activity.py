"""The hour of checks per provider, with plain numbers for the clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from order_monitor.page.activity import CheckActivity, HourCounts


def test_counts_since_start_until_an_hour_has_passed() -> None:
    activity = CheckActivity(started=1000.0)
    totals = {("znet", "done"): 5.0, ("znet", "error"): 5.0}
    hour = activity.last_hour(1600.0, totals)
    assert hour["znet"].checks == 10
    assert hour["znet"].error_ratio == 0.5
    assert hour["znet"].window_s == 600.0


def test_checks_older_than_the_hour_drop_out() -> None:
    activity = CheckActivity(started=0.0)
    for minute in range(0, 121):
        # Ten checks a minute for the first hour, none after.
        done = float(min(minute, 60) * 10)
        activity.observe(minute * 60.0, {("znet", "done"): done})
    hour = activity.last_hour(120 * 60.0, {("znet", "done"): 600.0})
    assert hour == {}


def test_a_quiet_provider_has_no_ratio_to_show() -> None:
    assert HourCounts().error_ratio is None
    assert HourCounts({"pending": 3}).error_ratio == 0.0


def test_a_counter_that_went_down_is_counted_from_zero() -> None:
    activity = CheckActivity(started=0.0)
    activity.observe(60.0, {("znet", "done"): 50.0})
    # A new registry (a test's fresh Metrics) restarts the counter.
    assert activity.last_hour(120.0, {("znet", "done"): 7.0})["znet"].checks == 7


@given(steps=st.lists(st.tuples(st.floats(0, 600), st.integers(0, 50)), min_size=1, max_size=200))
def test_the_window_covers_the_hour_and_at_most_the_gap_between_readings_more(
    steps: list[tuple[float, int]],
) -> None:
    activity = CheckActivity(started=0.0)
    now = 0.0
    total = 0
    history = [(0.0, 0)]
    widest = 60.0
    for gap, checks in steps:
        now += gap
        # A reading is kept only when observed: the run loop observes every 15 s.
        widest = max(widest, gap)
        total += checks
        history.append((now, total))
        hour = activity.last_hour(now, {("p", "done"): float(total)})
        counted = hour["p"].checks if "p" in hour else 0
        window = hour["p"].window_s if "p" in hour else None
        # What the hour holds, at least: every check made within the last hour.
        inside = total - max(t for when, t in history if when <= max(0.0, now - 3600.0))
        assert counted >= inside
        # And nothing older than an hour plus the widest gap between readings.
        floor = now - 3600.0 - widest
        older = [t for when, t in history if when < floor]
        assert counted <= total - (max(older) if older else 0)
        if window is not None:
            assert window <= min(now, 3600.0 + widest)
