"""When a delivery is tried again, and when it stops being tried: pure, the clock a parameter.

No jitter: the relay takes every due entry of a round together and batches
them into few requests, so retries falling due at the same moment are one
request, not a herd.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

from order_monitor.config import ActionConfig
from order_monitor.delivery.model import Entry

#: Seconds a delivery refused for its credentials (401/403) waits: long
#: enough not to hammer with a known-bad token, short enough that a fixed
#: secret is noticed within a minute of the restart.
AUTH_RETRY: Final = 60.0
#: The delay after the first failed attempt; each failure doubles it.
FIRST_RETRY: Final = 5.0
#: The longest delay: results move money and are retried for days, so an
#: application that is back is found again within half an hour.
MAX_RETRY: Final = 1800.0
#: Doublings past this are all MAX_RETRY (and 2.0**n would overflow).
_MAX_DOUBLINGS: Final = 32


def retry_delay(tries: int) -> float:
    """Seconds before attempt ``tries + 1``, after *tries* failed attempts.

    5 s, 10 s, 20 s, ... up to :data:`MAX_RETRY`. A *tries* below 1 is read
    as 1: a wrong count must not turn into a hot loop (or an exception in
    the relay's round).
    """
    doublings = min(max(tries, 1) - 1, _MAX_DOUBLINGS)
    return min(FIRST_RETRY * 2.0**doublings, MAX_RETRY)


def expired(entry: Entry, action: ActionConfig, now: datetime) -> bool:
    """The entry was recorded (or last requeued) at least the action's ``max_age`` before *now*.

    Then it becomes a dead letter rather than being tried again. From the
    requeue when there was one: an operator who sends a week-old dead letter
    again gets the whole max_age for it, not one try.
    """
    return (now - entry.retried_since).total_seconds() >= action.max_age
