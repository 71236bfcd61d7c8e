"""When to check an order next: the one backoff policy, as pure functions.

The schedule is a function of the time since the order was dispatched, never
of how many checks this process happened to make. A restarted daemon therefore
resumes where the old one stood (it knows when the row was last synced), and a
check that ran late does not push every later check back.

Attempt *n* has a *slot*: an offset from dispatch. The first slot is
``initial_delay``; after it the gaps grow as ``base * 2**(n-2)`` up to ``cap``.
Each gap carries a jitter of up to ``±jitter`` of its length, derived from the
order's id, so that orders dispatched together spread out, and so that the
same order always gets the same slots (no random state to persist or seed in
tests). A check at elapsed time ``t`` is followed by the first slot that
*opens* after ``t``; slots missed while the daemon was down are skipped, not
replayed.

A slot opens a little before its offset (:data:`EARLY_SHARE` of its gap): a
check made in that window counts as the slot's check. Without it a check that
measures itself a hair early (the server's clock read at another moment than
the daemon's, a query slower than the last) is followed by the same slot again,
a second request a few milliseconds later.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Final, NamedTuple

#: The most attempts a policy may have: far above any sane schedule, and the
#: arithmetic needs a bound. ``base * 2**(n-2)`` raises OverflowError once
#: 2**(n-2) no longer fits a float (n > 1025), before the cap is applied; and
#: the jitter hashes the attempt number as two bytes.
MAX_ATTEMPTS_LIMIT: Final = 1000

#: How early, as a share of its gap, a check may come and still count as the
#: slot's own. Far above clock and query noise for any real gap (12 s of a
#: 60 s one), and well below 1, so a slot opens only after the slot before
#: it has passed.
EARLY_SHARE: Final = 0.2

#: How early, as a share of its gap, an order may be checked on purpose: when
#: a request to its provider goes out anyway and has room for it (a batched
#: provider answers up to 50 orders a request). Half of EARLY_SHARE, so an
#: order pulled forward counts as its slot's check even if the two clocks
#: disagree by a tenth of the gap.
PULL_SHARE: Final = 0.1


class Slot(NamedTuple):
    attempt: int
    #: Seconds since dispatch.
    offset: float
    #: Seconds since the previous slot.
    gap: float

    @property
    def opens(self) -> float:
        """The earliest elapsed time at which a check counts as this slot's."""
        return self.offset - EARLY_SHARE * self.gap

    @property
    def pull_from(self) -> float:
        """The earliest elapsed time at which the order may be checked with others."""
        return self.offset - PULL_SHARE * self.gap


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    initial_delay: float = 60.0
    base: float = 30.0
    # With the defaults above, 20 attempts end at about 23.3 h: max_attempts
    # and max_age bind at about the same time, so neither silently overrides
    # the other (test_default_limits_bind_together keeps it that way).
    cap: float = 6900.0
    jitter: float = 0.1
    max_attempts: int = 20
    max_age: float = 86400.0

    def __post_init__(self) -> None:
        # nan passes every comparison below, and inf makes every later slot inf.
        if not all(
            math.isfinite(v)
            for v in (self.initial_delay, self.base, self.cap, self.jitter, self.max_age)
        ):
            raise ValueError("initial_delay, base, cap, jitter and max_age must be finite")
        if self.initial_delay < 0:
            raise ValueError("initial_delay must be >= 0")
        if self.base <= 0 or self.cap <= 0:
            raise ValueError("base and cap must be > 0")
        if not 0 <= self.jitter < 0.5:
            # Below 0.5 consecutive jittered slots can never swap order.
            raise ValueError("jitter must be >= 0 and < 0.5")
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise ValueError(f"max_attempts must be >= 1 and <= {MAX_ATTEMPTS_LIMIT}")
        if self.max_age <= 0:
            raise ValueError("max_age must be > 0")

    def slots(self, key: int) -> list[Slot]:
        """Every slot of the order identified by *key*, within both limits.

        Never empty: an order is checked at least once, however old it is.
        """
        return list(self._walk(key))

    def next_slot(self, key: int, last_checked: float | None) -> Slot | None:
        """The slot after a check made *last_checked* seconds after dispatch.

        That is the first slot that opens after *last_checked*: a check made
        in a slot's early window was that slot's check. ``None`` for
        *last_checked* means the order was never checked: the first slot
        (which may already be past; the caller then checks now).
        ``None`` as the result means the order has used up its checks.
        """
        if last_checked is None:
            return self.first_slot(key)
        for slot in self._walk(key):
            if slot.opens > last_checked:
                return slot
        return None

    def first_slot(self, key: int) -> Slot:
        """The order's first slot: what :meth:`_walk` yields first, computed alone.

        Every order taken in (confirmed, read while busy, swept) asks for it,
        thousands a second under load; the walk's generator and its checks
        were half of scheduling one.
        """
        gap = self.initial_delay * (1.0 + self.jitter * _signed_unit(key, 1))
        return Slot(1, gap, gap)

    def _walk(self, key: int) -> Iterator[Slot]:
        # Lazy, because the sweep asks next_slot for every order it schedules:
        # hashing all twenty slots to return the first was most of a sweep.
        offset = 0.0
        for attempt in range(1, self.max_attempts + 1):
            gap = (
                self.initial_delay
                if attempt == 1
                # Finite for every attempt MAX_ATTEMPTS_LIMIT allows; a huge base
                # makes the product inf, which min() turns into the cap.
                else min(self.cap, self.base * 2 ** (attempt - 2))
            )
            gap *= 1.0 + self.jitter * _signed_unit(key, attempt)
            offset += gap
            if offset > self.max_age and attempt > 1:
                return
            yield Slot(attempt, offset, gap)


def _signed_unit(key: int, attempt: int) -> float:
    """A stable pseudo-random number in [-1, 1) for (key, attempt)."""
    digest = hashlib.blake2b(
        (key & (2**128 - 1)).to_bytes(16, "big") + attempt.to_bytes(2, "big"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") / 2**63 - 1.0


def describe(policy: BackoffPolicy) -> str:
    """The schedule without jitter, as a table for people (README, `order-monitor schedule`)."""
    slots = replace(policy, jitter=0.0).slots(0)
    lines = [
        "| attempt | after the previous | since dispatch |",
        "| ---: | ---: | ---: |",
    ]
    for slot in slots:
        lines.append(
            f"| {slot.attempt} | {format_seconds(slot.gap)} | {format_seconds(slot.offset)} |"
        )
    last = slots[-1]
    lines.append("")
    lines.append(
        f"Each gap varies by up to ±{policy.jitter:.0%} per order. After attempt {last.attempt} "
        f"({format_seconds(last.offset)} after dispatch) a still-pending order is given up "
        f"(max_attempts={policy.max_attempts}, max_age={format_seconds(policy.max_age)})."
    )
    return "\n".join(lines)


def format_seconds(seconds: float) -> str:
    """'45s', '2m', '1h55m', '23h18m'."""
    total = round(seconds)
    if total < 60:
        return f"{seconds:.2g}s" if seconds < 1 else f"{total}s"
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs and not hours:
        parts.append(f"{secs}s")
    return "".join(parts)
