"""Notifications that are not an order id: counted, and reported at most once per interval.

Anyone who can connect can NOTIFY our channel. A line per junk payload let
20,000 of them write 20,000 warnings, and past journald's rate limit the
daemon's own errors were the lines dropped. So the first one is reported at
once (a mistake in a trigger shows without delay) and the rest of each
interval in one line with their count and the first of them as an example.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

from order_monitor.logs import get_logger

log = get_logger()

#: Characters of a payload shown in the log; a NOTIFY payload may be 8000 bytes.
LOGGED_PAYLOAD: Final = 100
REPORT_INTERVAL: Final = 10.0


def shown(payload: str) -> str:
    """*payload* as the log shows it: cut short, control and non-ASCII characters escaped.

    Escaped so that a payload cannot forge a line of its own in a plain-text
    journal, nor hide what it is.
    """
    return payload[:LOGGED_PAYLOAD].encode("unicode_escape").decode("ascii")


class BadPayloads:
    def __init__(
        self,
        channel: str,
        *,
        interval: float = REPORT_INTERVAL,
        clock: Callable[[], float],
    ) -> None:
        self._channel = channel
        self._interval = interval
        self._clock = clock
        self._count = 0
        self._example = ""
        self._example_length = 0
        self._next_report_at = -math.inf

    def note(self, payload: str) -> None:
        """Count one bad payload; report now if the last report is an interval old."""
        if not self._count:
            self._example, self._example_length = shown(payload), len(payload)
        self._count += 1
        self.flush()

    def flush(self) -> None:
        """Report what was counted, if the last report is an interval old.

        Called between notifications too, so that the count of a burst is not
        held back until the next bad payload arrives.
        """
        now = self._clock()
        if not self._count or now < self._next_report_at:
            return
        log.warning(
            "listener.bad_payload",
            channel=self._channel,
            count=self._count,
            example=self._example,
            example_length=self._example_length,
            expected="an order id (uuid)",
            next_report_in_s=self._interval,
        )
        self._count = 0
        self._next_report_at = now + self._interval
