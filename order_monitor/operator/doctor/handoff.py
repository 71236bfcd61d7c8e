"""Doctor's checks of the handoff (install version 2): inbox, idle lock, version 1 leftovers.

See :mod:`order_monitor.engine.handoff` for how the trigger chooses between
NOTIFY and the inbox.
"""

from __future__ import annotations

from typing import Final

from psycopg import sql

from order_monitor import __version__, db, schema
from order_monitor.config import Layout
from order_monitor.db import sessions
from order_monitor.engine.policy import format_seconds
from order_monitor.operator.findings import INSTALL_HINT, Emit, Verdict

#: An id older than this in the inbox means nobody is taking them.
INBOX_STALE: Final = 60.0
#: Older than this, nobody has run a daemon for a day: maybe none ever will again.
INBOX_ABANDONED: Final = 86400.0


async def check_handoff(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    await _version_1_triggers(conn, layout, emit)
    if await _inbox(conn, layout, emit):
        await _idle_lock(conn, layout, emit)
    await check_instances(conn, emit)
    await check_lock_holders(conn, layout, emit)


async def check_instances(conn: db.AsyncConn, emit: Emit) -> None:
    """Daemons connected with a version older than this one (application_name says which)."""
    older = await sessions.older_instances(conn)
    if older:
        named = "; ".join(str(s) for s in older[:10])
        more = f" and {len(older) - 10} more" if len(older) > 10 else ""
        emit(
            Verdict.WARN,
            "instances",
            f"{len(older)} session(s) of an order-monitor older than {__version__} "
            f"(schema version {schema.VERSION}): {named}{more} — upgrade or stop every "
            "instance, standbys included: an old daemon does not read the inbox (its orders "
            "wait for the sweep) or misreads what this install writes",
        )
    else:
        emit(Verdict.PASS, "instances", f"no order-monitor older than {__version__} is connected")


async def check_lock_holders(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    """A session that is not ours holding the leader or the idle lock stalls the daemon."""
    holders = await sessions.foreign_lock_holders(conn, layout)
    if not holders:
        emit(Verdict.PASS, "lock holders", "the leader and idle locks are ours or free")
        return
    for holder in holders:
        effect = (
            "every order-monitor instance stands by, and no order is checked"
            if holder.lock == "leader"
            else "the daemon cannot switch between NOTIFY and the inbox as it should"
        )
        emit(
            Verdict.FAIL,
            "lock holders",
            f"the {holder.lock} lock is held by {holder.session}, which is not an order-monitor "
            f"session: {effect} — end it (pg_terminate_backend({holder.session.pid})) and find "
            "who takes our advisory lock",
        )


async def _version_1_triggers(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    names = schema.Names(layout)
    cursor = await conn.execute(
        "SELECT t.tgname FROM pg_catalog.pg_trigger t"
        " WHERE t.tgrelid = pg_catalog.to_regclass(%s) AND t.tgname = ANY(%s)"
        " AND NOT t.tgisinternal"
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
    if await sessions.in_recovery(conn):
        # An UNLOGGED table cannot be read during recovery: say why, not the error.
        emit(Verdict.FAIL, "inbox", sessions.REPLICA_HINT)
        return False
    cursor = await conn.execute(
        "SELECT c.relpersistence FROM pg_catalog.pg_class c"
        " WHERE c.oid = pg_catalog.to_regclass(%s)",
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
            "SELECT count(*), extract(epoch FROM pg_catalog.now() - min(queued_at))::float8 FROM {}"
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
            f"those orders{logged}"
            + (
                " — if order-monitor is retired, run uninstall.sql: until then the trigger "
                "adds a row here for every order dispatched"
                if oldest > INBOX_ABANDONED
                else ""
            ),
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
