"""Connections and the SQL the engine runs against the orders table.

Queries are composed once from the layout (identifiers via psycopg.sql) and
sent with server-side parameters; the ones that run per batch take arrays, so
one statement text serves any batch size and stays a prepared statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_never,
    wait_exponential,
    wait_random,
)

from order_monitor import __version__, schema
from order_monitor.config import Layout, OutcomeWrites
from order_monitor.errors import SchemaError
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


def conninfo(dsn: str, purpose: str, *, connect_timeout: int = 10) -> str:
    """*dsn* with our defaults added; the operator's own settings in it win."""
    params: dict[str, Any] = {
        **KEEPALIVES,
        "application_name": f"order-monitor {__version__} ({purpose})",
        "connect_timeout": str(connect_timeout),
    }
    params.update(conninfo_to_dict(dsn) if dsn else {})
    return make_conninfo("", **params)


@dataclass(frozen=True, slots=True)
class InFlightRow:
    """An order as the checker sees it, re-read just before its check."""

    id: uuid.UUID
    reference: str
    provider_id: str | None
    external_order_id: str | None
    #: Seconds since dispatch ("sentAt", else "createdAt"), by the server's clock.
    elapsed: float
    #: Seconds from dispatch to the last sync, if there was one after dispatch.
    last_checked: float | None


@dataclass(frozen=True, slots=True)
class SweepRow:
    id: uuid.UUID
    provider_id: str | None
    elapsed: float
    last_checked: float | None


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


class Queries:
    """The engine's statements for one table layout."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        c = layout.columns
        names = schema.Names(layout)
        table = names.table
        # now() last: a row with neither time (a nullable column mapping) is
        # treated as dispatched just now rather than having no age at all.
        dispatched = sql.SQL("coalesce({sent}, {created}, now())").format(
            sent=sql.Identifier(c.sent_at), created=sql.Identifier(c.created_at)
        )
        timing = sql.SQL(
            "extract(epoch FROM now() - {dispatched})::float8,"
            " CASE WHEN {last_sync} >= {dispatched}"
            " THEN extract(epoch FROM {last_sync} - {dispatched})::float8 END"
        ).format(dispatched=dispatched, last_sync=sql.Identifier(c.last_sync_at))
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

        self._confirm = sql.SQL(
            "SELECT {scheduling} FROM {table} WHERE {id} = ANY(%b) AND {in_flight}"
        ).format(scheduling=scheduling, id=id_, table=table, in_flight=in_flight)

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
            "SELECT order_id, outcome FROM {function}(%b, %b, %b, %b, %b, %b, %b)"
        ).format(function=names.write_function)

        # The handoff (install.sql's inbox): take up to N committed ids, by
        # their row addresses (a TID scan: the inbox has no index and needs
        # none). Rows of transactions not yet committed are not visible, so
        # they stay for the next call.
        self._drain = sql.SQL(
            "DELETE FROM {inbox} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {inbox} LIMIT %s))"
            " RETURNING order_id"
        ).format(inbox=names.inbox)
        # Installed and granted (role.sql): until both, the daemon keeps
        # the trigger on NOTIFY.
        self._inbox_exists = sql.SQL(
            "SELECT CASE WHEN to_regclass(%(t)s) IS NULL THEN false"
            " ELSE has_table_privilege(%(t)s, 'SELECT') AND has_table_privilege(%(t)s, 'DELETE')"
            " END"
        )
        self._inbox_regclass = names.inbox.as_string(None)
        key = schema.idle_lock_key(layout)
        self._take_idle_lock = sql.SQL("SELECT pg_advisory_lock({key})").format(
            key=sql.Literal(key)
        )
        self._give_idle_lock = sql.SQL("SELECT pg_advisory_unlock({key})").format(
            key=sql.Literal(key)
        )

    async def sweep_page(
        self, conn: AsyncConn, after: uuid.UUID | None, limit: int
    ) -> list[SweepRow]:
        if after is None:
            cursor = await conn.execute(self._sweep_first, (limit,))
        else:
            cursor = await conn.execute(self._sweep_next, (after, limit))
        return [SweepRow(*row) for row in await cursor.fetchall()]

    async def confirm(self, conn: AsyncConn, ids: Sequence[uuid.UUID]) -> list[SweepRow]:
        """Those of *ids* that are orders in flight, with where they stand."""
        cursor = await conn.execute(self._confirm, (list(ids),))
        return [SweepRow(*row) for row in await cursor.fetchall()]

    async def fetch_in_flight(self, conn: AsyncConn, ids: Sequence[uuid.UUID]) -> list[InFlightRow]:
        cursor = await conn.execute(self._reread, (list(ids),))
        return [InFlightRow(*row) for row in await cursor.fetchall()]

    async def write(self, conn: AsyncConn, batch: WriteBatch) -> dict[uuid.UUID, str]:
        """Apply the batch; return {id: kind} of the rows actually written.

        A row missing from the result was finished by someone else, or got a
        new provider reference, since it was read: its result is stale.
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
        return {row[0]: row[1] for row in await cursor.fetchall()}

    async def drain_inbox(self, conn: AsyncConn, limit: int) -> list[uuid.UUID]:
        """Take up to *limit* order ids out of the inbox (committed ones only)."""
        cursor = await conn.execute(self._drain, (limit,))
        return [row[0] for row in await cursor.fetchall()]

    async def inbox_installed(self, conn: AsyncConn) -> bool:
        """True when install.sql's version 2 (the inbox) is in place, and role.sql's grants."""
        cursor = await conn.execute(self._inbox_exists, {"t": self._inbox_regclass})
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
            async with conn.transaction():
                await conn.execute(
                    sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{ms}ms"))
                )
                await conn.execute(self._take_idle_lock)
        except psycopg.errors.LockNotAvailable:
            return False
        return True

    async def give_idle_lock(self, conn: AsyncConn) -> None:
        await conn.execute(self._give_idle_lock)


