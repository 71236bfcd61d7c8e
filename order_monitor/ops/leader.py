"""One active instance per orders table: a session-level advisory lock in Postgres.

Each instance opens a dedicated autocommit connection and polls
``pg_try_advisory_lock(key)``. The one that gets it is the leader and works;
the others are hot standbys, polling every ``poll`` seconds. A session-level
lock lives exactly as long as the session, so when the leader's connection
dies (crash, network cut, ``pg_terminate_backend``) Postgres releases the lock
and a standby takes over within a poll or two. The same fact binds the
leader: once its connection is gone it no longer holds the lock and must stop
working at once, or two instances would check and write the same orders. So
the leader proves its session every ``check_interval`` seconds (5 s; a
half-open connection: plus ``check_timeout``, 5 s) and sets
:attr:`LeaderLock.lost` the moment it cannot. The handoff reads the inbox on
this same session (:attr:`LeaderLock.connection`) and reports a failure of it
at once (:meth:`LeaderLock.session_failed`): a session cut cleanly is noticed
within the handoff's next read. A leader that lost the lock waits two polls
before trying again, so a standby takes over rather than the old leader
taking its lock straight back.

The key
-------
:func:`lock_key` is the first 64 bits of the MD5 of
``order_monitor:<schema>.<table>``, as a signed bigint: stable across
versions, hosts and Python processes, and computable by a DBA in psql::

    SELECT ('x' || left(md5('order_monitor:public.product_orders'), 16))::bit(64)::bigint;

and who holds it (advisory bigint keys appear split in two oids in pg_locks)::

    SELECT l.pid, a.application_name, a.client_addr, a.backend_start
    FROM pg_locks l JOIN pg_stat_activity a USING (pid)
    WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
      AND ((l.classid::bigint << 32) | l.objid::bigint) = <key>;

The lock connection must reach Postgres directly or through a pooler in
session mode: in PgBouncer's transaction mode the lock would stay on a server
connection we no longer own. The periodic check sees that (another backend
answers, or the lock is not ours) and reports the lock as lost.

Usage in the daemon::

    # on_progress: a standby's polls are its only progress, so they feed the
    # watchdog; once leader, the engine's progress must (the lock still
    # answering proves nothing about the engine).
    lock = LeaderLock(dsn, lock_key(layout.schema, layout.table), on_progress=notifier.watchdog)
    metrics.track(metrics.leader, lambda: 1.0 if lock.role == LEADER else 0.0)
    async with lock.held():                  # blocks while standby
        ...                                  # work until lock.lost is set, then stop at once

The daemon then stands by again (``Daemon._lead_until_stopped``): losing the
lock is something it recovers from by itself, not a reason to exit.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import psycopg

from order_monitor.db import connect
from order_monitor.logs import get_logger
from order_monitor.redaction import redact_dsn
from order_monitor.schema import advisory_key, advisory_key_parts

log = get_logger(component="leader")

STARTING: Final = "starting"
STANDBY: Final = "standby"
LEADER: Final = "leader"
LOST: Final = "lost"
RELEASED: Final = "released"

#: The lock session's name in pg_stat_activity (order-monitor <version> (leader lock)).
PURPOSE: Final = "leader lock"
_RETRY_CAP: Final = 30.0

_TRY_LOCK: Final = "SELECT pg_catalog.pg_try_advisory_lock(%s)"
_STILL_OURS: Final = """
SELECT pg_catalog.pg_backend_pid(), EXISTS (
    SELECT FROM pg_catalog.pg_locks
    WHERE locktype = 'advisory' AND objsubid = 1 AND granted
      AND pid = pg_catalog.pg_backend_pid() AND classid::bigint = %s AND objid::bigint = %s
)
"""
_HOLDER: Final = """
SELECT l.pid, a.application_name, pg_catalog.host(a.client_addr)
FROM pg_catalog.pg_locks l LEFT JOIN pg_catalog.pg_stat_activity a USING (pid)
WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
  AND l.classid::bigint = %s AND l.objid::bigint = %s
