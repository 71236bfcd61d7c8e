"""An order's age, in SQL that cannot fail on any value the table can hold.

``timestamptz`` holds ``infinity`` and ``-infinity``, and ``now() - 'infinity'``
raises: computed per row, one such row failed every sweep page, confirm and
re-read that met it. A layout may also leave both time columns NULL, and a
shop that stores local time as UTC writes a "sentAt" hours in the future.

The rules, shared by the engine's queries and the operator commands:

* the dispatch time is "sentAt", or "createdAt" when "sentAt" is NULL (never
  "createdAt" because "sentAt" is unusable: an order created days before it
  was dispatched would be given up at its first check);
* it is *usable* when it is finite and not in the future. Only then is an
  age computed (and the last sync measured from it);
* otherwise the row says why (:class:`DispatchIssue`) and reads as dispatched
  just now; the daemon anchors such an order on when it first saw it
  (``engine.anchors``), so its schedule advances and it is given up like any
  other instead of being checked every ``initial_delay`` for ever.

Every function call is schema-qualified: a ``public.now()`` or
``public.isfinite(timestamptz)`` of someone else's must never run as us.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from psycopg import sql

from order_monitor.config import Layout

Why = Literal["missing", "infinity", "-infinity", "future"]
WHYS: Final[frozenset[str]] = frozenset({"missing", "infinity", "-infinity", "future"})


@dataclass(frozen=True, slots=True)
class DispatchIssue:
    """Why an order's dispatch time cannot be used, for the log and the operator."""

    why: Why
    #: The configured column the time came from (None when both are NULL).
    column: str | None
    #: For 'future': how far ahead of the server's clock it is.
    ahead_s: float | None = None

    @property
    def reason(self) -> str:
        """The metric label: 'missing', 'infinite' or 'future'."""
        return "infinite" if self.why in {"infinity", "-infinity"} else self.why

    def describe(self, layout: Layout) -> str:
        c = layout.columns
        if self.why == "missing":
            return f"{c.sent_at} and {c.created_at} are both NULL"
        if self.why == "future":
            ahead = self.ahead_s or 0.0
            return f"{self.column} is {ahead:.0f} s ahead of the database's clock"
        return f"{self.column} is {self.why}"


@dataclass(frozen=True, slots=True)
class DispatchSql:
    """The select-list pieces for one layout (see the module docstring)."""

    #: Seconds since dispatch when usable; when finite but in the future, minus
    #: how far ahead it is; NULL when missing or infinite.
    elapsed: sql.Composable
    #: Seconds from dispatch to the last sync, when both are usable and in order.
    last_checked: sql.Composable
    #: NULL when usable, else 'missing', 'infinity', '-infinity' or 'future'.
    why: sql.Composable
    #: The configured name of the column the dispatch time came from.
    column: sql.Composable
    #: True when the dispatch time is usable (for WHERE and ORDER BY).
    usable: sql.Composable
    #: The dispatch time itself (only to compare, never to subtract from).
    dispatched: sql.Composable


def dispatch_sql(
    layout: Layout, alias: str | None = None, now: sql.Composable | None = None
) -> DispatchSql:
    """The dispatch-time expressions of *layout*, optionally on a row alias (a constant of ours).

    *now*: the moment ages are measured at, ``pg_catalog.now()`` unless given
    (the busy read gives one taken after its snapshot: db.changes).
    """
    c = layout.columns

    def col(name: str) -> sql.Composable:
        ident = sql.Identifier(name)
        return ident if alias is None else sql.Composed([sql.SQL(alias + "."), ident])

    sent, created, last_sync = col(c.sent_at), col(c.created_at), col(c.last_sync_at)
    dispatched = sql.SQL("coalesce({sent}, {created})").format(sent=sent, created=created)
    if now is None:
        now = sql.SQL("pg_catalog.now()")
    finite = sql.SQL("pg_catalog.isfinite({d})").format(d=dispatched)
    usable = sql.SQL("({finite} AND {d} <= {now})").format(finite=finite, d=dispatched, now=now)
    # CASE evaluates a branch only when its condition holds, so neither
    # subtraction ever meets an infinity. Nor a wrap-around: a difference of
    # timestamps is int64 microseconds (292,000 years) while their range
    # spans 299,000, and PostgreSQL 15 wraps it silently (4713 BC to
    # 294276 AD reads as -285,000 years). Hence a last sync counts only
    # when it is not in the future either: both ends then lie between
    # 4713 BC and now.
    elapsed = sql.SQL(
        "CASE WHEN {finite} THEN pg_catalog.date_part('epoch', {now} - {d})::float8 END"
    ).format(finite=finite, now=now, d=dispatched)
    last_checked = sql.SQL(
        "CASE WHEN {usable} AND pg_catalog.isfinite({last_sync})"
        " AND {last_sync} >= {d} AND {last_sync} <= {now}"
        " THEN pg_catalog.date_part('epoch', {last_sync} - {d})::float8 END"
    ).format(usable=usable, last_sync=last_sync, d=dispatched, now=now)
    why = sql.SQL(
        "CASE WHEN {d} IS NULL THEN 'missing'"
        " WHEN NOT {finite} THEN CASE WHEN {d} > {now} THEN 'infinity' ELSE '-infinity' END"
        " WHEN {d} > {now} THEN 'future' END"
    ).format(d=dispatched, finite=finite, now=now)
    column = sql.SQL(
        "CASE WHEN {sent} IS NOT NULL THEN {sent_name} ELSE {created_name} END"
    ).format(sent=sent, sent_name=sql.Literal(c.sent_at), created_name=sql.Literal(c.created_at))
    return DispatchSql(elapsed, last_checked, why, column, usable, dispatched)


def issue_of(elapsed: float | None, why: str | None, column: str | None) -> DispatchIssue | None:
    """The issue a row's ``why`` column reports, None when its dispatch time is usable."""
    if why is None:
        return None
    if why not in WHYS:  # pragma: no cover - the CASE above yields no other value
        raise ValueError(f"unexpected dispatch-time verdict {why!r}")
    if why == "missing":
        return DispatchIssue("missing", None)
    if why == "future":
        return DispatchIssue("future", column, -(elapsed or 0.0))
    return DispatchIssue(why, column)  # type: ignore[arg-type]
