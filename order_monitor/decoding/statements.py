"""The daemon's calls to decoding.sql's functions (its role has no REPLICATION of its own)."""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout
from order_monitor.db.connections import AsyncConn


@dataclass(frozen=True, slots=True)
class SlotState:
    name: str
    #: reserved, extended, unreserved or lost (invalidated).
    wal_status: str | None
    #: WAL the slot holds back: the current position minus what it confirmed.
    lag_bytes: int | None
    #: How much more WAL it may hold back before it is invalidated (None: no limit).
    safe_wal_size: int | None


@dataclass(frozen=True, slots=True)
class Changes:
    #: (lsn, pgoutput message), in order.
    messages: list[tuple[str, bytes]]
    #: The WAL flushed when the read began: everything before it was read
    #: when fewer messages came than asked for.
    flushed: str


class DecodingStatements:
    def __init__(self, layout: Layout) -> None:
        n = schema.Names(layout)
        self._changes = sql.SQL("SELECT lsn::pg_catalog.text, data FROM {}(%s)").format(
            n.changes_function
        )
        self._advance = sql.SQL("SELECT {}(%s::pg_catalog.text::pg_catalog.pg_lsn)").format(
            n.advance_function
        )
        self._slot = sql.SQL("SELECT * FROM {}()").format(n.slot_function)
        self._recreate = sql.SQL("SELECT {}()::pg_catalog.text").format(n.recreate_function)

    async def changes(self, conn: AsyncConn, upto: int) -> Changes:
        """Whole transactions' messages, up to *upto* changes; nothing consumed."""
        cursor = await conn.execute(self._changes, (upto,), binary=True)
        rows = await cursor.fetchall()
        # The last row is the position read up to (no data): see decoding.sql.
        *messages, (flushed, _) = rows
        return Changes([(str(lsn), bytes(data)) for lsn, data in messages], str(flushed))

    async def advance(self, conn: AsyncConn, lsn: str) -> None:
        await conn.execute(self._advance, (lsn,))

    async def slot(self, conn: AsyncConn) -> SlotState | None:
        cursor = await conn.execute(self._slot)
        row = await cursor.fetchone()
        if row is None:
            return None
        name, wal_status, lag, safe = row
        return SlotState(str(name), wal_status, lag, safe)

    async def recreate(self, conn: AsyncConn) -> str:
        cursor = await conn.execute(self._recreate)
        row = await cursor.fetchone()
        assert row is not None
        return str(row[0])
