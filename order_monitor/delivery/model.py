"""Values that cross the delivery package's borders: outbox entries and verdicts."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Entry:
    """One outbox row: a written result waiting to be delivered.

    Recorded by the write function in the transaction that wrote the row, so
    it exists exactly for the results that were written.
    """

    #: Stable across retries: the idempotency key, and a webhook's ``webhook-id``.
    delivery_id: uuid.UUID
    order_id: uuid.UUID
    #: done, failed or gave_up.
    outcome: str
    provider_message: str | None
    last_message: str | None
    #: The row's values of the actions' columns when the result was written.
    columns: Mapping[str, Any]
    recorded_at: datetime
    #: Every attempt so far (for the backoff and the operator).
    tries: int = 0
    #: Answers that refused this order (toward the action's ``attempts``).
    rejections: int = 0
    last_error: str | None = None
    #: The verdict of the last attempt (a :class:`Verdict` value), None before one.
    last_verdict: str | None = None
    #: When the next attempt is due.
    due_at: datetime | None = None
    #: Set on a dead letter.
    dead_at: datetime | None = None
    #: When an operator last requeued it (a dead letter sent again): its
    #: max_age counts from here, else from recorded_at.
    requeued_at: datetime | None = None

    @property
    def retried_since(self) -> datetime:
        """Where the action's max_age counts from."""
        return self.requeued_at or self.recorded_at

    @property
    def message(self) -> str | None:
        """The note for the application: the provider's own words, else ours."""
        return self.provider_message or self.last_message


class Verdict(enum.Enum):
    """What one answer means for one delivery."""

    #: The application took it (and, where configured, the row confirms it).
    DELIVERED = "delivered"
    #: Taken by the application's answer; the row's status must still confirm it.
    TAKEN = "taken"
    #: Not this order's fault (timeout, refused connection, 5xx, 429, a body
    #: that is not the expected JSON): try again, for up to the action's max_age.
    RETRY = "retry"
    #: The application refused our credentials (401/403): a configuration
    #: error. Loud; the delivery waits and is not used up.
    AUTH = "auth"
    #: The application refused this order (a per-id error, another 4xx, a
    #: success check that failed): counted, a dead letter after ``attempts``.
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Answer:
    """What one request's answer says, per delivery it carried."""

    verdicts: Mapping[uuid.UUID, Verdict]
    #: Why, for each delivery not DELIVERED/TAKEN (safe to log: scrubbed of secrets).
    errors: Mapping[uuid.UUID, str] = field(default_factory=dict)
    #: The application asked us to wait this long (Retry-After), if it did.
    retry_after: float | None = None
    #: The HTTP status, None when there was no answer (a transport failure).
    status: int | None = None
