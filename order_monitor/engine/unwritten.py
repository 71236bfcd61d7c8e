"""Results the database has not taken yet, held to be written again: pure, clock injected.

A provider's answer is the expensive part of a check (a request, a rate
limit, sometimes money at a reseller's API); writing it is cheap. So when a
write does not happen, because another transaction holds the row
('locked') or the database failed the statement or its COMMIT
('database'), the decision is kept here and written again with a backoff,
without asking the provider again. The order stays "being checked" in the
scheduler meanwhile, so no second check of it starts.

What is held, and for how long:

* a finished result (done, failed, gave_up) is held until it is written or
  found stale: it is the one the customer waits for, and the provider may
  not say it twice (a PIN is often shown once);
* a pending one only refreshes lastSyncAt: it is worth nothing once the
  order's next slot has come, so it is dropped then and the order goes back
  to the scheduler, due at that slot (never earlier than the slot allows).

At most one decision per order is held (keyed by order id), so the memory is
bounded by the orders in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from order_monitor.engine.decisions import Decision

#: Why a decision is held.
Reason = Literal["locked", "database"]

#: The first retry comes this soon: a row lock is usually an application
#: transaction that ends within a second ...
RETRY_FIRST: Final = 1.0
#: ... and retries then back off to this, so an idle-in-transaction session
#: holding a row for hours costs one small statement every half minute.
RETRY_CAP: Final = 30.0


def retry_delay(attempt: int, *, first: float = RETRY_FIRST, cap: float = RETRY_CAP) -> float:
    """Seconds before the *attempt*-th retry (1, 2, ...): *first*, doubling, up to *cap*."""
    if attempt < 1:
        raise ValueError("attempt counts from 1")
    return min(cap, first * 2.0 ** min(attempt - 1, 62))


@dataclass(slots=True)
class Held:
    decision: Decision
    #: When the decision reached the writer (by the writer's clock).
    since: float
    reason: Reason
    #: Writes tried so far that did not take it.
    attempts: int
    retry_at: float
    #: A pending decision's next slot: dropped from then on. None: held until written.
    expires_at: float | None


class Unwritten:
    """The held decisions, one per order, with when each is tried again."""

    def __init__(self, *, first: float = RETRY_FIRST, cap: float = RETRY_CAP) -> None:
        self._first = first
        self._cap = cap
        self._held: dict[int, Held] = {}

    def hold(
        self,
        decision: Decision,
        *,
        reason: Reason,
        since: float,
        now: float,
        previous: Held | None = None,
    ) -> Held:
        """Keep *decision* (made by *since*) for another try after a write that did not take it.

        *previous* is what :meth:`take_due` handed out for this retry: the
        backoff goes on from its attempts, the age from its start.
        """
        order = decision.row.id.int
        previous = previous or self._held.get(order)
        attempts = 1 if previous is None else previous.attempts + 1
        if previous is not None:
            since = min(since, previous.since)
        expires_at = None
        if not decision.finished and decision.next_check_in is not None:
            expires_at = since + decision.next_check_in
        retry_at = now + retry_delay(attempts, first=self._first, cap=self._cap)
        if expires_at is not None:
            retry_at = min(retry_at, expires_at)
        held = Held(decision, since, reason, attempts, retry_at, expires_at)
        self._held[order] = held
        return held

    def take_due(self, now: float, limit: int) -> list[Held]:
        """Up to *limit* held decisions whose retry time has come, oldest first (removed)."""
        due = sorted(
            (h for h in self._held.values() if h.retry_at <= now and not self._expired(h, now)),
            key=lambda h: h.since,
        )[:limit]
        for held in due:
            del self._held[held.decision.row.id.int]
        return due

    def take_expired(self, now: float) -> list[Held]:
        """The pending decisions whose order's next slot has come (removed from here)."""
        expired = [h for h in self._held.values() if self._expired(h, now)]
        for held in expired:
            del self._held[held.decision.row.id.int]
        return expired

    def take_all(self) -> list[Held]:
        held, self._held = list(self._held.values()), {}
        return held

    def next_retry_at(self) -> float | None:
        return min((h.retry_at for h in self._held.values()), default=None)

    def oldest_since(self) -> float | None:
        return min((h.since for h in self._held.values()), default=None)

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, order: object) -> bool:
        return order in self._held

    @staticmethod
    def _expired(held: Held, now: float) -> bool:
        return held.expires_at is not None and held.expires_at <= now
