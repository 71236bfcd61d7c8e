"""The server and the table: a primary answers, the table and its columns are there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psycopg import sql

from order_monitor import db
from order_monitor.config import Layout, Settings
from order_monitor.db.sessions import REPLICA_HINT
from order_monitor.errors import OrderMonitorError
from order_monitor.operator.findings import INSTALL_HINT, Emit, Verdict


async def fetch_one(
    conn: db.AsyncConn, query: str | sql.SQL | sql.Composed, params: Any = None
) -> Any:
    """The first row of *query* (None when there is none)."""
    cursor = await conn.execute(query, params)
    return await cursor.fetchone()


async def check_server(conn: db.AsyncConn, settings: Settings, emit: Emit) -> bool:
    """The server answers; False on a replica, where no further check means anything."""
    row = await fetch_one(
        conn,
        "SELECT pg_catalog.current_setting('server_version'), pg_catalog.current_database(),"
        " current_user, pg_catalog.pg_is_in_recovery()",
    )
    version, database, user, in_recovery = row
    where = f"PostgreSQL {version}, database {database} as {user} ({settings.safe_dsn})"
    if in_recovery:
        emit(Verdict.FAIL, "database", f"{where}: {REPLICA_HINT}")
        return False
    emit(Verdict.PASS, "database", f"connected: {where}")
    return True


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    #: format_type() of the column: e.g. 'character varying(30)'.
    type: str
    #: Qualified collation name when it is not the type's default.
    collation: str | None


@dataclass(frozen=True, slots=True)
class Table:
    oid: int
    columns: dict[str, Column]
    #: Every configured column (the provider reference included) exists.
    complete: bool


async def check_table(conn: db.AsyncConn, layout: Layout, emit: Emit) -> Table | None:
    """The table and its columns, read from the catalog (no privilege on the table needed)."""
    table = f"{layout.schema}.{layout.table}"
    row = await fetch_one(
        conn,
        "SELECT c.oid FROM pg_catalog.pg_class c"
        " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
        (layout.schema, layout.table),
    )
    if row is None:
        emit(
            Verdict.FAIL,
            "table",
            f"{table} does not exist in this database — check ORDER_MONITOR_SCHEMA, "
            "ORDER_MONITOR_TABLE and the database named in ORDER_MONITOR_DSN",
        )
        return None
    oid = int(row[0])
    cursor = await conn.execute(
        "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod),"
        " CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation"
        "      THEN pg_catalog.format('%%I.%%I', cn.nspname, co.collname) END"
        " FROM pg_catalog.pg_attribute a"
        " JOIN pg_catalog.pg_type t ON t.oid = a.atttypid"
        " LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation"
        " LEFT JOIN pg_catalog.pg_namespace cn ON cn.oid = co.collnamespace"
        " WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped",
        (oid,),
    )
    columns = {name: Column(name, type_, coll) for name, type_, coll in await cursor.fetchall()}
    emit(Verdict.PASS, "table", f"{table} exists")

    c = layout.columns
    wanted = [name for name in c.configured() if name != c.provider_ref]
    missing = [name for name in wanted if name not in columns]
    if missing:
        emit(
            Verdict.FAIL,
            "columns",
            f"{table} has no column {', '.join(missing)} — set ORDER_MONITOR_COLUMN_<NAME> "
            "to the names your table uses (names are case-sensitive)",
        )
    else:
        emit(Verdict.PASS, "columns", f"all {len(wanted)} configured columns exist")

    ref = columns.get(c.provider_ref)
    if ref is None:
        emit(
            Verdict.FAIL,
            "provider reference column",
            f"{table} has no column {c.provider_ref} — {INSTALL_HINT}",
        )
    else:
        emit(Verdict.PASS, "provider reference column", f"{c.provider_ref} {ref.type}")

    complete = not missing and ref is not None
    if complete:
        # The daemon's own start-up check, which sees only the columns this
        # role may read: it fails when the catalog has them but the grants do not.
        try:
            await db.column_limits(conn, layout)
        except OrderMonitorError as exc:
            emit(Verdict.FAIL, "columns", f"the daemon's start-up check fails: {exc}")
    return Table(oid, columns, complete)
