"""Who is connected: order-monitor instances by version, and who holds our advisory locks.

For doctor and status. Every session of ours is named ``order-monitor
<version> (<purpose>)`` in pg_stat_activity (``db.connections``), so a
version left behind by an upgrade, and a lock holder that is not ours, can be
named.

Any role that can connect can take either advisory lock (``pg_advisory_lock``
needs no privilege): holding the leader lock keeps every instance standing
by, holding the idle lock keeps the daemon from going idle (the trigger then
NOTIFYs while the daemon believes it reads the inbox, or the reverse). The
database cannot prevent it; these queries at least name who does it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from order_monitor import __version__, schema
from order_monitor.config import Layout
from order_monitor.db.connections import AsyncConn

_NAME = re.compile(r"order-monitor (\d+(?:\.\d+)*)\S* \((.*)\)")
#: Purposes of the operator's own commands: an old ``status`` run is no instance.
_COMMANDS: Final = frozenset({"doctor", "status", "check"})


def leader_lock_key(layout: Layout) -> int:
    """The leader lock's key (``ops.leader.lock_key``, which imports this package)."""
    return schema.advisory_key(f"order_monitor:{layout.schema}.{layout.table}")


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclass(frozen=True, slots=True)
class Session:
    pid: int
    user: str | None
    application_name: str
    client: str | None

    def __str__(self) -> str:
        where = f" from {self.client}" if self.client else ""
        name = self.application_name or "no application_name"
        return f"pid {self.pid} ({name}, user {self.user or '?'}{where})"


@dataclass(frozen=True, slots=True)
class LockHolder:
    #: 'leader' or 'idle'.
    lock: str
    session: Session


_SESSIONS: Final = """
SELECT a.pid, a.usename::text, coalesce(a.application_name, ''), pg_catalog.host(a.client_addr)
FROM pg_catalog.pg_stat_activity a
WHERE a.datname = pg_catalog.current_database() AND a.pid <> pg_catalog.pg_backend_pid()
  AND a.application_name LIKE 'order-monitor %%'
ORDER BY a.pid
"""

# Session-level (or any) holders in exclusive mode: the trigger's own
# transaction-level shared holds of the idle lock are the application's, and
# expected.
_HOLDERS: Final = """
SELECT l.pid, a.usename::text, coalesce(a.application_name, ''), pg_catalog.host(a.client_addr),
       l.classid::bigint, l.objid::bigint
FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a USING (pid)
WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted AND l.mode = 'ExclusiveLock'
  AND l.database = (SELECT oid FROM pg_catalog.pg_database
                    WHERE datname = pg_catalog.current_database())
  AND (l.classid::bigint, l.objid::bigint) IN ((%s, %s), (%s, %s))
ORDER BY l.pid
"""


def parse_application_name(name: str) -> tuple[str, str] | None:
    """(version, purpose) of one of our sessions' names, or None when it is not ours."""
    match = _NAME.fullmatch(name)
    return (match[1], match[2]) if match else None


async def older_instances(conn: AsyncConn, than: str = __version__) -> list[Session]:
    """Daemon sessions in this database whose version is older than *than*."""
    cursor = await conn.execute(_SESSIONS)
    older = []
    for pid, user, name, client in await cursor.fetchall():
        parsed = parse_application_name(name)
        if parsed is None or parsed[1] in _COMMANDS:
            continue
        if version_tuple(parsed[0]) < version_tuple(than):
            older.append(Session(pid, user, name, client))
    return older


async def foreign_lock_holders(conn: AsyncConn, layout: Layout) -> list[LockHolder]:
    """Holders of the leader lock or the idle lock that are not order-monitor sessions."""
    leader = schema.advisory_key_parts(leader_lock_key(layout))
    idle = schema.advisory_key_parts(schema.idle_lock_key(layout))
    cursor = await conn.execute(_HOLDERS, (*leader, *idle))
    holders = []
    for pid, user, name, client, classid, objid in await cursor.fetchall():
        if parse_application_name(name) is not None:
            continue
        lock = "leader" if (classid, objid) == leader else "idle"
        holders.append(LockHolder(lock, Session(pid, user, name, client)))
    return sorted(holders, key=lambda h: (h.lock != "leader", h.session.pid))


async def in_recovery(conn: AsyncConn) -> bool:
    """True on a standby (a read replica): nothing of ours can run there."""
    cursor = await conn.execute("SELECT pg_catalog.pg_is_in_recovery()")
    row = await cursor.fetchone()
    return bool(row and row[0])


#: What to tell an operator who pointed a command at a replica.
REPLICA_HINT: Final = (
    "this is a replica (pg_is_in_recovery() is true): the daemon writes, LISTENs and "
    "reads the UNLOGGED inbox, none of which a standby allows, and no instance leads "
    "here — connect to the primary (ORDER_MONITOR_DSN)"
)
