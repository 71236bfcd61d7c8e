"""The handoff's statements on install.sql's inbox table, and the idle lock.

Every function call is schema-qualified, like the rest of what we render: a
connection someone else opened may not have our pinned search_path.
"""

from __future__ import annotations

import re
import uuid
from typing import Final

import psycopg
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout
from order_monitor.db.connections import AsyncConn

#: Where a read of the inbox starts when it has no better place: before the first row.
START: Final = "(0,0)"

_TID = re.compile(r"\((\d+),(\d+)\)")


def _tid(text: str) -> tuple[int, int]:
    match = _TID.fullmatch(text)
    if match is None:  # pragma: no cover - the server writes every tid this way
        raise ValueError(f"not a tid: {text!r}")
    return int(match[1]), int(match[2])


class InboxStatements:
    """The inbox's statements for one table layout.

    :meth:`take` remembers where its last read ended. Deleted rows stay in
    their pages until vacuum reclaims them, and vacuum cannot while any
    snapshot older than the delete lives (a report, ``pg_dump``, a standby's
    ``hot_standby_feedback``, a replication slot). Reading from the first
    page every time then walks every dead row of the backlog again at each
    batch: a backlog drained in time quadratic in its size (2M ids: 30.7 s
    instead of 3.8 s). So a read starts after the last row taken, and goes
    back to the first page only when it runs off the end, for the rows that
    were put into free space behind it.
    """

    def __init__(self, layout: Layout) -> None:
        names = schema.Names(layout)
        # Committed ids only (rows of transactions still open are not
        # visible, and stay for a later read), by their row addresses: a TID
        # range scan from the position, no index needed.
        self._take = sql.SQL(
            "DELETE FROM {inbox} WHERE ctid = ANY(ARRAY("
            "SELECT ctid FROM {inbox} WHERE ctid > %s::pg_catalog.tid"
            " LIMIT %s)) RETURNING order_id, ctid::pg_catalog.text"
        ).format(inbox=names.inbox)
        self._installed = sql.SQL(
            "SELECT CASE WHEN pg_catalog.to_regclass(%(t)s) IS NULL THEN false"
            " ELSE pg_catalog.has_table_privilege(%(t)s, 'SELECT')"
            " AND pg_catalog.has_table_privilege(%(t)s, 'DELETE') END"
        )
        self._regclass = names.inbox.as_string(None)
        key = sql.Literal(schema.idle_lock_key(layout))
        # One statement, its own transaction: the wait's lock_timeout ends
        # with it, and a timeout leaves no aborted transaction behind. The
        # session is the leader lock's, whose check may run between any two
        # statements of ours (psycopg serialises statements, not blocks).
        # set_config is volatile, so the subquery stays a subquery and runs first.
        self._take_idle_lock = sql.SQL(
            "SELECT pg_catalog.pg_advisory_lock({}) FROM"
            " (SELECT pg_catalog.set_config('lock_timeout', %s, true)) AS wait"
        ).format(key)
        self._give_idle_lock = sql.SQL("SELECT pg_catalog.pg_advisory_unlock({})").format(key)
        #: Where the next :meth:`take` starts reading.
        self.position = START

    async def take(self, conn: AsyncConn, limit: int) -> list[uuid.UUID]:
        """Take up to *limit* committed order ids out of the inbox, from :attr:`position` on."""
        started = self.position
        rows = await self._read(conn, started, limit)
        if len(rows) < limit and started != START:
            # Ran off the end: what is left can only be behind us.
            rows += await self._read(conn, START, limit - len(rows))
        return [order for order, _ in rows]

    async def _read(self, conn: AsyncConn, after: str, limit: int) -> list[tuple[uuid.UUID, str]]:
        cursor = await conn.execute(self._take, (after, limit))
        rows: list[tuple[uuid.UUID, str]] = await cursor.fetchall()
        if len(rows) < limit:
            self.position = START
        elif rows:  # a read of nothing (limit 0, doctor's grant probe) moves nothing
            self.position = max((tid for _, tid in rows), key=_tid)
        return rows

    async def installed(self, conn: AsyncConn) -> bool:
        """True when install.sql's version 2 (the inbox) is in place, and role.sql's grants."""
        cursor = await conn.execute(self._installed, {"t": self._regclass})
        row = await cursor.fetchone()
        return bool(row and row[0])

    async def take_idle_lock(self, conn: AsyncConn, wait: float) -> bool:
        """Take the idle lock (session level), waiting at most *wait* seconds (server side).

        Waiting is the point: the request queues behind the transactions that
        hold the lock shared (those that put an id in the inbox), and makes
        every later trigger's try fail, so they NOTIFY. False on timeout.
        """
        ms = max(1, round(wait * 1000))
        try:
            await conn.execute(self._take_idle_lock, (f"{ms}ms",))
        except psycopg.errors.LockNotAvailable:
            return False
        return True

    async def give_idle_lock(self, conn: AsyncConn) -> None:
        await conn.execute(self._give_idle_lock)

    async def queue_usage(self, conn: AsyncConn) -> float:
        """How full the cluster's NOTIFY queue is, 0 to 1."""
        cursor = await conn.execute("SELECT pg_catalog.pg_notification_queue_usage()")
        row = await cursor.fetchone()
        return float(row[0]) if row else 0.0
