"""What the page reads from the database: one statement per refresh, one per order looked up.

Every viewer shares a reading (``page.cache``), so these costs are per
refresh interval, not per viewer:

* orders in flight per provider id, with the oldest one's age: the daemon's
  own in-flight predicate with its literals, so the planner answers it from
  the partial index and its cost follows the orders in flight, not the table;
* the orders that gave up lately, by primary key: the ids come from
  :class:`~order_monitor.page.ledger.GaveUpLedger`, so the table is not
  scanned for them (:meth:`PageStatements.gave_up_within` does, once per term);
* the outbox's summary and its newest dead letters, when actions deliver
  results: the outbox holds only what is not delivered, so it is small.

Never the PIN: no statement here names the PIN column (nor the provider's
message), and the role ``sql/role.sql`` creates for the daemon may not read
either: its SELECT is granted column by column. The last message of an
order that finished done is the provider's completion text, which may quote
the code: the page does not show it (``page.view``).

Every function called is schema-qualified, and an odd value (an infinite
or future timestamp) gives a NULL age, never an error (``db.dispatch``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from psycopg import sql

from order_monitor import schema
from order_monitor.config import Settings
from order_monitor.db import AsyncConn
from order_monitor.db.dispatch import DispatchIssue, dispatch_sql, issue_of
from order_monitor.delivery.store import OutboxStore, OutboxSummary, summary_of
from order_monitor.operator.check import OrderState
from order_monitor.operator.status import GaveUpOrder

#: Dead letters listed on the page (all are counted).
DEAD_LISTED: Final = 10
#: Orders that gave up listed on the page, the latest first (all are counted).
GAVE_UP_LISTED: Final = 50
#: The read of the table for the orders that gave up before this term: a
#: sequential scan, given this long before the page shows without them.
SEED_TIMEOUT_MS: Final = 30_000


@dataclass(frozen=True, slots=True)
class InFlightGroup:
    """Orders in flight with one provider id."""

    provider_id: str | None
    orders: int
    #: Seconds since the oldest one's dispatch (usable dispatch times only).
    oldest_s: float | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    delivery_id: uuid.UUID
    order_id: uuid.UUID
    outcome: str
    tries: int
    last_error: str | None
    #: Seconds since it became a dead letter.
    age_s: float | None


@dataclass(frozen=True, slots=True)
class TableReading:
    """One refresh's reading of the table (and the outbox)."""

    in_flight: list[InFlightGroup]
    #: The latest that gave up (at most GAVE_UP_LISTED), newest first.
    gave_up: list[GaveUpOrder]
    #: How many of the ids asked about still need a human (listed or not).
    gave_up_count: int = 0
    #: None when no action delivers results.
    outbox: OutboxSummary | None = None
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def in_flight_total(self) -> int:
        return sum(group.orders for group in self.in_flight)


@dataclass(frozen=True, slots=True)
class OrderRow(OrderState):
    """One order as the page reads it (what `check` reads, and more): never its PIN
    (see the module docstring)."""

    #: Seconds since dispatch; None when the dispatch time is unusable (*dispatch_issue*).
    dispatched_s: float | None
    dispatch_issue: DispatchIssue | None
    last_sync_s: float | None
    completed_s: float | None
    last_message: str | None


def _age(column: str) -> sql.Composed:
    return sql.SQL(
        "CASE WHEN pg_catalog.isfinite({c})"
        " THEN pg_catalog.date_part('epoch', pg_catalog.now() - {c}) END"
    ).format(c=sql.Identifier(column))


