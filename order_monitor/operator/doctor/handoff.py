"""Doctor's checks of the handoff (install version 2): inbox, idle lock, version 1 leftovers.

See :mod:`order_monitor.engine.handoff` for how the trigger chooses between
NOTIFY and the inbox.
"""

from __future__ import annotations

from typing import Final

from psycopg import sql

from order_monitor import db, schema
from order_monitor.config import Layout
from order_monitor.engine.policy import format_seconds
from order_monitor.operator.findings import INSTALL_HINT, Emit, Verdict

#: An id older than this in the inbox means nobody is taking them.
INBOX_STALE: Final = 60.0


async def check_handoff(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    await _version_1_triggers(conn, layout, emit)
    if await _inbox(conn, layout, emit):
        await _idle_lock(conn, layout, emit)


async def _version_1_triggers(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    names = schema.Names(layout)
    cursor = await conn.execute(
        "SELECT t.tgname FROM pg_catalog.pg_trigger t"
        " WHERE t.tgrelid = to_regclass(%s) AND t.tgname = ANY(%s) AND NOT t.tgisinternal"
        " ORDER BY 1",
        (
            names.table.as_string(conn),
            [names.v1_insert_trigger_name, names.v1_update_trigger_name],
        ),
    )
    left = [str(name) for (name,) in await cursor.fetchall()]
    if left:
        emit(
            Verdict.FAIL,
            "version 1 triggers",
            f"{', '.join(left)} still on the table: they NOTIFY for every order (serialising "
            f"the application's commits) and announce each order a second time — "
            f"{INSTALL_HINT} (it swaps them for version 2 in one transaction)",
        )
    else:
        emit(Verdict.PASS, "version 1 triggers", "none left")


async def _inbox(conn: db.AsyncConn, layout: Layout, emit: Emit) -> bool:
    names = schema.Names(layout)
    qualified = names.inbox.as_string(conn)
    cursor = await conn.execute(
        "SELECT c.relpersistence FROM pg_catalog.pg_class c WHERE c.oid = to_regclass(%s)",
        (qualified,),
    )
    row = await cursor.fetchone()
    if row is None:
        emit(
            Verdict.FAIL,
            "inbox",
            f"{qualified} is missing (a version 1 install: the trigger NOTIFYs for every "
            f"order) — {INSTALL_HINT}",
        )
        return False
    cursor = await conn.execute(
        sql.SQL(
            "SELECT count(*), extract(epoch FROM now() - min(queued_at))::float8 FROM {}"
        ).format(names.inbox)
    )
    counted = await cursor.fetchone()
    waiting, oldest = (0, None) if counted is None else (int(counted[0]), counted[1])
    logged = "" if row[0] == "u" else " (a logged table: ALTER TABLE ... SET UNLOGGED saves WAL)"
    if oldest is not None and oldest > INBOX_STALE:
        emit(
            Verdict.WARN,
            "inbox",
            f"{waiting} order ids waiting, the oldest for {format_seconds(oldest)}: no daemon "
            "is taking them (is one running, and the leader?); the sweep still finds "
            f"those orders{logged}",
        )
    else:
        emit(
            Verdict.WARN if logged else Verdict.PASS,
            "inbox",
            f"{qualified} is in place, {waiting} order ids waiting{logged}",
        )
    return True


async def _idle_lock(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    """Who holds the idle lock: which way the trigger announces orders right now."""
    cursor = await conn.execute(
        "SELECT l.pid, a.application_name FROM pg_catalog.pg_locks l"
        " LEFT JOIN pg_catalog.pg_stat_activity a USING (pid)"
        " WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted"
        " AND l.mode = 'ExclusiveLock'"
        " AND l.classid::bigint = %s AND l.objid::bigint = %s",
        schema.advisory_key_parts(schema.idle_lock_key(layout)),
    )
    row = await cursor.fetchone()
    if row is None:
        emit(
            Verdict.PASS,
            "handoff",
            "the idle lock is free: the trigger leaves orders in the inbox (the daemon is "
            "busy, or not running)",
        )
    else:
        emit(
            Verdict.PASS,
            "handoff",
            f"the idle lock is held by backend {row[0]} ({row[1] or 'unknown'}): the trigger "
            "announces orders by NOTIFY",
        )
