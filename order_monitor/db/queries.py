"""The SQL the engine runs against the orders table, and the rows it reads.

Queries are composed once from the layout (identifiers via psycopg.sql) and
sent with server-side parameters; the ones that run per batch take arrays, so
one statement text serves any batch size and stays a prepared statement.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout
from order_monitor.db.connections import AsyncConn
from order_monitor.db.dispatch import DispatchIssue, dispatch_sql, issue_of


@dataclass(frozen=True, slots=True)
class InFlightRow:
    """An order as the checker sees it, re-read just before its check."""

    id: uuid.UUID
    reference: str
    provider_id: str | None
    external_order_id: str | None
    #: Seconds since dispatch ("sentAt", else "createdAt"), by the server's clock;
    #: 0 when that time is unusable (see dispatch_issue).
    elapsed: float
    #: Seconds from dispatch to the last sync, if there was one after dispatch.
    last_checked: float | None
    #: Why the dispatch time is unusable (db.dispatch); None when it is usable.
    dispatch_issue: DispatchIssue | None = None


@dataclass(frozen=True, slots=True)
class SweepRow:
    id: uuid.UUID
    provider_id: str | None
    elapsed: float
    last_checked: float | None
    #: The provider reference, as confirm() reads it (the sweep skips orders
    #: already scheduled, so it need not say).
    reference: str | None = None
    #: Why the dispatch time is unusable (db.dispatch); None when it is usable.
    dispatch_issue: DispatchIssue | None = None


@dataclass(frozen=True, slots=True)
class ColumnLimits:
    """Declared lengths of the text columns we write (None: unbounded)."""

    pin_code: int | None
    provider_message: int | None
    last_message: int | None


@dataclass(frozen=True, slots=True)
class WriteBatch:
    """Column-wise arrays for the write function, one entry per order."""

    ids: list[uuid.UUID]
    references: list[str]
    provider_ids: list[str | None]
    kinds: list[str]
    pins: list[str | None]
    provider_messages: list[str | None]
    last_messages: list[str | None]


@dataclass(frozen=True, slots=True)
class Written:
    """What the write function did with one order of a batch."""

    #: The kind written, or 'locked': another transaction held the row and
    #: nothing was written (schema.LOCKED).
    outcome: str
    #: Whether the result went out on the result channel.
    announced: bool


Row = TypeVar("Row", SweepRow, InFlightRow)

#: Told of a row a query could not read (its id and the error), in place of
#: failing the whole page or batch.
Unreadable = Callable[[uuid.UUID, psycopg.Error], None]


def is_row_error(exc: psycopg.Error, conn: AsyncConn) -> bool:
    """Whether *exc* may come from one row's values rather than the statement or the link.

    A lost connection, a timeout or a cancel (OperationalError), and a
    statement that cannot run at all (ProgrammingError: a missing column, a
    missing grant) fail for every row alike: narrowing them down would only
    blame innocent rows.
    """
    return not (
        conn.broken
        or conn.closed
        or isinstance(exc, psycopg.OperationalError | psycopg.ProgrammingError)
    )


def _timing(
    elapsed: float | None, last_checked: float | None, why: str | None, column: str | None
) -> tuple[float, float | None, DispatchIssue | None]:
    issue = issue_of(elapsed, why, column)
    if issue is not None or elapsed is None:
        # Read as dispatched just now: engine.anchors gives it an age of its own.
        return 0.0, None, issue
    return elapsed, last_checked, None


def _sweep_row(record: Sequence[Any]) -> SweepRow:
    id_, provider_id, elapsed, last_checked, why, column = record
    if why is None and elapsed is not None:
        # Nearly every row: no verdict to read (a sweep makes 100,000 of these).
        return SweepRow(id_, provider_id, elapsed, last_checked)
    e, lc, issue = _timing(elapsed, last_checked, why, column)
    return SweepRow(id_, provider_id, e, lc, None, issue)


def _confirmed_row(record: Sequence[Any]) -> SweepRow:
    id_, provider_id, elapsed, last_checked, why, column, reference = record
    if why is None and elapsed is not None:
        return SweepRow(id_, provider_id, elapsed, last_checked, reference)
    e, lc, issue = _timing(elapsed, last_checked, why, column)
    return SweepRow(id_, provider_id, e, lc, reference, issue)


def confirmed_rows(
    ids: Sequence[uuid.UUID],
    provider_ids: Sequence[str | None],
    elapsed: Sequence[float | None],
    last_checked: Sequence[float | None],
    whys: Sequence[str | None],
    columns: Sequence[str | None],
    references: Sequence[str | None],
) -> list[SweepRow]:
    """The rows of a read that returns :func:`confirm_columns` as one array each.

    Column-wise, because thousands of rows a second cross the wire this way
    (the busy read): arrays load in C, and no row tuple is made.
    """
    rows: list[SweepRow] = []
    append = rows.append
    for id_, provider_id, e, lc, why, column, reference in zip(
        ids, provider_ids, elapsed, last_checked, whys, columns, references, strict=True
    ):
        if why is None and e is not None:
            append(SweepRow(id_, provider_id, e, lc, reference))
        else:
            e2, lc2, issue = _timing(e, lc, why, column)
            append(SweepRow(id_, provider_id, e2, lc2, reference, issue))
    return rows


def confirm_columns(layout: Layout, now: sql.Composable | None = None) -> sql.Composable:
    """What a confirm reads of an order: id, provider id, the dispatch timing, the reference.

    In :func:`_confirmed_row`'s order; shared with the busy read, which
    returns these instead of ids when it can (db.changes). *now* as for
    :func:`~order_monitor.db.dispatch.dispatch_sql`.
    """
    c = layout.columns
    d = dispatch_sql(layout, now=now)
    return sql.SQL(
        "{id}, {provider_id}::text, {elapsed}, {last_checked}, {why}, {column}, {ref}"
    ).format(
        id=sql.Identifier(c.id),
        provider_id=sql.Identifier(c.provider_id),
        elapsed=d.elapsed,
        last_checked=d.last_checked,
        why=d.why,
        column=d.column,
        ref=sql.Identifier(c.provider_ref),
    )


def _in_flight_row(record: Sequence[Any]) -> InFlightRow:
    id_, ref, provider_id, external_order_id, elapsed, last_checked, why, column = record
    if why is None and elapsed is not None:
        # Every row but the odd one: read per checked order.
        return InFlightRow(id_, ref, provider_id, external_order_id, elapsed, last_checked)
    e, lc, issue = _timing(elapsed, last_checked, why, column)
    return InFlightRow(id_, ref, provider_id, external_order_id, e, lc, issue)


async def narrowed(
    conn: AsyncConn,
    read: Callable[[list[uuid.UUID]], Awaitable[list[Row]]],
    ids: list[uuid.UUID],
    unreadable: Unreadable,
) -> list[Row]:
    """*read* of *ids*, leaving out (and reporting) each row that makes it fail.

    Bisects: k bad rows among n cost about 2k·log2(n) small indexed reads,
    and the good rows of a failing batch are read in the same pass.
    Errors that are not a row's (is_row_error) are raised as they are.
    """
    try:
        return await read(ids)
    except psycopg.Error as exc:
        if not ids or not is_row_error(exc, conn):
            raise
        if len(ids) == 1:
            unreadable(ids[0], exc)
            return []
    middle = len(ids) // 2
    return await narrowed(conn, read, ids[:middle], unreadable) + await narrowed(
        conn, read, ids[middle:], unreadable
    )


class Queries:
    """The engine's statements for one table layout."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        c = layout.columns
        names = schema.Names(layout)
        table = names.table
        # Never fails, whatever the time columns hold (db.dispatch): the age,
        # the last check's, and why the dispatch time is unusable if it is.
        d = dispatch_sql(layout)
        timing = sql.SQL("{elapsed}, {last_checked}, {why}, {column}").format(
            elapsed=d.elapsed, last_checked=d.last_checked, why=d.why, column=d.column
        )
        in_flight = schema.in_flight_predicate(layout)
        id_ = sql.Identifier(c.id)

        # The provider id, so an order of a batched provider may share its
        # first check's request with others (Scheduler.pull_open).
        scheduling = sql.SQL("{id}, {provider_id}::text, {timing}").format(
            id=id_, provider_id=sql.Identifier(c.provider_id), timing=timing
        )
        self._sweep_first = sql.SQL(
            "SELECT {scheduling} FROM {table} WHERE {in_flight} ORDER BY {id} LIMIT %s"
        ).format(scheduling=scheduling, id=id_, table=table, in_flight=in_flight)
        self._sweep_next = sql.SQL(
            "SELECT {scheduling} FROM {table} WHERE {in_flight} AND {id} > %s"
            " ORDER BY {id} LIMIT %s"
        ).format(scheduling=scheduling, id=id_, table=table, in_flight=in_flight)
        # The same pages, ids only: what a failing page is narrowed down from.
        # It reads nothing the in-flight rule does not, so a row the page
        # query cannot read is still listed here.
        self._sweep_ids_first = sql.SQL(
            "SELECT {id} FROM {table} WHERE {in_flight} ORDER BY {id} LIMIT %s"
        ).format(id=id_, table=table, in_flight=in_flight)
        self._sweep_ids_next = sql.SQL(
            "SELECT {id} FROM {table} WHERE {in_flight} AND {id} > %s ORDER BY {id} LIMIT %s"
        ).format(id=id_, table=table, in_flight=in_flight)

        # The reference too: an order notified while its check is under way
        # is checked again only if the reference is not the one checked.
        self._confirm = sql.SQL(
            "SELECT {columns} FROM {table} WHERE {id} = ANY(%b) AND {in_flight}"
        ).format(columns=confirm_columns(layout), id=id_, table=table, in_flight=in_flight)

        self._reread = sql.SQL(
            "SELECT {id}, {ref}, {provider_id}::text, {external_order_id}::text, {timing}"
            " FROM {table} WHERE {id} = ANY(%b) AND {in_flight}"
        ).format(
            id=id_,
            ref=sql.Identifier(c.provider_ref),
            provider_id=sql.Identifier(c.provider_id),
            external_order_id=sql.Identifier(c.external_order_id),
            timing=timing,
            table=table,
            in_flight=in_flight,
        )

        # One round trip per batch, through the write function (install.sql):
        # the guarded UPDATE and the result announcements commit together.
        # Arrays go in binary (%b): dumping thousands of list elements as text
        # was a tenth of the engine's CPU under load.
        self._write = sql.SQL(
            "SELECT order_id, outcome, announced FROM {function}(%b, %b, %b, %b, %b, %b, %b)"
        ).format(function=names.write_function)

    async def sweep_page(
        self, conn: AsyncConn, after: uuid.UUID | None, limit: int
    ) -> list[SweepRow]:
        if after is None:
            cursor = await conn.execute(self._sweep_first, (limit,))
        else:
            cursor = await conn.execute(self._sweep_next, (after, limit))
        return [_sweep_row(row) for row in await cursor.fetchall()]

    async def sweep_page_narrowed(
        self, conn: AsyncConn, after: uuid.UUID | None, limit: int, unreadable: Unreadable
    ) -> tuple[list[SweepRow], uuid.UUID | None]:
        """sweep_page(), leaving out (and reporting) each row the page cannot read.

        Also returns where the next page starts: the last id this page
        covered, rows left out or not; None when this was the last page.
        """
        try:
            rows = await self.sweep_page(conn, after, limit)
        except psycopg.Error as exc:
            if not is_row_error(exc, conn):
                raise
        else:
            return rows, rows[-1].id if len(rows) == limit else None
        if after is None:
            cursor = await conn.execute(self._sweep_ids_first, (limit,))
        else:
            cursor = await conn.execute(self._sweep_ids_next, (after, limit))
        ids = [row[0] for row in await cursor.fetchall()]

        async def read(part: list[uuid.UUID]) -> list[SweepRow]:
            # The sweep skips orders already scheduled: no reference to compare.
            return [
                SweepRow(r.id, r.provider_id, r.elapsed, r.last_checked, None, r.dispatch_issue)
                for r in await self.confirm(conn, part)
            ]

        found = await narrowed(conn, read, ids, unreadable)
        return sorted(found, key=lambda r: r.id), ids[-1] if len(ids) == limit else None

    async def confirm(
        self,
        conn: AsyncConn,
        ids: Sequence[uuid.UUID],
        *,
        unreadable: Unreadable | None = None,
    ) -> list[SweepRow]:
        """Those of *ids* that are orders in flight, with where they stand.

        With *unreadable*, a row the query cannot read is left out and
        reported, instead of failing the batch.
        """

        async def read(part: list[uuid.UUID]) -> list[SweepRow]:
            cursor = await conn.execute(self._confirm, (part,))
            return [_confirmed_row(row) for row in await cursor.fetchall()]

        if unreadable is None:
            return await read(list(ids))
        return await narrowed(conn, read, list(ids), unreadable)

    async def fetch_in_flight(
        self,
        conn: AsyncConn,
        ids: Sequence[uuid.UUID],
        *,
        unreadable: Unreadable | None = None,
    ) -> list[InFlightRow]:
        """Those of *ids* still in flight, re-read (see confirm() for *unreadable*)."""

        async def read(part: list[uuid.UUID]) -> list[InFlightRow]:
            cursor = await conn.execute(self._reread, (part,))
            return [_in_flight_row(row) for row in await cursor.fetchall()]

        if unreadable is None:
            return await read(list(ids))
        return await narrowed(conn, read, list(ids), unreadable)

    async def write(self, conn: AsyncConn, batch: WriteBatch) -> dict[uuid.UUID, Written]:
        """Apply the batch; return what became of each order written or skipped.

        An order missing from the result was finished by someone else, or got
        a new provider reference, since it was read: its result is stale. One
        whose row another transaction held is there as 'locked', not written.
        """
        params: list[Any] = [
            batch.ids,
            batch.references,
            batch.provider_ids,
            batch.kinds,
            batch.pins,
            batch.provider_messages,
            batch.last_messages,
        ]
        cursor = await conn.execute(self._write, params)
        return {row[0]: Written(row[1], row[2]) for row in await cursor.fetchall()}
