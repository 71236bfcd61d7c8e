"""What the daemon checks of the table and the install before it starts."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Final

import psycopg
from psycopg import sql

import order_monitor.schema.guards
from order_monitor import schema
from order_monitor.config import Layout, OutcomeWrites
from order_monitor.db.connections import AsyncConn
from order_monitor.db.queries import ColumnLimits
from order_monitor.errors import SchemaError
from order_monitor.logs import get_logger

log = get_logger()


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
        installed = _installed_deliveries(source, layout, writes) if security_definer else None
        if installed is not None:
            return (
                f"the write function {qualified}() records {_deliveries(installed)} for"
                f" delivery, but {_wanted(writes)}: re-render and"
                " apply install.sql for these actions (`order-monitor sql install` with this"
                " providers file) as the table's owner"
            )
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


#: The outcomes the installed body records (``WHERE written.kind IN ('done', ...)``)...
_RECORDED_OUTCOMES: Final = re.compile(r"WHERE written\.kind IN \(((?:'[a-z_]+'(?:, )?)+)\)")
#: ...and the row columns it copies (``jsonb_build_object('tenantId', "o"."tenantId", ...``).
_RECORDED_COLUMNS: Final = re.compile(r"jsonb_build_object\((.*)\) AS recorded_columns")
_COLUMN_NAME: Final = re.compile(r"'((?:[^']|'')*)', ")


def _installed_deliveries(
    source: str, layout: Layout, writes: OutcomeWrites
) -> OutcomeWrites | None:
    """The deliveries an installed body records, when they are all it differs in, else None.

    Read from the body's text, then proven by rendering the body for them:
    a guess that does not give back the installed text byte for byte is no
    answer, so another difference keeps the general message.
    """
    outcomes = _RECORDED_OUTCOMES.search(source)
    deliver = tuple(re.findall(r"'([a-z_]+)'", outcomes.group(1))) if outcomes else ()
    columns = _RECORDED_COLUMNS.search(source) if deliver else None
    deliver_columns = (
        tuple(name.replace("''", "'") for name in _COLUMN_NAME.findall(columns.group(1)))
        if columns
        else ()
    )
    candidate = replace(writes, deliver=deliver, deliver_columns=deliver_columns)
    if candidate == writes:
        return None
    try:
        rendered = schema.write_function_body(layout, candidate)
    except ValueError:  # not a set install.sql can be rendered for: not ours
        return None
    return candidate if rendered == source else None


def _wanted(writes: OutcomeWrites) -> str:
    if not writes.deliver:
        return "no action is configured"
    return f"the actions deliver {_deliveries(writes)}"


def _deliveries(writes: OutcomeWrites) -> str:
    if not writes.deliver:
        return "no results"
    columns = f" with {', '.join(writes.deliver_columns)}" if writes.deliver_columns else ""
    return f"{', '.join(writes.deliver)} results{columns}"


async def check_write_function(conn: AsyncConn, layout: Layout, writes: OutcomeWrites) -> None:
    """Raise SchemaError when :func:`write_function_problem` finds one."""
    problem = await write_function_problem(conn, layout, writes)
    if problem is not None:
        raise SchemaError(problem)


async def decoding_functions(conn: AsyncConn, layout: Layout) -> tuple[list[str], list[str]]:
    """decoding.sql's functions (signatures) that are missing, and that this role may not run."""
    names = schema.Names(layout)
    cursor = await conn.execute(
        "SELECT f, pg_catalog.to_regprocedure(f) IS NOT NULL,"
        " coalesce(pg_catalog.has_function_privilege(pg_catalog.to_regprocedure(f), 'EXECUTE'),"
        "          false)"
        " FROM pg_catalog.unnest(%s::text[]) WITH ORDINALITY AS s(f, n) ORDER BY n",
        (
            [
                sql.SQL("{}({})").format(function, sql.SQL(arguments)).as_string(None)
                for function, arguments in names.decoding_functions
            ],
        ),
    )
    rows = await cursor.fetchall()
    missing = [str(f) for f, present, _ in rows if not present]
    refused = [str(f) for f, present, allowed in rows if present and not allowed]
    return missing, refused


async def check_decoding(conn: AsyncConn, layout: Layout) -> None:
    """With ORDER_MONITOR_CAPTURE=decoding: raise SchemaError unless decoding.sql's functions
    are there and this role may execute them."""
    missing, refused = await decoding_functions(conn, layout)
    if missing or refused:
        raise SchemaError(
            f"ORDER_MONITOR_CAPTURE=decoding, but {', '.join(missing + refused)} is missing or "
            "not executable by this role: run sql/decoding.sql as a superuser (after install.sql "
            "and role.sql; `order-monitor sql print decoding`), or set "
            "ORDER_MONITOR_CAPTURE=trigger"
        )


async def index_problem(conn: AsyncConn, layout: Layout) -> str | None:
    """Why the sweep's index cannot serve, or None: missing, INVALID, or built for another rule.

    The same check ``install.sql`` makes before it goes on (a DO block that
    raises), run here in a transaction that is rolled back: it builds the
    index it would create on a temporary copy of the columns and compares
    the two stored expression trees. Without a usable index every sweep
    page is a scan of the table, so a daemon that starts anyway gets slower
    as the table grows, and nobody is told why.
    """
    try:
        async with conn.transaction(force_rollback=True):
            await conn.execute(order_monitor.schema.guards.check_index(layout))
    except psycopg.errors.RaiseException as exc:
        problem = (exc.diag.message_primary or str(exc)).removeprefix("order-monitor: ")
        hint = exc.diag.message_hint or "run `order-monitor sql install` (sql/install.sql)"
        return f"{problem} — {hint.replace('this file', 'sql/install.sql')}"
    except psycopg.errors.InsufficientPrivilege as exc:
        # No TEMPORARY on the database (a DBA may revoke it from PUBLIC): the
        # rule cannot be compared, but an INVALID index still can.
        log.warning("schema.index_rule_not_compared", reason=str(exc).strip())
        return await _invalid_index(conn, layout)
    return None


async def _invalid_index(conn: AsyncConn, layout: Layout) -> str | None:
    index = schema.Names(layout).index.as_string(None)
    cursor = await conn.execute(
        "SELECT i.indisvalid AND i.indisready FROM pg_catalog.pg_index i"
        " WHERE i.indexrelid = pg_catalog.to_regclass(%s)",
        (index,),
    )
    row = await cursor.fetchone()
    if row is None:
        return f"index {index} is missing — run `order-monitor sql install` (sql/install.sql)"
    if not row[0]:
        return (
            f"index {index} is INVALID (an interrupted CREATE INDEX CONCURRENTLY left it) — "
            f"run DROP INDEX CONCURRENTLY {index}; then sql/install.sql again"
        )
    return None


async def check_index(conn: AsyncConn, layout: Layout) -> None:
    """Raise SchemaError when :func:`index_problem` finds one."""
    problem = await index_problem(conn, layout)
    if problem is not None:
        raise SchemaError(problem)
