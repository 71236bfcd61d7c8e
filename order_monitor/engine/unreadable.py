"""Rows a query could not read: skipped, named by id, warned about at most once an interval.

A page or batch that fails on one row's values is narrowed down to that row
(db.queries.narrowed); the good rows go on. The bad one is found again at
every sweep, so the warning is rate-limited per order. Neither the log nor
the metric carries the row's values: PostgreSQL quotes the offending value in
many messages (``invalid input syntax for type integer: "…"``), so quoted
parts of the message are masked.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Final

import psycopg

from order_monitor.logs import get_logger
from order_monitor.metrics import Metrics

log = get_logger()

_QUOTED: Final = re.compile(r'"[^"]*"')
#: Past this many remembered orders, expired ones are swept out.
_PRUNE_AT: Final = 1024


def primary_message(exc: psycopg.Error) -> str:
    """The error's primary message with every quoted part masked, on one line."""
    text = exc.diag.message_primary
    if not text:
        # Raised by the client (a value it cannot load): no diagnostics.
        lines = str(exc).strip().splitlines()
        text = lines[0] if lines else type(exc).__name__
    return _QUOTED.sub('"…"', text)


class UnreadableRows:
    """Reports unreadable rows as *event*, once per order per *interval* seconds."""

    def __init__(
        self,
        event: str,
        *,
        where: str,
        metrics: Metrics,
        clock: Callable[[], float],
        interval: float,
    ) -> None:
        self._event = event
        self._counter = metrics.rows_unreadable.labels(where)
        self._clock = clock
        self.interval = interval
        self._warned: dict[uuid.UUID, float] = {}

    def __call__(self, order_id: uuid.UUID, exc: psycopg.Error) -> None:
        self._counter.inc()
        now = self._clock()
        last = self._warned.get(order_id)
        if last is not None and now - last < self.interval:
            return
        if len(self._warned) >= _PRUNE_AT:
            # Bounded by the rows that failed within one interval.
            self._warned = {k: t for k, t in self._warned.items() if now - t < self.interval}
        self._warned[order_id] = now
        log.warning(
            self._event,
            order_id=str(order_id),
            error_class=type(exc).__name__,
            sqlstate=exc.sqlstate,
            error=primary_message(exc),
            note="this order is skipped until the row can be read; the others go on",
        )
