"""What each provider answer writes and when the order is looked at next: pure rules."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from order_monitor.config import OutcomeWrites
from order_monitor.db import ColumnLimits, InFlightRow, SweepRow
from order_monitor.engine.checker import spare_in_request
from order_monitor.engine.decisions import (
    Decision,
    after_refusal,
    decide,
    describe_outcome,
    truncate,
)
from order_monitor.engine.listener import parse_payload
from order_monitor.engine.policy import BackoffPolicy
from order_monitor.engine.scheduler import Scheduler
from order_monitor.engine.sweep import schedule_row
from order_monitor.providers.base import Outcome, clean_pin

POLICY = BackoffPolicy(jitter=0.0)
LIMITS = ColumnLimits(pin_code=120, provider_message=None, last_message=250)
ROW = InFlightRow(uuid.UUID(int=7), "REF-1", "znet", None, elapsed=100.0, last_checked=60.0)


def decide_at(
    outcome: Outcome, elapsed: float = 100.0, writes: OutcomeWrites | None = None
) -> Decision:
    return decide(
        ROW,
        "znet",
        outcome,
        elapsed=elapsed,
        policy=POLICY,
        writes=writes or OutcomeWrites(),
        limits=LIMITS,
    )


def test_done_writes_status_pin_and_message_and_ends_the_order() -> None:
    d = decide_at(Outcome.done("ABC123", "İşlem tamamlandı", raw_status="2"))
    assert (d.kind, d.external_status, d.pin) == ("done", "done", "ABC123")
    assert d.provider_message == d.last_message == "İşlem tamamlandı"
    assert d.status is None  # the business status is not touched by default
    assert d.next_check_in is None
    assert d.finished
    assert d.writes


def test_done_can_also_approve_when_configured() -> None:
    d = decide_at(Outcome.done("X"), writes=OutcomeWrites(done_status="approved"))
    assert d.status == "approved"
    assert d.last_message == "Completed"


def test_failed_writes_the_providers_reason() -> None:
    d = decide_at(
        Outcome.failed("İşlem iptal edildi"), writes=OutcomeWrites(failed_status="rejected")
    )
    assert (d.kind, d.external_status, d.status) == ("failed", "failed", "rejected")
    assert d.last_message == "İşlem iptal edildi"
    assert d.pin is None


@pytest.mark.parametrize("pin", ["-", " - ", "", "  ", None])
def test_a_placeholder_pin_is_no_pin(pin: str | None) -> None:
    assert clean_pin(pin) is None
    assert decide_at(Outcome.done(pin)).pin is None


def test_pending_writes_only_the_sync_time_and_waits_for_the_next_slot() -> None:
    d = decide_at(Outcome.pending("1", "İşlem bekleniyor"), elapsed=100.0)
    assert d.kind == "pending"
    assert (d.external_status, d.pin, d.last_message, d.status) == (None, None, None, None)
    assert d.next_check_in == pytest.approx(150.0 - 100.0)  # slot 3 is 150 s after dispatch


@pytest.mark.parametrize(
    "outcome", [Outcome.unknown(), Outcome.transport_error("HTTP 502 from znet")]
)
def test_unknown_and_transport_errors_are_never_answers(outcome: Outcome) -> None:
    d = decide_at(outcome)
    assert d.kind == "pending"
    assert d.external_status is None
    assert d.next_check_in is not None


def test_a_deferral_writes_nothing_and_uses_no_slot() -> None:
    d = decide_at(Outcome.transport_error("circuit open", retry_after=12.5))
    assert (d.kind, d.writes, d.next_check_in) == ("deferred", False, 12.5)


def test_after_the_last_slot_the_order_is_given_up_for_a_human() -> None:
    d = decide_at(Outcome.pending("1", "İşlem bekleniyor"), elapsed=POLICY.max_age)
    assert d.kind == "gave_up"
    assert d.external_status == "manual_required"
    assert d.last_message is not None
    assert d.last_message.startswith("order-monitor gave up 24h after dispatch")
    assert "İşlem bekleniyor" in d.last_message
    assert d.finished


def test_a_pin_too_long_for_its_column_is_not_cut_but_handed_to_a_human() -> None:
    d = decide_at(Outcome.done("P" * 121))
    assert d.kind == "gave_up"
    assert d.pin is None
    assert d.last_message is not None
    assert "121 characters" in d.last_message


def test_long_messages_are_cut_to_the_column() -> None:
    d = decide_at(Outcome.failed("ş" * 300))
    assert d.last_message is not None
    assert len(d.last_message) == 250
    assert d.last_message.endswith("…")
    assert d.provider_message == "ş" * 300  # text column: kept whole


def test_truncate_leaves_short_text_alone() -> None:
    assert truncate("abc", 3) == "abc"
    assert truncate(None, 3) is None
    assert truncate("abcd", None) == "abcd"


def test_describe_is_short_and_human() -> None:
    assert (
        describe_outcome(Outcome.pending("1", "İşlem bekleniyor")) == "pending (İşlem bekleniyor)"
    )
    assert describe_outcome(Outcome.transport_error("timeout")) == "error (timeout)"
    assert describe_outcome(Outcome.unknown()) == "unknown"


# --- where a swept order stands -------------------------------------------------------


def swept(
    elapsed: float, last_checked: float | None, provider_id: str | None = "znet"
) -> Scheduler:
    """A scheduler holding order 1 as the sweep (or the listener) offers it at time 1000."""
    scheduler = Scheduler()
    row = SweepRow(uuid.UUID(int=1), provider_id, elapsed, last_checked)
    schedule_row(scheduler, POLICY, row, 1000.0, lambda p: p if p == "barakat" else None)
    return scheduler


def test_a_never_checked_order_is_due_at_its_first_slot() -> None:
    assert swept(elapsed=10.0, last_checked=None).due_in(1) == 1000.0 + 50.0


def test_an_order_is_resumed_at_the_slot_after_its_last_sync() -> None:
    # Last synced 20 min after dispatch, now 25 min: slot 7 (32.5 min) is next.
    due = swept(elapsed=1500.0, last_checked=1200.0).due_in(1)
    assert due == pytest.approx(1000.0 + 1950.0 - 1500.0)


def test_an_overdue_order_is_due_now() -> None:
    assert swept(elapsed=5000.0, last_checked=100.0).due_in(1) == 1000.0


def test_an_order_past_its_last_slot_is_checked_once_more_now() -> None:
    assert swept(elapsed=90_000.0, last_checked=89_000.0).due_in(1) == 1000.0


def test_a_swept_order_of_a_batched_provider_may_share_its_first_check() -> None:
    # Slot 1 is 60 s after dispatch: open to a shared request from 54 s on.
    batched = swept(elapsed=10.0, last_checked=None, provider_id="barakat")
    assert batched.pull_open("barakat", now=1000.0 + 43.9, limit=10) == []
    assert batched.pull_open("barakat", now=1000.0 + 44.0, limit=10) == [(1, 1050.0)]
    single = swept(elapsed=10.0, last_checked=None, provider_id="znet")
    assert single.pull_open("znet", now=1000.0 + 49.9, limit=10) == []


# --- notification payloads -------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    ["", "   ", "not-a-uuid", "'; DROP TABLE product_orders; --", "x" * 8000, "1" * 36, "{}"],
)
def test_junk_payloads_are_not_order_ids(payload: str) -> None:
    assert parse_payload(payload) is None


def test_an_order_id_payload_is_parsed() -> None:
    order = uuid.uuid4()
    assert parse_payload(str(order)) == order
    assert parse_payload(f" {order}\n") == order


# --- a write the database refused -------------------------------------------------------


def refused(decision: Decision) -> Decision | float:
    return after_refusal(
        decision, policy=POLICY, writes=OutcomeWrites(), limits=LIMITS, reason="CheckViolation"
    )


def test_a_refused_write_is_checked_again_at_the_next_slot() -> None:
    decision = decide_at(Outcome.done("PIN"), elapsed=100.0)
    slot = POLICY.next_slot(ROW.id.int, last_checked=100.0)
    assert slot is not None
    assert refused(decision) == pytest.approx(slot.offset - 100.0)


def test_a_refused_write_past_the_policy_is_given_up_without_the_values() -> None:
    decision = decide_at(Outcome.done("SECRET-PIN"), elapsed=POLICY.max_age + 1)
    follow_up = refused(decision)
    assert isinstance(follow_up, Decision)
    assert (follow_up.kind, follow_up.external_status) == ("gave_up", "manual_required")
    assert follow_up.pin is None
    assert follow_up.last_message is not None
    assert "refused to store the provider's done answer (CheckViolation)" in follow_up.last_message
    assert "SECRET-PIN" not in follow_up.last_message


def test_a_refused_give_up_is_tried_again_a_cap_later() -> None:
    decision = decide_at(Outcome.pending(), elapsed=POLICY.max_age + 1)
    assert decision.kind == "gave_up"
    assert refused(decision) == POLICY.cap


def test_a_batched_providers_next_check_may_be_pulled_forward_a_tenth_of_its_gap() -> None:
    d = decide(
        ROW,
        "barakat",
        Outcome.pending("1", None),
        elapsed=100.0,
        policy=POLICY,
        writes=OutcomeWrites(),
        limits=LIMITS,
        group="barakat",
    )
    # Slot 3 is 150 s after dispatch, 60 s after slot 2: open from 144 s on.
    assert (d.group, d.next_check_in) == ("barakat", pytest.approx(50.0))
    assert d.pull_in == pytest.approx(44.0)


def test_an_unbatched_provider_is_never_pulled_forward() -> None:
    d = decide_at(Outcome.pending("1", None))
    assert d.group is None


@pytest.mark.parametrize(
    ("orders", "batch", "room", "spare"),
    [(1, 50, 1000, 49), (50, 50, 1000, 0), (51, 50, 1000, 49), (7, 50, 10, 10), (3, 1, 100, 0)],
)
def test_a_request_is_filled_up_to_its_batch_within_the_room_left(
    orders: int, batch: int, room: int, spare: int
) -> None:
    assert spare_in_request(orders, batch, room) == spare


@given(
    orders=st.integers(min_value=1, max_value=10_000),
    batch=st.integers(min_value=1, max_value=500),
    room=st.integers(min_value=-100, max_value=10_000),
)
def test_filling_a_request_never_adds_one(orders: int, batch: int, room: int) -> None:
    spare = spare_in_request(orders, batch, room)
    assert 0 <= spare <= max(room, 0)
    assert -(-(orders + spare) // batch) == -(-orders // batch)
