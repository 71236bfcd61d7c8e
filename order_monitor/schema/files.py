"""The files in sql/: the statements rendered with a header a DBA reads first."""

from __future__ import annotations

from collections.abc import Iterator

from psycopg import sql

from order_monitor.config import Layout, OutcomeWrites
from order_monitor.schema.decoding import decoding_statements
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
--     new provider reference, with NOTIFY {channel}, while the daemon is idle;
--     while it is busy the trigger's WHEN is false (a NOTIFY per order would
--     serialise the application's commits) and the daemon reads the orders
--     that changed since its last read instead: nothing of ours runs in the
--     application's transaction but the WHEN, one try of an advisory lock
--     (see the triggers' comment);
--   * replaces older versions' triggers and trigger function in one
--     transaction (version 5's in place), and drops versions 1 to 4's
--     functions and versions 2 to 4's UNLOGGED inbox;
--   * creates the function through which the daemon writes results (and
--     nothing else): {writes};
--   * creates the outbox: the results an action of the providers file
--     delivers to the application (approve; reject and refund), recorded by
--     the write function in the transaction that writes them;
--   * leaves EXECUTE on its functions to the table's owner (and, once
--     role.sql has run, the write function to the daemon's role) only.
-- An order is "in flight" when {ref} is set, lower({external_status}) is one of
-- ({in_flight}) and lower({status}) is not one of ({final}).
--
-- Apply with psql (it uses \\if), as the table's owner or a superuser (it
-- then switches to the owner), NOT inside a transaction (CREATE INDEX
-- CONCURRENTLY refuses to run in one):
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/install.sql
-- or, for a non-default layout: order-monitor sql install
-- Running it again is harmless: every step is idempotent, and a run that
-- finds nothing to change takes no lock on the table. If it stops on
-- "lock timeout" (the table was busy), run it again.
-- Upgrading from version 5: in place, with the daemons running, in any
-- order (daemons of both releases work on either install); the triggers and
-- their function change in one transaction, under SHARE ROW EXCLUSIVE.
-- Upgrading from version 4 (or 3): in place, with the daemons running, in
-- this order: first upgrade and restart every daemon (standbys included; a
-- daemon of this release works on the version 4 install as well), then run
-- this, then role.sql. A daemon of an earlier release does not look for the
-- orders this trigger leaves unannounced while it is busy: its sweep would
-- find them, minutes late.
-- Upgrading from version 1 or 2: stop every order-monitor instance (standbys
-- included), run this, then start the new version (it refuses to start on
-- an older schema, and an older one cannot write on this).
""",
    "uninstall": """\
-- order-monitor: uninstall (schema version {version})
--
-- Removes every object any version created on {table}: the triggers and
-- trigger functions (versions 1 to 6), the inbox of versions 2 to 4, the
-- write functions, the outbox and the
-- index. Keeps the column {ref} and every row: nothing the application
-- wrote is lost. Refuses, changing nothing, while the outbox holds results
-- not yet delivered to the application, unless this session first says
--     SET order_monitor.drop_undelivered = on;
-- Apply with psql, not inside a transaction (DROP INDEX CONCURRENTLY):
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/uninstall.sql
""",
    "role": """\
-- order-monitor: a least-privilege login role for the daemon
--
-- The daemon reads some columns of {table} and writes results only through
-- the write function install.sql creates; it has no UPDATE, INSERT or DELETE
-- on the table, and never sees prices, user data or PINs. It reads and
-- settles the outbox install.sql creates (no INSERT there).
-- LISTEN/NOTIFY and advisory locks need no grant.
-- Apply with psql as a role that may create roles and grant all of this
-- (a superuser, or the table's owner with CREATEROLE), after install.sql
-- (the grants name the column and the function it adds). It is one
-- transaction, and stops with an ERROR, changing nothing, when the role
-- running it cannot grant something. It takes back any power an existing
-- role had (SUPERUSER, CREATEDB, CREATEROLE, REPLICATION, BYPASSRLS; it keeps
-- LOGIN). Running it again is harmless, and brings an older release's grants
-- down to these:
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/role.sql
-- then give the role a password in psql with: \\password {role}
""",
    "decoding": """\
-- order-monitor: capture dispatched orders from the WAL (opt-in, schema version {version})
--
-- For a server with wal_level = logical. Instead of a trigger, the daemon
-- (ORDER_MONITOR_CAPTURE=decoding) reads the orders of {table} from a
-- logical replication slot: the application's commits do no work of ours.
-- What it does:
--   * creates the slot (pgoutput), named after the database and the table;
--   * a NOLOGIN role {role}_decoder with REPLICATION, which owns the four
--     functions the daemon calls to read the slot, confirm what it read, see
--     the slot's state, and recreate it once invalidated (only then): the
--     daemon's role {role} keeps no REPLICATION, and so cannot decode any
--     other table;
--   * a publication of {table}'s inserts and updates, with the columns
--     the in-flight rule reads and the id only;
--   * drops our triggers (ACCESS EXCLUSIVE on the table, once, at most 3 s).
-- A slot nobody reads keeps WAL until the disk is full: set
-- max_slot_wal_keep_size (doctor requires it); the daemon recreates a slot
-- invalidated for falling behind, then sweeps.
-- Apply with psql as a superuser, after install.sql and role.sql, NOT inside
-- a transaction (the slot is created in a transaction of its own):
--     psql "$DSN" -v ON_ERROR_STOP=1 -f sql/decoding.sql
-- Running it again is harmless. Back to the trigger: run install.sql (it puts
-- the triggers back), then uninstall's decoding part by hand, or all of
-- uninstall.sql as a superuser to retire order-monitor.
""",
}


def render(
    kind: str, layout: Layout, writes: OutcomeWrites | None = None, *, capture: str = "trigger"
) -> str:
    """The text of sql/<kind>.sql for this layout."""
    statements = list(statements_for(kind, layout, writes, capture=capture))
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
    if writes.deliver:
        columns = ", ".join(writes.deliver_columns) or "no column"
        parts.append(
            f"and it records {', '.join(writes.deliver)} results in the outbox "
            f"(with {columns}) for the actions to deliver"
        )
    else:
        parts.append("no result is recorded in the outbox (no action is configured)")
    return ", ".join(parts)


def _render_statement(statement: Statement) -> str:
    comment = "".join(f"-- {line}".rstrip() + "\n" for line in statement.comment.splitlines())
    # A conditional statement ends with psql's \\endif, which takes no ";".
    end = "" if statement.only_if is not None else ";"
    return f"\n{comment}{statement.text()}{end}\n"


def statements_for(
    kind: str, layout: Layout, writes: OutcomeWrites | None = None, *, capture: str = "trigger"
) -> Iterator[Statement]:
    """*capture*: ORDER_MONITOR_CAPTURE; with "decoding", install creates no trigger."""
    if kind == "install":
        yield from install_statements(layout, writes, capture=capture)
    elif kind == "uninstall":
        yield from uninstall_statements(layout)
    elif kind == "role":
        yield from role_statements(layout)
    elif kind == "decoding":
        yield from decoding_statements(layout)
    else:
        raise ValueError(kind)