class PageStatements:
    """The page's statements for one configuration."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        layout = settings.layout
        c = layout.columns
        names = schema.Names(layout)
        d = dispatch_sql(layout)
        ident = sql.Identifier
        self._outbox = OutboxStore(layout) if settings.actions else None
        outbox_parts: sql.Composable = sql.SQL("NULL::json, NULL::json")
        if self._outbox is not None:
            outbox_parts = sql.SQL(
                "(SELECT coalesce(pg_catalog.json_agg(s), '[]') FROM ({summary}) AS s),"
                " (SELECT coalesce(pg_catalog.json_agg(x), '[]') FROM ("
                "SELECT delivery_id, order_id, outcome, tries, last_error,"
                " pg_catalog.date_part('epoch', pg_catalog.now() - dead_at) AS age_s"
                " FROM {outbox} WHERE dead_at IS NOT NULL"
                " ORDER BY dead_at DESC, delivery_id LIMIT {listed}) AS x)"
            ).format(
                summary=self._outbox.summary_sql(),
                outbox=names.outbox,
                listed=sql.Literal(DEAD_LISTED),
            )
        self.reading_statement = sql.SQL(
            "SELECT"
            " (SELECT coalesce(pg_catalog.json_agg(p), '[]') FROM ("
            "SELECT {pid}::text AS provider_id, pg_catalog.count(*) AS orders,"
            " pg_catalog.max({elapsed}) FILTER (WHERE {usable}) AS oldest_s"
            " FROM {table} WHERE {in_flight} GROUP BY 1) AS p),"
            " (SELECT coalesce(pg_catalog.json_agg(g), '[]') FROM ("
            "SELECT {id} AS id, {pid}::text AS provider_id, {ref}::text AS reference,"
            " {last_sync_age} AS age_s, {last_message}::text AS last_message"
            " FROM {table} WHERE {id} = ANY(%(gave_up)s) AND {ext}::text = %(gave_up_status)s"
            ") AS g),"
            " (SELECT pg_catalog.count(*) FROM {table}"
            " WHERE {id} = ANY(%(gave_up_all)s) AND {ext}::text = %(gave_up_status)s),"
            " {outbox_parts}"
        ).format(
            pid=ident(c.provider_id),
            elapsed=d.elapsed,
            usable=d.usable,
            table=names.table,
            in_flight=schema.in_flight_predicate(layout),
            id=ident(c.id),
            ref=ident(c.provider_ref),
            last_sync_age=_age(c.last_sync_at),
            last_message=ident(c.last_message),
            ext=ident(c.external_status),
            outbox_parts=outbox_parts,
        )
        self.gave_up_statement = sql.SQL(
            "SELECT {id}, {last_sync_age} FROM {table}"
            " WHERE {ext}::text = %(gave_up_status)s"
            " AND {last_sync} >= pg_catalog.now() - %(window)s::interval"
            " AND {last_sync} <= pg_catalog.now()"
        ).format(
            id=ident(c.id),
            last_sync_age=_age(c.last_sync_at),
            table=names.table,
            ext=ident(c.external_status),
            last_sync=ident(c.last_sync_at),
        )
        self.order_statement = sql.SQL(
            "SELECT {id}, {status}::text, {ext}::text, {ref}::text, {pid}::text,"
            " coalesce({in_flight}, false), {elapsed}, {why}, {column},"
            " {last_sync_age}, {completed_age}, {last_message}::text"
            " FROM {table} WHERE {id} = %s"
        ).format(
            id=ident(c.id),
            status=ident(c.status),
            ext=ident(c.external_status),
            ref=ident(c.provider_ref),
            pid=ident(c.provider_id),
            in_flight=schema.in_flight_predicate(layout),
            elapsed=d.elapsed,
            why=d.why,
            column=d.column,
            last_sync_age=_age(c.last_sync_at),
            completed_age=_age(c.completed_at),
            last_message=ident(c.last_message),
            table=names.table,
        )

    async def read(self, conn: AsyncConn, gave_up: Sequence[uuid.UUID]) -> TableReading:
        """The refresh's reading, in one statement; *gave_up* newest first.

        The first GAVE_UP_LISTED are read whole (by primary key); the rest are
        only counted, so a bad day's thousand give-ups do not cross the wire
        at every refresh.
        """
        listed = list(gave_up[:GAVE_UP_LISTED])
        cursor = await conn.execute(self.reading_statement, self.reading_parameters(gave_up))
        row = await cursor.fetchone()
        assert row is not None
        in_flight_json, gave_up_json, gave_up_count, summary_json, dead_json = row
        reading = reading_of(in_flight_json, gave_up_json, summary_json, dead_json, listed)
        return replace(reading, gave_up_count=int(gave_up_count))

    def reading_parameters(self, gave_up: Sequence[uuid.UUID]) -> dict[str, Any]:
        return {
            "gave_up": list(gave_up[:GAVE_UP_LISTED]),
            "gave_up_all": list(gave_up),
            "gave_up_status": self._settings.writes.gave_up_external_status,
        }

    async def gave_up_within(
        self, conn: AsyncConn, window_s: float
    ) -> list[tuple[uuid.UUID, float]]:
        """(id, seconds ago) of every order that gave up within *window_s*: a table scan."""
        async with conn.transaction():
            # SET LOCAL takes no parameters; the value is ours, not the viewer's.
            await conn.execute(
                sql.SQL("SET LOCAL statement_timeout = {}").format(
                    sql.Literal(f"{SEED_TIMEOUT_MS}ms")
                )
            )
            cursor = await conn.execute(
                self.gave_up_statement,
                {
                    "gave_up_status": self._settings.writes.gave_up_external_status,
                    "window": f"{window_s:.0f} seconds",
                },
            )
            rows = await cursor.fetchall()
        return [(order, float(age)) for order, age in rows if age is not None]

    async def order(self, conn: AsyncConn, order_id: uuid.UUID) -> OrderRow | None:
        cursor = await conn.execute(self.order_statement, (order_id,))
        row = await cursor.fetchone()
        if row is None:
            return None
        (id_, status, ext, ref, pid, in_flight, elapsed, why, column, *rest) = row
        last_sync, completed, last_message = rest
        issue = issue_of(elapsed, why, column)
        return OrderRow(
            id=id_,
            status=status,
            external_status=ext,
            reference=ref,
            provider_id=pid,
            in_flight=bool(in_flight),
            dispatched_s=None if issue is not None or elapsed is None else float(elapsed),
            dispatch_issue=issue,
            last_sync_s=_seconds(last_sync),
            completed_s=_seconds(completed),
            last_message=last_message,
        )


def _seconds(value: Any) -> float | None:
    return None if value is None else float(value)


def reading_of(
    in_flight: Sequence[Mapping[str, Any]],
    gave_up: Sequence[Mapping[str, Any]],
    summary: Sequence[Mapping[str, Any]] | None,
    dead: Sequence[Mapping[str, Any]] | None,
    asked: Sequence[uuid.UUID],
) -> TableReading:
    """The reading from the statement's JSON columns; gave-ups in the order *asked* (newest
    first), the ones that no longer gave up left out."""
    groups = [
        InFlightGroup(g["provider_id"], int(g["orders"]), _seconds(g["oldest_s"]))
        for g in in_flight
    ]
    groups.sort(key=lambda g: (g.provider_id is None, g.provider_id or ""))
    found = {
        uuid.UUID(g["id"]): GaveUpOrder(
            uuid.UUID(g["id"]),
            g["provider_id"],
            g["reference"],
            _seconds(g["age_s"]),
            g["last_message"],
        )
        for g in gave_up
    }
    outbox = None
    if summary is not None:
        outbox = summary_of(
            [(s["outcome"], s["waiting"], s["dead"], s["auth"], s["oldest_s"]) for s in summary]
        )
    letters = [
        DeadLetter(
            uuid.UUID(d["delivery_id"]),
            uuid.UUID(d["order_id"]),
            d["outcome"],
            int(d["tries"]),
            d["last_error"],
            _seconds(d["age_s"]),
        )
        for d in dead or ()
    ]
    listed = [found[order] for order in asked if order in found]
    return TableReading(
        groups, listed, gave_up_count=len(listed), outbox=outbox, dead_letters=letters
    )
