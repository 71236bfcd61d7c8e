"""The backoff policy: pure, tested with plain numbers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from order_monitor.engine.policy import BackoffPolicy, describe, format_seconds

NO_JITTER = BackoffPolicy(jitter=0.0)


def test_default_schedule_starts_at_initial_delay_then_doubles_from_30s() -> None:
    offsets = [s.offset for s in NO_JITTER.slots(1)][:6]
    assert offsets == [60, 90, 150, 270, 510, 990]


def test_gaps_are_capped() -> None:
    gaps = [s.gap for s in NO_JITTER.slots(1)]
    assert max(gaps) == NO_JITTER.cap
    assert gaps[-1] == NO_JITTER.cap


def test_default_limits_bind_together() -> None:
    """Neither limit makes the other meaningless: the 20th attempt lands in the
    last cap-length stretch before max_age."""
    slots = NO_JITTER.slots(1)
    assert len(slots) == NO_JITTER.max_attempts
    assert NO_JITTER.max_age - NO_JITTER.cap < slots[-1].offset <= NO_JITTER.max_age


def test_max_age_cuts_the_schedule() -> None:
    policy = BackoffPolicy(jitter=0.0, max_attempts=100, max_age=3600)
    slots = policy.slots(1)
    assert slots[-1].offset <= 3600
    assert len(slots) < 100


def test_an_old_order_is_still_checked_once() -> None:
    policy = BackoffPolicy(initial_delay=7200, max_age=3600, jitter=0.0)
    assert [s.offset for s in policy.slots(1)] == [7200]


def test_next_slot_resumes_from_the_last_check_not_from_attempt_one() -> None:
    # Last synced 20 min after dispatch: the next check is the slot after that.
    slot = NO_JITTER.next_slot(1, last_checked=20 * 60)
    assert slot is not None
    assert (slot.attempt, slot.offset) == (7, 1950)


def test_missed_slots_are_skipped_not_replayed() -> None:
    slot = NO_JITTER.next_slot(1, last_checked=5 * 3600)
    assert slot is not None
    assert slot.offset > 5 * 3600
    assert slot.attempt == 11


def test_never_checked_means_the_first_slot() -> None:
    slot = NO_JITTER.next_slot(1, last_checked=None)
    assert slot is not None
    assert (slot.attempt, slot.offset) == (1, 60)


def test_no_slot_left_means_give_up() -> None:
    assert NO_JITTER.next_slot(1, last_checked=NO_JITTER.max_age) is None


def test_jitter_is_stable_per_order_and_differs_between_orders() -> None:
    policy = BackoffPolicy()
    assert policy.slots(123) == policy.slots(123)
    assert policy.slots(123) != policy.slots(456)


@given(key=st.integers(min_value=0, max_value=2**128 - 1), jitter=st.floats(0, 0.49))
def test_jittered_slots_stay_ordered_and_within_bounds(key: int, jitter: float) -> None:
    policy = BackoffPolicy(jitter=jitter)
    plain = BackoffPolicy(jitter=0.0).slots(key)
    slots = policy.slots(key)
    offsets = [s.offset for s in slots]
    assert offsets == sorted(offsets)
    assert len(set(offsets)) == len(offsets)
    for slot, base in zip(slots, plain, strict=False):
        assert base.gap * (1 - jitter) - 1e-9 <= slot.gap <= base.gap * (1 + jitter) + 1e-9
    assert len(slots) <= policy.max_attempts


@given(
    key=st.integers(min_value=0, max_value=2**64),
    last=st.floats(min_value=0, max_value=200_000, allow_nan=False),
)
def test_next_slot_is_strictly_after_the_last_check(key: int, last: float) -> None:
    slot = BackoffPolicy().next_slot(key, last)
    if slot is not None:
        assert slot.offset > last


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_delay": -1},
        {"base": 0},
        {"cap": 0},
        {"jitter": 0.5},
        {"max_attempts": 0},
        {"max_age": 0},
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        BackoffPolicy(**kwargs)  # type: ignore[arg-type]


def test_describe_prints_every_attempt() -> None:
    text = describe(BackoffPolicy())
    assert "| 20 | 1h55m | 23h13m |" in text
    assert "max_attempts=20" in text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.25, "0.25s"),
        (0.796576, "0.8s"),
        (45, "45s"),
        (90, "1m30s"),
        (6900, "1h55m"),
        (86400, "24h"),
    ],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


@given(
    key=st.integers(min_value=0, max_value=2**128 - 1),
    last=st.none() | st.floats(min_value=0, max_value=200_000, allow_nan=False),
    max_age=st.floats(min_value=1, max_value=200_000, allow_nan=False),
)
def test_next_slot_agrees_with_the_full_list_of_slots(
    key: int, last: float | None, max_age: float
) -> None:
    policy = BackoffPolicy(max_age=max_age)
    slots = policy.slots(key)
    expected = slots[0] if last is None else next((s for s in slots if s.opens > last), None)
    assert policy.next_slot(key, last) == expected


policies = st.builds(
    BackoffPolicy,
    initial_delay=st.floats(min_value=0, max_value=600),
    base=st.floats(min_value=0.01, max_value=600),
    cap=st.floats(min_value=0.01, max_value=7200),
    jitter=st.floats(min_value=0, max_value=0.49),
    max_attempts=st.integers(min_value=1, max_value=40),
    max_age=st.floats(min_value=1, max_value=200_000),
)


@given(policy=policies, key=st.integers(min_value=0, max_value=2**128 - 1))
def test_the_first_slot_computed_alone_is_the_walks_first_to_the_bit(
    policy: BackoffPolicy, key: int
) -> None:
    assert policy.first_slot(key) == policy.slots(key)[0]
    assert policy.next_slot(key, None) == policy.slots(key)[0]


@given(policy=policies, key=st.integers(min_value=0, max_value=2**128 - 1), data=st.data())
def test_a_check_anywhere_in_a_slots_window_is_that_slots_check(
    policy: BackoffPolicy, key: int, data: st.DataObject
) -> None:
    # A window runs from a slot's opening to the next slot's: wherever in it
    # a check lands (early, on time, late), the slot after it is the next one.
    slots = policy.slots(key)
    n = data.draw(st.integers(min_value=0, max_value=len(slots) - 1))
    end = slots[n + 1].opens if n + 1 < len(slots) else slots[n].offset + policy.cap
    checked = data.draw(st.floats(min_value=slots[n].opens, max_value=end, exclude_max=True))
    expected = slots[n + 1] if n + 1 < len(slots) else None
    assert policy.next_slot(key, checked) == expected


@given(
    policy=policies,
    key=st.integers(min_value=0, max_value=2**128 - 1),
    errors=st.lists(st.floats(min_value=-1, max_value=1), min_size=40, max_size=40),
)
def test_each_slot_is_checked_once_however_the_clocks_disagree(
    policy: BackoffPolicy, key: int, errors: list[float]
) -> None:
    # The daemon checks at the slot it scheduled, and the check measures its
    # own elapsed time off either way (two clocks, queries of different
    # length) by up to a twentieth of the gaps on either side of the slot:
    # every slot is still asked once, in order, and none twice.
    slots = policy.slots(key)
    served = []
    last_checked = None
    while (slot := policy.next_slot(key, last_checked)) is not None:
        served.append(slot.attempt)
        assert len(served) <= policy.max_attempts
        following = slots[slot.attempt].gap if slot.attempt < len(slots) else slot.gap
        noise = errors[slot.attempt - 1] * min(slot.gap, following) / 20
        last_checked = max(0.0, slot.offset + noise)
    assert served == [s.attempt for s in slots]
