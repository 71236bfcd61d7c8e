"""The busy read's statements: orders in flight changed since a mark, and what is installed.

See :mod:`order_monitor.engine.changes` for why a transaction-id mark
returns every order the trigger left unannounced. Every function and type
is schema-qualified: the session may be the leader lock's.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout
from order_monitor.db.connections import AsyncConn
from order_monitor.db.queries import SweepRow, confirm_columns, confirmed_rows
from order_monitor.engine.changes import Mark


class Install(enum.Enum):
    """Which trigger the table has, as far as the busy read is concerned."""

    #: Versions 5 and 6: while busy, the trigger calls nothing; the daemon reads changes.
    GATED = "gated"
    #: Version 5 or 6 before role.sql granted SELECT on xmin: the daemon cannot read
    #: changes yet, so it holds the idle lock and the trigger NOTIFYs always.
    GATED_UNREADABLE = "gated_unreadable"
    #: Versions 2 to 4: while busy, the trigger writes ids to the inbox.
    INBOX = "inbox"
    #: Version 1 (or nothing usable): the trigger always NOTIFYs.
    NOTIFY_ONLY = "notify_only"


@dataclass(frozen=True, slots=True)
class Changed:
    """What one busy read returned."""

    ids: list[uuid.UUID]
    #: The read's snapshot: the oldest transaction still running, as xid8.
    snapshot_xmin: int
    #: ...and the first transaction id not yet assigned when it was taken.
    snapshot_xmax: int
    #: The orders themselves, as a confirm reads them, in the order of *ids*;
    #: None when the read returned ids only.
    rows: list[SweepRow] | None = None


class ChangeStatements:
    def __init__(self, layout: Layout) -> None:
        names = schema.Names(layout)
        in_flight = schema.in_flight_predicate(layout)
        id_ = sql.Identifier(layout.columns.id)
        # One statement, so one snapshot: the ids and the next mark come from
        # the same one. The partial index of orders in flight is used (the
        # predicate is the index's, literally); xmin is read from each heap
        # row it points to, and only the ids of the rows that pass cross the
        # wire. age() of two 32-bit ids is compared within one statement,
        # against the same reference id, so the comparison is exact (within
        # 2^31: Mark.exact_at). No lower bound on age(xmin): the reference is
        # taken at age()'s first call in the transaction, which the planner
        # makes when it estimates age(<the mark>), before the snapshot exists.
        # A transaction given its id after that and committed before the
        # snapshot has a negative age; "BETWEEN 0 AND" left its rows out
        # while the mark moved past them (5 orders of 141,000 lost at full
        # speed in bench/trigger.py). Without the bound, a row whose raw xmin
        # is over 2^31 transactions old (frozen) reads as new: it is an order
        # in flight all the same, which the daemon drops if it has it.
        since = sql.SQL(
            " AND pg_catalog.age(xmin) <= pg_catalog.age(%s::pg_catalog.text::pg_catalog.xid)"
        )
        select = (
            "SELECT pg_catalog.pg_snapshot_xmin(s)::pg_catalog.text,"
            " pg_catalog.pg_snapshot_xmax(s)::pg_catalog.text,"
            " ARRAY(SELECT {id} FROM {table} WHERE {in_flight}{since})"
            " FROM pg_catalog.pg_current_snapshot() AS s"
        )
        self._since = sql.SQL(select).format(
            id=id_,
            table=names.table,
            in_flight=in_flight,
            since=since,
        )
        self._everything = sql.SQL(select).format(
            id=id_, table=names.table, in_flight=in_flight, since=sql.SQL("")
        )
        # The same rows, with what a confirm reads of each (db.queries), one
        # array per column: ids read this way need no confirm by primary key,
        # which was most of what taking 8,000 orders a second in cost the
        # daemon and its session. The aggregates of one query level are fed
        # the same rows in the same order, so the arrays line up. The
        # dispatch time's column is named only for a row whose time is
        # unusable (the only rows that need it).
        # Ages are measured at a clock reading taken once, as the statement
        # runs, not at now(): now() is the statement's start, before its
        # snapshot, and a row committed in between (a dispatch every 0.1 ms
        # at full speed) has a "sentAt" after it, which read as a dispatch
        # time in the future (a false warning, and a schedule anchored on
        # when the daemon saw it). Every row this snapshot sees was committed
        # before the reading, so none is ahead of it unless its clock is.
        self._rows_since = sql.SQL(
            "SELECT pg_catalog.pg_snapshot_xmin(s)::pg_catalog.text,"
            " pg_catalog.pg_snapshot_xmax(s)::pg_catalog.text, c.*"
            " FROM pg_catalog.pg_current_snapshot() AS s,"
            " (SELECT pg_catalog.clock_timestamp() AS read_at) AS om_clock,"
            " LATERAL (SELECT pg_catalog.array_agg(r.id), pg_catalog.array_agg(r.provider_id),"
            " pg_catalog.array_agg(r.elapsed), pg_catalog.array_agg(r.last_checked),"
            " pg_catalog.array_agg(r.why),"
            " pg_catalog.array_agg(CASE WHEN r.why IS NOT NULL THEN r.source END),"
            " pg_catalog.array_agg(r.reference)"
            " FROM (SELECT {columns} FROM {table} WHERE {in_flight}{since})"
            " AS r(id, provider_id, elapsed, last_checked, why, source, reference)) AS c"
        ).format(
            columns=confirm_columns(layout, now=sql.SQL("om_clock.read_at")),
            table=names.table,
            in_flight=in_flight,
            since=since,
        )
        key = sql.Literal(schema.idle_lock_key(layout))
        # The snapshot is taken when the statement starts, before the unlock.
        self._release = sql.SQL(
            "SELECT pg_catalog.pg_snapshot_xmin(pg_catalog.pg_current_snapshot())"
            "::pg_catalog.text, pg_catalog.pg_advisory_unlock({})"
        ).format(key)
        self._install = sql.SQL(
            "SELECT pg_catalog.to_regprocedure(%(gated)s) IS NOT NULL,"
            " coalesce(pg_catalog.has_column_privilege(pg_catalog.to_regclass(%(table)s),"
            " 'xmin', 'SELECT'), false),"
            " CASE WHEN pg_catalog.to_regclass(%(inbox)s) IS NULL THEN false"
            " ELSE pg_catalog.has_table_privilege(%(inbox)s, 'SELECT')"
            " AND pg_catalog.has_table_privilege(%(inbox)s, 'DELETE') END"
        )
        self._install_params = {
            "gated": sql.SQL("{}()").format(names.function).as_string(None),
            "inbox": names.inbox.as_string(None),
            "table": names.table.as_string(None),
        }

    async def read(self, conn: AsyncConn, since: int | None, *, rows: bool = False) -> Changed:
        """The ids of orders in flight written by transaction *since* (32-bit) or later.

        With *rows*, the orders themselves too (:attr:`Changed.rows`), unless
        *since* is None: every order in flight, perhaps a million, is read as
        ids, which the confirmer reads back in batches.
        """
        if rows and since is not None:
            cursor = await conn.execute(self._rows_since, (str(since),), binary=True)
            record = await cursor.fetchone()
            assert record is not None  # one row, always
            xmin, xmax, *columns = record
            if columns[0] is None:  # no row: array_agg of nothing is NULL
                return Changed([], int(xmin), int(xmax), [])
            return Changed(columns[0], int(xmin), int(xmax), confirmed_rows(*columns))
        if since is None:
            cursor = await conn.execute(self._everything, binary=True)
        else:
            cursor = await conn.execute(self._since, (str(since),), binary=True)
        row = await cursor.fetchone()
        assert row is not None  # one row, always
        xmin, xmax, ids = row
        return Changed(list(ids), int(xmin), int(xmax))

    async def read_from(self, conn: AsyncConn, mark: Mark, *, rows: bool = False) -> Changed:
        """The orders in flight written since *mark*, which then moves past them.

        A mark too old for the server's 32-bit comparison (:meth:`Mark.exact_at`)
        may have left rows out: then every order in flight is read. *rows*
        as for :meth:`read`.
        """
        since = mark.since()
        changed = await self.read(conn, since, rows=rows)
        if since is not None and not mark.exact_at(changed.snapshot_xmax):
            changed = await self.read(conn, None)
        mark.read(changed.snapshot_xmin)
        return changed

    async def release_idle_lock(self, conn: AsyncConn) -> int:
        """Release the idle lock; the xmin (xid8) of a snapshot taken just before."""
        cursor = await conn.execute(self._release)
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])

    async def install(self, conn: AsyncConn) -> Install:
        cursor = await conn.execute(self._install, self._install_params)
        row = await cursor.fetchone()
        gated, readable, inbox = row if row is not None else (False, False, False)
        if gated:
            return Install.GATED if readable else Install.GATED_UNREADABLE
        return Install.INBOX if inbox else Install.NOTIFY_ONLY
