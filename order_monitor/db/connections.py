"""Connections: connect with keepalives and our application_name, retry forever, close in time."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_never,
    wait_exponential,
    wait_random,
)

from order_monitor import __version__
from order_monitor.logs import get_logger

AsyncConn = psycopg.AsyncConnection[TupleRow]

log = get_logger()

# A half-open TCP connection (a failover, a dropped NAT entry) is noticed in
# about idle + interval * count = 25 s instead of the kernel's two hours.
KEEPALIVES: Final = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}


def retry_forever(
    event: str,
    retry_on: type[BaseException] | tuple[type[BaseException], ...],
    *,
    first_wait: float,
    max_wait: float = 30.0,
) -> AsyncRetrying:
    """Retry reaching the database for ever, with capped, jittered exponential waits.

    Capped, so a failover or a standby answering "cannot execute LISTEN during
    recovery" is retried every few seconds, not hammered. Each failure is
    logged as *event* with the error and the wait before the next attempt.
    """
    return AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        wait=wait_exponential(multiplier=first_wait, max=max_wait) + wait_random(0, 1),
        stop=stop_never,
        before_sleep=lambda state: log.warning(
            event,
            attempt=state.attempt_number,
            error=str(state.outcome.exception()).strip() if state.outcome else None,
            retry_in_s=round(state.upcoming_sleep, 2),
        ),
        reraise=True,
    )


#: Every session of ours resolves unqualified names in the catalog only
#: (pg_temp last, so a temporary object cannot shadow one either). With the
#: default path a role that may CREATE in ``public`` (any database created
#: before PostgreSQL 15) can add ``public.lower(varchar)``: an exact match
#: for a varchar column beats ``pg_catalog.lower(text)``, and it would run
#: with the daemon's rights, or a superuser's when an operator runs status.
#:
#: And every statement is planned for the table as it is when it runs. psycopg
#: prepares a statement run five times, and the server then keeps a generic
#: plan when it costs no more than the custom ones: planned while the table
#: was small (a fresh install, a quiet hour), that is a sequential scan, kept
#: until an ANALYZE happens to invalidate it. The confirm of a batch of ids
#: then read the whole table once per batch as it grew: under an application
#: dispatching flat out its session took a core (bench/trigger.py). A plan
#: costs under a millisecond (the confirm: 0.6 to 0.9 ms), once per batch.
PINNED_OPTIONS: Final = "-c search_path=pg_catalog,pg_temp -c plan_cache_mode=force_custom_plan"


#: What losing or failing to open a dedicated connection raises.
CONNECTION_ERRORS: Final = (psycopg.Error, OSError, TimeoutError)


async def connect_forever(
    dsn: str,
    purpose: str,
    *,
    event: str,
    max_wait: float,
    prepare: Callable[[AsyncConn], Awaitable[object]] | None = None,
) -> AsyncConn:
    """Connect (and *prepare* the session), retrying (:func:`retry_forever`) until it works.

    For the connections a piece keeps to itself (listener, handoff): a
    session that fails *prepare* is closed before the next attempt.
    """
    retrying = retry_forever(event, CONNECTION_ERRORS, first_wait=0.2, max_wait=max_wait)
    async for attempt in retrying:
        with attempt:
            conn = await connect(dsn, purpose)
            if prepare is not None:
                try:
                    await prepare(conn)
                except BaseException:
                    await conn.close()
                    raise
            return conn
    raise AssertionError("unreachable")  # pragma: no cover - stop_never


async def close_within(conn: AsyncConn, grace: float) -> None:
    """Close *conn*, giving up after *grace* s: a wedged socket can make a polite close hang."""
    with contextlib.suppress(*CONNECTION_ERRORS):
        await asyncio.wait_for(conn.close(), grace)


async def connect(dsn: str, purpose: str, *, connect_timeout: int = 10) -> AsyncConn:
    """An autocommit connection named after its job (visible in pg_stat_activity)."""
    return await psycopg.AsyncConnection.connect(
        conninfo(dsn, purpose, connect_timeout=connect_timeout), autocommit=True
    )


def application_name(purpose: str) -> str:
    """What pg_stat_activity shows for a session of ours; doctor reads the version back from it."""
    return f"order-monitor {__version__} ({purpose})"


def conninfo(dsn: str, purpose: str, *, connect_timeout: int = 10) -> str:
    """*dsn* with our defaults added; the operator's own settings in it win, but for
    search_path and plan_cache_mode.

    Both are pinned (:data:`PINNED_OPTIONS`) after the operator's own
    ``options`` (the DSN's, else ``PGOPTIONS``, which libpq would otherwise
    ignore once we pass ``options``): theirs are kept, and ours come last, so
    a ``-c search_path=...`` of theirs cannot put a schema that others may
    CREATE in ahead of the built-in functions our statements call.
    """
    params: dict[str, Any] = {
        **KEEPALIVES,
        "application_name": application_name(purpose),
        "connect_timeout": str(connect_timeout),
    }
    params.update(conninfo_to_dict(dsn) if dsn else {})
    theirs = str(params.get("options") or os.environ.get("PGOPTIONS", "")).strip()
    params["options"] = f"{theirs} {PINNED_OPTIONS}".strip()
    return make_conninfo("", **params)


class ManagedConnection:
    """One connection for one job, re-established on demand after a failure.

    psycopg serialises concurrent use of a connection, so several tasks may
    share it; after an OperationalError the caller calls :meth:`reset` and
    the next :meth:`get` connects again.
    """

    def __init__(self, dsn: str, purpose: str) -> None:
        self._dsn = dsn
        self._purpose = purpose
        self._conn: AsyncConn | None = None
        # Several checker batches may find the connection gone at once: one
        # reconnects, the others wait for it (no burst of connections).
        self._connecting = asyncio.Lock()

    async def get(self) -> AsyncConn:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        async with self._connecting:
            conn = self._conn
            if conn is None or conn.closed or conn.broken:
                if conn is not None:
                    await conn.close()
                self._conn = conn = await connect(self._dsn, self._purpose)
            return conn

    async def reset(self) -> None:
        """Drop the connection after a failure, unless another task already replaced it."""
        conn = self._conn
        if conn is not None and (conn.broken or conn.closed):
            self._conn = None
            await conn.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
