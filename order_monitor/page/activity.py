"""Checks and outcomes per provider over the last hour, from the daemon's own counters.

Pure code: the caller passes the clock's reading and the counters' totals
(``order_monitor_checks_total`` by provider and outcome), so the window is
tested with plain numbers.

The page needs "the last hour" and Prometheus counters only ever grow. So a
reading of the totals is kept every :data:`SAMPLE_EVERY` seconds, an hour's
worth of them, and the hour's counts are the totals now minus the oldest
reading still inside the hour: 61 small dicts of memory, no per-check work
and nothing in the checker's path. Until the daemon has run an hour the
window is what it has seen since it started, and :class:`HourCounts` says so.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, TypeAlias

#: (provider, outcome) -> checks counted so far.
Totals: TypeAlias = Mapping[tuple[str, str], float]

HOUR: Final = 3600.0
SAMPLE_EVERY: Final = 60.0
#: Outcomes that count against a provider in its error ratio: no answer, or one
#: we could not read.
ERROR_OUTCOMES: Final = frozenset({"error"})


@dataclass(frozen=True, slots=True)
class HourCounts:
    """One provider's checks in the window, by normalised outcome."""

    by_outcome: Mapping[str, int] = field(default_factory=dict)
    #: Seconds the window covers: an hour, or less since the daemon started.
    window_s: float = 0.0

    @property
    def checks(self) -> int:
        return sum(self.by_outcome.values())

    @property
    def errors(self) -> int:
        return sum(n for outcome, n in self.by_outcome.items() if outcome in ERROR_OUTCOMES)

    @property
    def error_ratio(self) -> float | None:
        """Errors over checks; None when there was no check to divide by."""
        return self.errors / self.checks if self.checks else None


class CheckActivity:
    """An hour of readings of the check counters, one every *sample_every* seconds."""

    def __init__(
        self, *, window: float = HOUR, sample_every: float = SAMPLE_EVERY, started: float
    ) -> None:
        if not 0 < sample_every <= window:
            raise ValueError("sample_every must be > 0 and at most the window")
        self.window = window
        self.sample_every = sample_every
        self._started = started
        #: (when, totals) oldest first; the first is the zero reading at start.
        self._readings: deque[tuple[float, dict[tuple[str, str], float]]] = deque([(started, {})])

    def observe(self, now: float, totals: Totals) -> None:
        """Keep a reading when the last kept one is *sample_every* old; forget the ones
        the window no longer needs (all but the newest at or before its start)."""
        if now - self._readings[-1][0] >= self.sample_every:
            self._readings.append((now, dict(totals)))
        start = now - self.window
        while len(self._readings) > 1 and self._readings[1][0] <= start:
            self._readings.popleft()

    def last_hour(self, now: float, totals: Totals) -> dict[str, HourCounts]:
        """Each provider's checks since the oldest reading inside the window.

        That reading is up to *sample_every* older than the window's start, so
        the counts cover between the window and the window plus one sample
        interval; the covered span is given with them.
        """
        self.observe(now, totals)
        since, base = self._readings[0]
        by_provider: dict[str, dict[str, int]] = {}
        for (provider, outcome), total in totals.items():
            # A counter never goes down; a lower value would be a new registry
            # (a restart of the metrics): count it from zero.
            before = base.get((provider, outcome), 0.0)
            count = int(total - before) if total >= before else int(total)
            if count:
                by_provider.setdefault(provider, {})[outcome] = count
        span = max(0.0, now - since)
        return {p: HourCounts(counts, span) for p, counts in by_provider.items()}
