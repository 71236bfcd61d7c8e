"""Doctor's checks of the handoff: earlier versions' leftovers, the idle lock, instances.

See :mod:`order_monitor.engine.handoff` for how the trigger and the daemon
choose between NOTIFY and the daemon's reads of what changed.
"""

from __future__ import annotations

from psycopg import sql

from order_monitor import __version__, db, schema
from order_monitor.config import Layout
from order_monitor.db import sessions
from order_monitor.engine.policy import format_seconds
from order_monitor.operator.findings import INSTALL_HINT, Emit, Verdict


async def check_handoff(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    await _old_triggers(conn, layout, emit)
    await _old_inbox(conn, layout, emit)
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
            "instance, standbys included: an old daemon does not read the orders this trigger "
            "leaves unannounced while it is busy (they wait for its sweep) or misreads what "
            "this install writes",
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
            else "the daemon cannot switch between NOTIFY and its reads as it should"
        )
        emit(
            Verdict.FAIL,
            "lock holders",
            f"the {holder.lock} lock is held by {holder.session}, which is not an order-monitor "
            f"session: {effect} — end it (pg_terminate_backend({holder.session.pid})) and find "
            "who takes our advisory lock",
        )


async def _old_triggers(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    names = schema.Names(layout)
    cursor = await conn.execute(
        "SELECT t.tgname FROM pg_catalog.pg_trigger t"
        " WHERE t.tgrelid = pg_catalog.to_regclass(%s) AND t.tgname = ANY(%s)"
        " AND NOT t.tgisinternal"
        " ORDER BY 1",
        (names.table.as_string(conn), list(names.old_trigger_names)),
    )
    left = [str(name) for (name,) in await cursor.fetchall()]
    if left:
        emit(
            Verdict.FAIL,
            "older triggers",
            f"{', '.join(left)} still on the table: they call a function for every order "
            f"(a fifth of the application's dispatch throughput, or all its commits in "
            f"a row for version 1's NOTIFY) — {INSTALL_HINT} (it swaps them for this "
            "version's in one transaction)",
        )
    else:
        emit(Verdict.PASS, "older triggers", "none left")


async def _old_inbox(conn: db.AsyncConn, layout: Layout, emit: Emit) -> None:
    """Versions 2 to 4's inbox: install.sql drops it; while it exists, what waits there."""
    names = schema.Names(layout)
    qualified = names.inbox.as_string(conn)
    cursor = await conn.execute("SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (qualified,))
    row = await cursor.fetchone()
    if row is None or not row[0]:
        emit(Verdict.PASS, "inbox", "none (versions 2 to 4 had one; this version reads changes)")
        return
    if await sessions.in_recovery(conn):
        # An UNLOGGED table cannot be read during recovery: say why, not the error.
        emit(Verdict.WARN, "inbox", sessions.REPLICA_HINT)
        return
    cursor = await conn.execute(
        sql.SQL(
            "SELECT pg_catalog.count(*),"
            " pg_catalog.date_part('epoch', pg_catalog.now() - pg_catalog.min(queued_at))"
            " FROM {}"
        ).format(names.inbox)
    )
    counted = await cursor.fetchone()
    waiting, oldest = (0, None) if counted is None else (int(counted[0]), counted[1])
    age = "" if oldest is None else f", the oldest for {format_seconds(float(oldest))}"
    emit(
        Verdict.WARN,
        "inbox",
        f"{qualified} is left by schema version 2 to 4 ({waiting} order ids waiting{age}): "
        f"its trigger writes there while the daemon is busy — {INSTALL_HINT} (this daemon "
        "reads the orders that changed, and install.sql drops the inbox)",
    )


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
            "the idle lock is free: the trigger announces nothing and the daemon reads the "
            "orders that changed (it is busy), or no daemon runs (its sweep finds them at start)",
        )
    else:
        emit(
            Verdict.PASS,
            "handoff",
            f"the idle lock is held by backend {row[0]} ({row[1] or 'unknown'}): the trigger "
            "announces orders by NOTIFY",
        )