async def column_limits(
    conn: AsyncConn, layout: Layout, writes: OutcomeWrites | None = None
) -> ColumnLimits:
    """Check every configured column exists; read the lengths of those we write.

    Read from pg_catalog, which every role may read: the daemon's role has no
    privilege at all on the columns it only writes through the write function.
    Raises SchemaError naming what is missing, or a configured status value
    longer than its column, so a typo stops the daemon at start-up with a
    clear line instead of failing every batch later.
    """
    cursor = await conn.execute(
        "SELECT a.attname,"
        " CASE WHEN a.atttypid IN ('pg_catalog.varchar'::regtype, 'pg_catalog.bpchar'::regtype)"
        "       AND a.atttypmod > 0 THEN a.atttypmod - 4 END"
        " FROM pg_catalog.pg_attribute a"
        " JOIN pg_catalog.pg_class t ON t.oid = a.attrelid"
        " JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace"
        " WHERE n.nspname = %s AND t.relname = %s AND t.relkind IN ('r', 'p')"
        " AND a.attnum > 0 AND NOT a.attisdropped",
        (layout.schema, layout.table),
    )
    found = {name: length for name, length in await cursor.fetchall()}
    table = f"{layout.schema}.{layout.table}"
    if not found:
        raise SchemaError(
            f"table {table} does not exist (check ORDER_MONITOR_SCHEMA, ORDER_MONITOR_TABLE "
            "and the database in ORDER_MONITOR_DSN)"
        )
    missing = [name for name in layout.columns.configured() if name not in found]
    if missing:
        hint = (
            " (sql/install.sql adds it)"
            if missing == [layout.columns.provider_ref]
            else " (check the ORDER_MONITOR_COLUMN_* settings)"
        )
        raise SchemaError(f"table {table} has no column {', '.join(missing)}{hint}")
    c = layout.columns
    if writes is not None:
        for setting, value, column in (
            ("DONE_EXTERNAL_STATUS", writes.done_external_status, c.external_status),
            ("FAILED_EXTERNAL_STATUS", writes.failed_external_status, c.external_status),
            ("GAVE_UP_EXTERNAL_STATUS", writes.gave_up_external_status, c.external_status),
            ("DONE_STATUS", writes.done_status, c.status),
            ("FAILED_STATUS", writes.failed_status, c.status),
        ):
            limit = found[column]
            if value is not None and limit is not None and len(value) > limit:
                raise SchemaError(
                    f"ORDER_MONITOR_{setting}={value!r} is longer than column {column} "
                    f"allows ({limit} characters)"
                )
    return ColumnLimits(
        pin_code=found[c.pin_code],
        provider_message=found[c.provider_message],
        last_message=found[c.last_message],
    )


async def write_function_problem(
    conn: AsyncConn, layout: Layout, writes: OutcomeWrites
) -> str | None:
    """Why the installed write function cannot serve these settings, or None.

    The function fixes what each outcome writes at install time, so a daemon
    whose ORDER_MONITOR_*_STATUS settings differ from the install would
    write other words than its operator expects. Compared on the body's text
    as stored (pg_proc.prosrc keeps it verbatim).
    """
    names = schema.Names(layout)
    cursor = await conn.execute(
        "SELECT p.prosrc, p.prosecdef, pg_catalog.has_function_privilege(p.oid, 'EXECUTE')"
        " FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace"
        " WHERE n.nspname = %s AND p.proname = %s",
        (layout.schema, names.write_function_name),
    )
    rows = await cursor.fetchall()
    qualified = names.write_function.as_string(None)
    if not rows:
        return (
            f"the write function {qualified}() is missing: run `order-monitor sql install` "
            "(or psql -f sql/install.sql) as the table's owner, then sql/role.sql"
        )
    source, security_definer, executable = rows[0]
    if source != schema.write_function_body(layout, writes) or not security_definer:
        return (
            f"the write function {qualified}() was installed for other settings or by another "
            "release (ORDER_MONITOR_*_STATUS, columns or channels differ): run "
            "`order-monitor sql install` with these settings as the table's owner"
        )
    if not executable:
        return (
            f"this role may not execute {qualified}(): apply `order-monitor sql print role` "
            "(sql/role.sql) for this role"
        )
    return None


async def check_write_function(conn: AsyncConn, layout: Layout, writes: OutcomeWrites) -> None:
    """Raise SchemaError when :func:`write_function_problem` finds one."""
    problem = await write_function_problem(conn, layout, writes)
    if problem is not None:
        raise SchemaError(problem)


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
