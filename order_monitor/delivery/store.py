"""The outbox's queries: what the relay and the operator commands read and change.

The outbox (``schema.outbox``) holds what is not delivered yet and the dead
letters; only the write function INSERTs into it. The daemon's role may
SELECT and DELETE it and UPDATE the bookkeeping columns, which is all these
queries do. Every statement is one round trip, batched over arrays, and
touches only the entries it names: a delivery settled by one leader is never
updated by a statement about another.

The relay's connection is in autocommit: each statement is its own
transaction. That is enough, since only the leader changes undelivered
entries, and an operator changes only dead letters, which the relay never
touches (every relay statement says ``dead_at IS NULL``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from psycopg import sql

from order_monitor.config import Layout
from order_monitor.db import AsyncConn
from order_monitor.delivery.model import Entry, Verdict
from order_monitor.schema.names import Names

#: The columns an :class:`Entry` is read from, in its fields' order.
_ENTRY_COLUMNS: Final = sql.SQL(
    "delivery_id, order_id, outcome, provider_message, last_message, columns, recorded_at,"
    " tries, rejections, last_error, last_verdict, due_at, dead_at, requeued_at"
)


@dataclass(frozen=True, slots=True)
class Reschedule:
    """A failed (or not made) attempt: when to try again, and why it failed."""

    delivery_id: uuid.UUID
    #: Seconds from now.
    delay: float
    #: The attempt's Verdict value.
    verdict: str
    error: str
    #: The application refused this order: counted toward the action's attempts.
    rejected: bool
    #: False when no request went out (circuit open, Retry-After, waiting for
    #: a credentials probe): not counted as a try, so the backoff does not grow.
    attempted: bool = True


@dataclass(frozen=True, slots=True)
class OutboxSummary:
    """The outbox at a glance (status, the operator's listing, the relay's gauges)."""

    #: Entries not delivered yet and not dead letters.
    undelivered: int
    #: Seconds since the oldest of them was written; None when there is none.
    oldest_undelivered_age: float | None
    dead: int
    #: Undelivered entries whose last attempt was refused for its credentials.
    auth_waiting: int = 0
    #: Undelivered entries per outcome.
    by_outcome: Mapping[str, int] = field(default_factory=dict)


def summary_of(rows: Sequence[Sequence[Any]]) -> OutboxSummary:
    """The summary from the rows of :meth:`OutboxStore.summary_sql`, in its column order."""
    undelivered = dead = auth = 0
    oldest: float | None = None
    by_outcome: dict[str, int] = {}
    for outcome, waiting, buried, refused, age in rows:
        undelivered += waiting
        dead += buried
        auth += refused
        if waiting:
            by_outcome[outcome] = int(waiting)
        if age is not None:
            oldest = max(0.0, float(age)) if oldest is None else max(oldest, float(age))
    return OutboxSummary(undelivered, oldest, dead, auth, by_outcome)


def entry_of(row: Sequence[Any]) -> Entry:
    """An :class:`Entry` from a row of ``_ENTRY_COLUMNS``."""
    return Entry(
        delivery_id=row[0],
        order_id=row[1],
        outcome=row[2],
        provider_message=row[3],
        last_message=row[4],
        columns=row[5] or {},
        recorded_at=row[6],
        tries=int(row[7]),
        rejections=int(row[8]),
        last_error=row[9],
        last_verdict=row[10],
        due_at=row[11],
        dead_at=row[12],
        requeued_at=row[13],
    )


class OutboxStore:
    """The queries for one table's outbox."""

    def __init__(self, layout: Layout) -> None:
        names = Names(layout)
        self._outbox = names.outbox
        self._table = names.table
        self._id = sql.Identifier(layout.columns.id)
        self._status = sql.Identifier(layout.columns.status)

    # --- the relay ------------------------------------------------------------------

    async def due(self, conn: AsyncConn, limit: int) -> list[Entry]:
        """Up to *limit* undelivered entries due now, the longest due first (the index's order)."""
        cursor = await conn.execute(
            sql.SQL(
                "SELECT {columns} FROM {outbox}"
                " WHERE dead_at IS NULL AND due_at <= pg_catalog.now()"
                " ORDER BY due_at, delivery_id LIMIT %s"
            ).format(columns=_ENTRY_COLUMNS, outbox=self._outbox),
            (limit,),
        )
        return [entry_of(row) for row in await cursor.fetchall()]

    async def next_due_in(self, conn: AsyncConn) -> float | None:
        """Seconds until the next undelivered entry is due (<= 0: now); None when none waits."""
        cursor = await conn.execute(
            sql.SQL(
                "SELECT extract(epoch FROM pg_catalog.min(due_at) - pg_catalog.now())::float8"
                " FROM {outbox} WHERE dead_at IS NULL"
            ).format(outbox=self._outbox)
        )
        row = await cursor.fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def statuses(
        self, conn: AsyncConn, order_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, str | None]:
        """The orders' status now, for the ones that still exist (a confirm reads these)."""
        cursor = await conn.execute(
            sql.SQL("SELECT {id}, {status} FROM {table} WHERE {id} = ANY(%s::uuid[])").format(
                id=self._id, status=self._status, table=self._table
            ),
            (list(dict.fromkeys(order_ids)),),
        )
        return {row[0]: row[1] for row in await cursor.fetchall()}

    async def delivered(self, conn: AsyncConn, delivery_ids: Sequence[uuid.UUID]) -> int:
        """Forget delivered entries (the outbox keeps only what is still to do)."""
        cursor = await conn.execute(
            sql.SQL(
                "DELETE FROM {outbox} WHERE delivery_id = ANY(%s::uuid[]) AND dead_at IS NULL"
            ).format(outbox=self._outbox),
            (list(delivery_ids),),
        )
        return cursor.rowcount

    async def reschedule(self, conn: AsyncConn, items: Sequence[Reschedule]) -> int:
        """Record failed attempts and when each entry is due again, in one statement."""
        if not items:
            return 0
        cursor = await conn.execute(
            sql.SQL(
                "UPDATE {outbox} AS o SET"
                " due_at = pg_catalog.now() + pg_catalog.make_interval(secs => r.delay),"
                " tries = o.tries + r.attempted::integer,"
                " rejections = o.rejections + r.rejected::integer,"
                " last_verdict = r.verdict,"
                " last_error = r.error"
                " FROM ROWS FROM (pg_catalog.unnest(%s::uuid[]), pg_catalog.unnest(%s::float8[]),"
                " pg_catalog.unnest(%s::text[]), pg_catalog.unnest(%s::text[]),"
                " pg_catalog.unnest(%s::bool[]), pg_catalog.unnest(%s::bool[]))"
                " AS r(id, delay, verdict, error, rejected, attempted)"
                " WHERE o.delivery_id = r.id AND o.dead_at IS NULL"
            ).format(outbox=self._outbox),
            (
                [i.delivery_id for i in items],
                [max(0.0, i.delay) for i in items],
                [i.verdict for i in items],
                [i.error for i in items],
                [i.rejected for i in items],
                [i.attempted for i in items],
            ),
        )
        return cursor.rowcount

    async def bury(self, conn: AsyncConn, items: Sequence[tuple[uuid.UUID, str, str]]) -> int:
        """Make dead letters of (delivery id, verdict, error): kept for an operator."""
        if not items:
            return 0
        cursor = await conn.execute(
            sql.SQL(
                "UPDATE {outbox} AS o SET"
                " dead_at = pg_catalog.now(),"
                " tries = o.tries + 1,"
                " rejections = o.rejections + (r.verdict = {rejected})::integer,"
                " last_verdict = r.verdict,"
                " last_error = r.error"
                " FROM ROWS FROM (pg_catalog.unnest(%s::uuid[]), pg_catalog.unnest(%s::text[]),"
                " pg_catalog.unnest(%s::text[])) AS r(id, verdict, error)"
                " WHERE o.delivery_id = r.id AND o.dead_at IS NULL"
            ).format(outbox=self._outbox, rejected=sql.Literal(Verdict.REJECTED.value)),
            ([i[0] for i in items], [i[1] for i in items], [i[2] for i in items]),
        )
        return cursor.rowcount

    # --- everyone -------------------------------------------------------------------

    def summary_sql(self) -> sql.Composed:
        """One row per outcome: outcome, waiting, dead, auth, oldest_s (see :func:`summary_of`).

        A statement of its own for :meth:`summary`, or a subquery of a bigger
        one (the operator page reads it with the table in one round trip).
        """
        return sql.SQL(
            "SELECT outcome, pg_catalog.count(*) FILTER (WHERE dead_at IS NULL) AS waiting,"
            " pg_catalog.count(*) FILTER (WHERE dead_at IS NOT NULL) AS dead,"
            " pg_catalog.count(*) FILTER (WHERE dead_at IS NULL AND last_verdict = {auth}) AS auth,"
            " extract(epoch FROM pg_catalog.now()"
            " - pg_catalog.min(recorded_at) FILTER (WHERE dead_at IS NULL))::float8 AS oldest_s"
            " FROM {outbox} GROUP BY outcome"
        ).format(outbox=self._outbox, auth=sql.Literal(Verdict.AUTH.value))

    async def summary(self, conn: AsyncConn) -> OutboxSummary:
        """Counts and the oldest undelivered entry's age, in one scan of the (small) outbox."""
        cursor = await conn.execute(self.summary_sql())
        return summary_of(await cursor.fetchall())

    async def listing(self, conn: AsyncConn, *, dead: bool | None, limit: int) -> list[Entry]:
        """The newest recorded entries: dead letters only (True), undelivered only (False), all."""
        where = {
            None: sql.SQL("TRUE"),
            True: sql.SQL("dead_at IS NOT NULL"),
            False: sql.SQL("dead_at IS NULL"),
        }[dead]
        cursor = await conn.execute(
            sql.SQL(
                "SELECT {columns} FROM {outbox} WHERE {where}"
                " ORDER BY recorded_at DESC, delivery_id LIMIT %s"
            ).format(columns=_ENTRY_COLUMNS, outbox=self._outbox, where=where),
            (limit,),
        )
        return [entry_of(row) for row in await cursor.fetchall()]

    async def entries(
        self, conn: AsyncConn, ids: Sequence[uuid.UUID], *, lock: bool = False
    ) -> list[Entry]:
        """The entries whose delivery id or order id is one of *ids*, newest recorded first."""
        cursor = await conn.execute(
            sql.SQL(
                "SELECT {columns} FROM {outbox}"
                " WHERE delivery_id = ANY(%(ids)s::uuid[]) OR order_id = ANY(%(ids)s::uuid[])"
                " ORDER BY recorded_at DESC, delivery_id{lock}"
            ).format(
                columns=_ENTRY_COLUMNS,
                outbox=self._outbox,
                lock=sql.SQL(" FOR UPDATE") if lock else sql.SQL(""),
            ),
            {"ids": list(dict.fromkeys(ids))},
        )
        return [entry_of(row) for row in await cursor.fetchall()]

    async def requeue(self, conn: AsyncConn, delivery_ids: Sequence[uuid.UUID] | None) -> int:
        """Dead letters due again now, refusals from zero, max_age from now (None: every one)."""
        cursor = await conn.execute(
            sql.SQL(
                "UPDATE {outbox} SET dead_at = NULL, due_at = pg_catalog.now(),"
                " requeued_at = pg_catalog.now(), tries = 0, rejections = 0"
                " WHERE dead_at IS NOT NULL{named}"
            ).format(
                outbox=self._outbox,
                named=sql.SQL("")
                if delivery_ids is None
                else sql.SQL(" AND delivery_id = ANY(%s::uuid[])"),
            ),
            None if delivery_ids is None else (list(delivery_ids),),
        )
        return cursor.rowcount

    async def drop(self, conn: AsyncConn, delivery_ids: Sequence[uuid.UUID]) -> int:
        """Forget dead letters: the application is never told."""
        cursor = await conn.execute(
            sql.SQL(
                "DELETE FROM {outbox} WHERE dead_at IS NOT NULL AND delivery_id = ANY(%s::uuid[])"
            ).format(outbox=self._outbox),
            (list(delivery_ids),),
        )
        return cursor.rowcount
