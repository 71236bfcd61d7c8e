"""The files in sql/: the statements rendered with a header a DBA reads first."""

from __future__ import annotations

from collections.abc import Iterator

from psycopg import sql

from order_monitor.config import Layout, OutcomeWrites
from order_monitor.schema.install import install_statements, role_statements, uninstall_statements
from order_monitor.schema.names import VERSION, Statement

_HEADERS = {
    "install": """\
-- order-monitor: install (schema version {version})
--
-- What it does, on the orders table {table}:
--   * adds the column {ref} (if missing; no rewrite, data untouched);
--   * builds a small partial index of the orders in flight, CONCURRENTLY;
--   * adds a trigger that announces an order when it enters flight or gets a
--     new provider reference: with NOTIFY {channel} while the daemon is idle,
--     through a small UNLOGGED inbox table while it is busy (a NOTIFY per
--     order would serialise the application's commits; see the table's comment);
--   * replaces version 1's triggers, which NOTIFYed always, in one transaction;
--   * creates the function through which the daemon writes results (and
--     nothing else): {writes}.
-- An order is "in flight" when {ref} is set, lower({external_status}) is one of
-- ({in_flight}) and lower({status}) is not one of ({final}).
--
-- Apply with psql, as the table's owner, NOT inside a transaction
-- (CREATE INDEX CONCURRENTLY refuses to run in one):
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/install.sql
-- or, for a non-default layout: order-monitor sql install
-- Running it again is harmless: every statement is idempotent.
-- Upgrading from version 1: upgrade the daemon first (it runs on either
-- version, and holds the lock the new trigger looks for), then run this.
""",
    "uninstall": """\
-- order-monitor: uninstall (schema version {version})
--
-- Removes the triggers and trigger functions (this version's and version 1's),
-- the inbox, the write function and the index from {table}.
-- Keeps the column {ref} and every row: nothing the application wrote is lost.
-- Apply with psql, not inside a transaction (DROP INDEX CONCURRENTLY):
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/uninstall.sql
""",
    "role": """\
-- order-monitor: a least-privilege login role for the daemon
--
-- The daemon reads some columns of {table} and writes results only through
-- the write function install.sql creates; it has no UPDATE, INSERT or DELETE
-- on the table, and never sees prices, user data or PINs. It takes order ids
-- from the inbox install.sql creates (SELECT and DELETE there, nothing else).
-- LISTEN/NOTIFY and advisory locks need no grant.
-- Apply with psql as a role that may create roles, after install.sql (the
-- grants name the column and the function it adds); running it again is
-- harmless, and brings an older release's grants down to these:
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/role.sql
-- then give the role a password in psql with: \\password {role}
""",
}


def render(kind: str, layout: Layout, writes: OutcomeWrites | None = None) -> str:
    """The text of sql/<kind>.sql for this layout."""
    statements = list(statements_for(kind, layout, writes))
    c = layout.columns
    header = _HEADERS[kind].format(
        version=VERSION,
        table=sql.Identifier(layout.schema, layout.table).as_string(None),
        ref=sql.Identifier(c.provider_ref).as_string(None),
        channel=layout.channel,
        external_status=sql.Identifier(c.external_status).as_string(None),
        status=sql.Identifier(c.status).as_string(None),
        in_flight=", ".join(layout.in_flight_external_statuses),
        final=", ".join(layout.final_statuses),
        role=sql.Identifier(layout.role).as_string(None),
        writes=describe_writes(writes or OutcomeWrites()),
    )
    return header + "".join(_render_statement(s) for s in statements)


def describe_writes(writes: OutcomeWrites) -> str:
    """What each outcome writes, in the words of the install's header."""
    parts = [
        f"done sets {writes.done_external_status!r}",
        f"failed {writes.failed_external_status!r}",
        f"gave_up {writes.gave_up_external_status!r}",
    ]
    if writes.done_status is None and writes.failed_status is None:
        parts.append("status is never written")
    else:
        parts.append(f"status {writes.done_status!r} / {writes.failed_status!r}")
    return ", ".join(parts)


def _render_statement(statement: Statement) -> str:
    comment = "".join(f"-- {line}".rstrip() + "\n" for line in statement.comment.splitlines())
    return f"\n{comment}{statement.text()};\n"


def statements_for(
    kind: str, layout: Layout, writes: OutcomeWrites | None = None
) -> Iterator[Statement]:
    if kind == "install":
        yield from install_statements(layout, writes)
    elif kind == "uninstall":
        yield from uninstall_statements(layout)
    elif kind == "role":
        yield from role_statements(layout)
    else:
        raise ValueError(kind)
