"""What a provider's answer means for the row and the schedule: pure rules.

Kept apart from I/O so every branch (done, failed, pending, gave up, deferred,
a PIN too long for its column) is tested with plain values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from order_monitor.config import OutcomeWrites
from order_monitor.db import ColumnLimits, InFlightRow, WriteBatch
from order_monitor.engine.policy import BackoffPolicy, format_seconds
from order_monitor.providers.base import Outcome, Status


@dataclass(frozen=True, slots=True)
class Decision:
    """The write (if any) and the next check (if any) for one checked order."""

    row: InFlightRow
    provider: str
    outcome: Outcome
    #: 'done', 'failed', 'gave_up', 'pending' (a write) or 'deferred' (none).
    kind: str
    external_status: str | None = None
    pin: str | None = None
    provider_message: str | None = None
    last_message: str | None = None
    status: str | None = None
    #: Seconds from now until the next check; None: no further check.
    next_check_in: float | None = None
    #: Seconds since dispatch when the decision was made.
    elapsed: float = 0.0
    #: The provider's id, when its requests carry several orders: the next
    #: check may then go out early with others (Scheduler.pull_open) ...
    group: str | None = None
    #: ... from this many seconds from now on (policy.PULL_SHARE).
    pull_in: float | None = None

    @property
    def writes(self) -> bool:
        return self.kind != "deferred"

    @property
    def finished(self) -> bool:
        return self.kind in {"done", "failed", "gave_up"}


def write_batch(decisions: Sequence[Decision]) -> WriteBatch:
    """The guarded UPDATE's column arrays for these decisions."""
    return WriteBatch(
        ids=[d.row.id for d in decisions],
        references=[d.row.reference for d in decisions],
        provider_ids=[d.row.provider_id for d in decisions],
        kinds=[d.kind for d in decisions],
        pins=[d.pin for d in decisions],
        provider_messages=[d.provider_message for d in decisions],
        last_messages=[d.last_message for d in decisions],
    )


def truncate(text: str | None, limit: int | None) -> str | None:
    """Fit *text* into a varchar(limit), marking the cut with an ellipsis."""
    if text is None or limit is None or len(text) <= limit:
        return text
    return text[: max(limit - 1, 0)] + "…"


def decide(
    row: InFlightRow,
    provider: str,
    outcome: Outcome,
    *,
    elapsed: float,
    policy: BackoffPolicy,
    writes: OutcomeWrites,
    limits: ColumnLimits,
    group: str | None = None,
) -> Decision:
    """The decision for *row* given *outcome*, *elapsed* seconds after dispatch.

    *group* names the provider when its requests carry several orders, so
    the next check may be pulled forward into another order's request.
    """
    if outcome.status is Status.DONE:
        if (
            outcome.pin is not None
            and limits.pin_code is not None
            and len(outcome.pin) > limits.pin_code
        ):
            # Cutting a PIN would hand the customer a wrong code: a human decides.
            return _gave_up(
                row,
                provider,
                outcome,
                writes,
                limits,
                f"order-monitor: the provider reports done, but its PIN has {len(outcome.pin)} "
                f"characters and the PIN column holds {limits.pin_code}; not written",
                elapsed,
            )
        return Decision(
            row,
            provider,
            outcome,
            "done",
            external_status=writes.done_external_status,
            pin=outcome.pin,
            provider_message=truncate(outcome.message, limits.provider_message),
            last_message=truncate(outcome.message or "Completed", limits.last_message),
            status=writes.done_status,
            elapsed=elapsed,
        )
    if outcome.status is Status.FAILED:
        return Decision(
            row,
            provider,
            outcome,
            "failed",
            external_status=writes.failed_external_status,
            provider_message=truncate(outcome.message, limits.provider_message),
            last_message=truncate(outcome.message or "Failed at the provider", limits.last_message),
            status=writes.failed_status,
            elapsed=elapsed,
        )
    if outcome.status is Status.ERROR and outcome.retry_after is not None:
        # No request was made (breaker open, Retry-After pause), or the
        # provider asked us to wait: no slot is used, nothing is written.
        return Decision(
            row, provider, outcome, "deferred", next_check_in=outcome.retry_after, elapsed=elapsed
        )

    slot = policy.next_slot(row.id.int, last_checked=elapsed)
    if slot is None:
        return _gave_up(
            row,
            provider,
            outcome,
            writes,
            limits,
            f"order-monitor gave up {format_seconds(elapsed)} after dispatch "
            f"(max_attempts={policy.max_attempts}, max_age={format_seconds(policy.max_age)}); "
            f"last answer: {describe_outcome(outcome)}",
            elapsed,
        )
    return Decision(
        row,
        provider,
        outcome,
        "pending",
        next_check_in=max(0.0, slot.offset - elapsed),
        elapsed=elapsed,
        group=group,
        pull_in=max(0.0, slot.pull_from - elapsed),
    )


def after_refusal(
    decision: Decision,
    *,
    policy: BackoffPolicy,
    writes: OutcomeWrites,
    limits: ColumnLimits,
    reason: str,
) -> Decision | float:
    """What follows when the database refused to write *decision*.

    A refusal counts like a check without an answer: the order is checked
    again at its next slot (a number: seconds from the decision), and once
    the policy's limits are reached it is given up like any other (a
    Decision to write), with a message of our own that carries none of the
    refused values. A refused give-up leaves nothing else to write: it is
    tried again a whole cap later, logged each time.
    """
    if decision.kind == "gave_up":
        return policy.cap
    slot = policy.next_slot(decision.row.id.int, last_checked=decision.elapsed)
    if slot is not None:
        return max(0.0, slot.offset - decision.elapsed)
    return _gave_up(
        decision.row,
        decision.provider,
        decision.outcome,
        writes,
        limits,
        f"order-monitor gave up {format_seconds(decision.elapsed)} after dispatch: the "
        f"database refused to store the provider's {decision.kind} answer ({reason})",
        decision.elapsed,
    )


def _gave_up(
    row: InFlightRow,
    provider: str,
    outcome: Outcome,
    writes: OutcomeWrites,
    limits: ColumnLimits,
    message: str,
    elapsed: float,
) -> Decision:
    return Decision(
        row,
        provider,
        outcome,
        "gave_up",
        external_status=writes.gave_up_external_status,
        last_message=truncate(message, limits.last_message),
        elapsed=elapsed,
    )


def describe_outcome(outcome: Outcome) -> str:
    """The outcome in a few words for a person: 'pending (İşlem bekleniyor)'."""
    if outcome.status is Status.ERROR:
        return f"error ({outcome.error})"
    detail = outcome.message or outcome.raw_status
    return f"{outcome.status.value} ({detail})" if detail else outcome.status.value
