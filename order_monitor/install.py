"""Applying the install/uninstall statements to a live database."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout, OutcomeWrites


def apply(
    dsn: str, kind: str, layout: Layout, writes: OutcomeWrites | None = None
) -> Iterator[str]:
    """Run the statements one by one in autocommit, yielding a line per statement.

    Autocommit because CREATE/DROP INDEX CONCURRENTLY cannot run inside a
    transaction; every statement is idempotent, so a run cut short is simply
    run again. A statement with a condition (psql's \\if in the file) runs
    only when its condition holds. The files check the index themselves and
    raise, so a failed check surfaces here as the server's error.
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in schema.statements_for(kind, layout, writes):
            first_line = statement.query.as_string(None).splitlines()[0]
            if statement.only_if is not None:
                row = conn.execute(sql.SQL("SELECT {}").format(statement.only_if)).fetchone()
                if row is None or not row[0]:
                    yield "--  " + first_line + " (not needed)"
                    continue
            conn.execute(statement.query)
            yield "ok  " + first_line
