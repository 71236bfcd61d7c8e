"""Applying the install/uninstall statements to a live database."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout, OutcomeWrites
from order_monitor.errors import SchemaError


def apply(
    dsn: str, kind: str, layout: Layout, writes: OutcomeWrites | None = None
) -> Iterator[str]:
    """Run the statements one by one in autocommit, yielding a line per statement.

    Autocommit because CREATE/DROP INDEX CONCURRENTLY cannot run inside a
    transaction; every statement is idempotent, so a run cut short is simply
    run again.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in schema.statements_for(kind, layout, writes):
            conn.execute(statement.query)
            yield "ok  " + statement.text().splitlines()[0]
        if kind == "install":
            _check_index_valid(conn, layout)


def _check_index_valid(conn: psycopg.Connection[tuple[object, ...]], layout: Layout) -> None:
    names = schema.Names(layout)
    row = conn.execute(
        sql.SQL(
            "SELECT i.indisvalid FROM pg_catalog.pg_index i"
            " JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s"
        ),
        (layout.schema, names.index_name),
    ).fetchone()
    if row is None or not row[0]:
        raise SchemaError(
            f"index {names.index_name} exists but is INVALID (an earlier concurrent build "
            f"was interrupted): run DROP INDEX CONCURRENTLY {names.index.as_string(None)}; "
            "then install again"
        )
