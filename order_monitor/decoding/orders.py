"""Which decoded rows may be orders in flight (pure).

A first filter only: the confirmer reads every id handed on and keeps the
rows the server's own rule says are in flight. So it errs one way: a row it
cannot judge as PostgreSQL would (a status word with a character outside
ASCII, where Python's ``lower()`` and the database's collation may differ;
a value not sent because it was TOASTed and unchanged) is handed on.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping

from order_monitor.config import Layout
from order_monitor.decoding.pgoutput import UnchangedToast

Row = Mapping[str, str | UnchangedToast | None]


def _lower_is(value: str, words: frozenset[str]) -> bool | None:
    """Whether lower(value) is one of *words*; None when Python cannot tell as PostgreSQL would."""
    if not value.isascii():
        return None
    return value.lower() in words


def may_be_in_flight(row: Row, layout: Layout) -> bool:
    c = layout.columns
    reference = row.get(c.provider_ref)
    if reference is None:
        return False
    external, status = row.get(c.external_status), row.get(c.status)
    if isinstance(external, UnchangedToast) or isinstance(status, UnchangedToast):
        return True
    if external is None or status is None:
        # lower(NULL) IN (...) is NULL: never in flight, as the index says.
        return False
    dispatched = _lower_is(external, frozenset(layout.in_flight_external_statuses))
    final = _lower_is(status, frozenset(layout.final_statuses))
    return dispatched is not False and final is not True


def order_ids(rows: Iterable[Row], layout: Layout) -> tuple[list[uuid.UUID], int]:
    """The ids of rows that may be in flight, once each, in order; and how many ids were junk."""
    seen: dict[uuid.UUID, None] = {}
    junk = 0
    for row in rows:
        if not may_be_in_flight(row, layout):
            continue
        value = row.get(layout.columns.id)
        try:
            order = uuid.UUID(value) if isinstance(value, str) else None
        except ValueError:
            order = None
        if order is None:
            junk += 1
            continue
        seen[order] = None
    return list(seen), junk
