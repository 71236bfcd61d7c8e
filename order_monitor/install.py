"""Applying the install/uninstall statements to a live database."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
from psycopg import sql

from order_monitor import schema
from order_monitor.config import Layout, OutcomeWrites
from order_monitor.db.connections import conninfo
from order_monitor.errors import OrderMonitorError, SchemaError


def apply(
    dsn: str,
    kind: str,
    layout: Layout,
    writes: OutcomeWrites | None = None,
    *,
    drop_undelivered: bool = False,
    capture: str = "trigger",
) -> Iterator[str]:
    """Run the statements one by one in autocommit, yielding a line per statement.

    Autocommit because CREATE/DROP INDEX CONCURRENTLY cannot run inside a
    transaction; every statement is idempotent, so a run cut short is simply
    run again. A statement with a condition (psql's \\if in the file) runs
    only when its condition holds. The files check the index themselves and
    raise, so a failed check surfaces here as the server's error.

    *drop_undelivered* (uninstall only) sets the session setting with which
    uninstall.sql drops an outbox that still holds deliveries, as a DBA
    would with SET before running the file.
    """
    # Named and with search_path pinned like every session of ours (the
    # statements pin it again themselves, for psql).
    with psycopg.connect(conninfo(dsn, f"sql {kind}"), autocommit=True) as conn:
        if drop_undelivered:
            conn.execute(
                "SELECT pg_catalog.set_config(%s, 'on', false)", (schema.DROP_UNDELIVERED,)
            )
        for statement in schema.statements_for(kind, layout, writes, capture=capture):
            first_line = statement.query.as_string(None).splitlines()[0]
            if statement.only_if is not None:
                row = conn.execute(sql.SQL("SELECT {}").format(statement.only_if)).fetchone()
                if row is None or not row[0]:
                    yield "--  " + first_line + " (not needed)"
                    continue
            try:
                conn.execute(statement.query)
            except psycopg.errors.RaiseException as exc:
                # Our own checks (index, owner, grant options): their message
                # and hint are written for the person running this.
                hint = exc.diag.message_hint
                message = (exc.diag.message_primary or str(exc)).removeprefix("order-monitor: ")
                raise SchemaError(f"{message}" + (f" — {hint}" if hint else "")) from None
            except psycopg.errors.LockNotAvailable:
                raise TableBusy(
                    f"{kind} stopped at the lock timeout ({schema.LOCK_TIMEOUT}): another "
                    "transaction holds the table, and the application's statements were "
                    "queueing behind ours. Nothing of that step was changed; run it again "
                    "when the table is quieter"
                ) from None
            yield "ok  " + first_line


class TableBusy(OrderMonitorError):
    """The install waited its lock timeout for the orders table: try again later."""

    exit_code = os.EX_TEMPFAIL if hasattr(os, "EX_TEMPFAIL") else 75