"""


def lock_key(schema: str, table: str) -> int:
    """The advisory lock key for one orders table (see the module docstring)."""
    return advisory_key(f"order_monitor:{schema}.{table}")


class LeaderLock:
    """The advisory lock, held by this instance for the duration of :meth:`held`."""

    def __init__(
        self,
        dsn: str,
        key: int,
        *,
        poll: float = 1.5,
        check_interval: float = 5.0,
        check_timeout: float = 5.0,
        connect_timeout: int = 10,
        on_progress: Callable[[], object] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """*on_progress* is called after each answered poll while standby.

        *check_interval* bounds how long a leader whose session was cut keeps
        working before it notices (a half-open connection: plus
        *check_timeout*), while a standby may already have taken over.
        """
        self.key = key
        self._dsn = dsn
        self._poll = poll
        self._check_interval = check_interval
        self._check_timeout = check_timeout
        self._connect_timeout = connect_timeout
        self._on_progress = on_progress
        self._sleep = sleep
        self._role: str = STARTING
        self._in_use = False
        #: Set when the held lock is gone; the daemon must stop working.
        self.lost = asyncio.Event()
        #: Why the lock was lost, for logs and the exit message.
        self.lost_reason: str | None = None
        #: The server pid of the lock session (for pg_terminate_backend, pg_locks).
        self.backend_pid: int | None = None
        #: Why the last attempt to reach the database failed; None once it answers.
        self.last_error: str | None = None
        #: pg_try_advisory_lock calls made, and connection attempts that failed.
        self.attempts = 0
        self.connect_failures = 0
        #: Successful checks that the held lock is still this session's.
        self.checks = 0
        self._conn: psycopg.AsyncConnection[Any] | None = None

    @property
    def role(self) -> str:
        """starting, standby, leader, lost or released."""
        return self._role

    @property
    def is_leader(self) -> bool:
        return self._role == LEADER

    @property
    def connection(self) -> psycopg.AsyncConnection[Any] | None:
        """The lock's session while leader (None otherwise).

        The handoff reads the inbox on it, so that no read outlives the lock
        (see :mod:`order_monitor.engine.handoff`); psycopg serialises its use
        with this lock's own checks.
        """
        return self._conn if self._role == LEADER else None

    def session_failed(self, reason: str) -> None:
        """A user of :attr:`connection` saw it fail: the lock is lost now, not at the next check."""
        if self._role == LEADER:
            self._lose(reason)

    @asynccontextmanager
    async def held(self) -> AsyncIterator[LeaderLock]:
        """Wait until the lock is ours, keep it for the block, release it after.

        Cancelling the wait (a SIGTERM while standby) closes the connection.
        While the block runs, :attr:`lost` may be set at any time.
        """
        if self._in_use:
            raise RuntimeError("LeaderLock.held() is already in use")
        self._in_use = True
        just_lost = self._role == LOST
        self.lost.clear()
        self.lost_reason = None
        try:
            if just_lost:
                # A leader notices a cut session within milliseconds (the
                # handoff reads on it) and would take the lock straight back;
                # the standbys, polling every `poll`, get the first chance.
                await self._sleep(self._poll * 2)
            conn = await self._acquire()
            self._conn = conn
            monitor = asyncio.create_task(self._monitor(conn), name="leader-lock-monitor")
            try:
                yield self
            finally:
                self._conn = None
                monitor.cancel()
                # wait() rather than awaiting the task: our own cancellation
                # must still propagate, the monitor's must not.
                await asyncio.wait({monitor})
                await _close(conn)
                if self._role == LEADER:
                    self._role = RELEASED
                    log.info("leader.released", key=self.key)
        finally:
            self._in_use = False
            if self._role in (STARTING, STANDBY):
                self._role = RELEASED

    # --- internals ------------------------------------------------------------

    def _progress(self) -> None:
        if self._on_progress is not None:
            self._on_progress()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        # The engine's connection settings (TCP keepalives, a name in
        # pg_stat_activity), with the operator's own DSN settings winning.
        conn = await connect(self._dsn, PURPOSE, connect_timeout=self._connect_timeout)
        self.backend_pid = conn.info.backend_pid
        return conn

    async def _acquire(self) -> psycopg.AsyncConnection[Any]:
        started = time.monotonic()
        failures_in_a_row = 0
        announced_standby = False
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await self._connect()
                failures_in_a_row = 0
                self.last_error = None
                while True:
                    self.attempts += 1
                    cursor = await asyncio.wait_for(
                        conn.execute(_TRY_LOCK, (self.key,)), self._check_timeout
                    )
                    row = await cursor.fetchone()
                    if row is not None and row[0]:
                        self._role = LEADER
                        log.info(
                            "leader.acquired",
                            key=self.key,
                            backend_pid=self.backend_pid,
                            waited_s=round(time.monotonic() - started, 3),
                        )
                        return conn
                    # Only a standby reports progress here: once leader, the
                    # engine's own progress must feed the watchdog, or a hung
                    # engine would look alive because the lock still answers.
                    self._progress()
                    if not announced_standby:
                        announced_standby = True
                        self._role = STANDBY
                        log.info("leader.standby", key=self.key, **await self._holder(conn))
                    await asyncio.sleep(self._poll)
            except (psycopg.OperationalError, TimeoutError) as exc:
                # Postgres down, restarting or failing over: a standby keeps
                # waiting (it has nothing else to do), with a capped backoff.
                if conn is not None:
                    await _close(conn)
                self._role = STANDBY
                self.connect_failures += 1
                self.last_error = _error_text(exc)
                failures_in_a_row += 1
                delay = min(self._poll * 2 ** (failures_in_a_row - 1), _RETRY_CAP)
                log.warning(
                    "leader.connection_failed",
                    dsn=redact_dsn(self._dsn),
                    error=_error_text(exc),
                    retry_in_s=round(delay, 3),
                )
                await asyncio.sleep(delay)
            except BaseException:
                if conn is not None:
                    await _close(conn)
                raise

    async def _holder(self, conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
        """Who holds the lock, for the standby's log line (best effort)."""
        try:
            cursor = await asyncio.wait_for(
                conn.execute(_HOLDER, advisory_key_parts(self.key)), self._check_timeout
            )
            row = await cursor.fetchone()
        except (psycopg.Error, TimeoutError):
            return {}
        if row is None:
            return {}
        return {"holder_pid": row[0], "holder_application": row[1], "holder_addr": row[2]}

    async def _monitor(self, conn: psycopg.AsyncConnection[Any]) -> None:
        classid, objid = advisory_key_parts(self.key)
        try:
            while True:
                await asyncio.sleep(self._check_interval)
                cursor = await asyncio.wait_for(
                    conn.execute(_STILL_OURS, (classid, objid)), self._check_timeout
                )
                row = await cursor.fetchone()
                if row is None or row[0] != self.backend_pid or not row[1]:
                    self._lose(
                        "the lock is not held by this session; is a pooler in transaction "
                        "mode between order-monitor and Postgres? The lock connection "
                        "needs a direct or session-mode connection"
                    )
                    return
                self.checks += 1
        except TimeoutError:
            self._lose(f"the lock connection did not answer within {self._check_timeout:g}s")
        except psycopg.Error as exc:
            self._lose(f"the lock connection failed: {_error_text(exc)}")
        finally:
            if self.lost.is_set():
                await _close(conn)

    def _lose(self, reason: str) -> None:
        self._role = LOST
        self.lost_reason = reason
        log.error("leader.lost", key=self.key, backend_pid=self.backend_pid, reason=reason)
        self.lost.set()


async def _close(conn: psycopg.AsyncConnection[Any]) -> None:
    try:
        await conn.close()
    except psycopg.Error as exc:  # pragma: no cover - close on a broken socket
        log.debug("leader.close_failed", error=_error_text(exc))


def _error_text(exc: BaseException) -> str:
    # libpq's messages name host and port, never the password; keep one line.
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
