"""The orders table layout rendered as SQL.

Every identifier reaches SQL through :class:`psycopg.sql.Identifier` and every
configured value through :class:`psycopg.sql.Literal`; nothing is pasted into
SQL text with string formatting. The files in ``sql/`` are this module's
rendering of the default layout (a test keeps them equal), so what a DBA
reviews is exactly what ``order-monitor sql install`` runs.

Object names carry the version that last changed them: the index and the
write function are still ``_v1``; the trigger, its function and the inbox
are ``_v2`` (the handoff: see :mod:`order_monitor.engine.handoff`). The install
swaps the ``_v1`` triggers for the ``_v2`` ones in one transaction, so no
application commit falls between the two sets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from psycopg import sql

from order_monitor.config import Layout, OutcomeWrites

#: The schema version the files announce: that of the newest object.
VERSION = 2


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement and the comment a reader sees above it."""

    comment: str
    query: sql.SQL | sql.Composed
    #: Whether doctor replays it on a temporary copy of the table to learn
    #: what the install creates (a transaction block or an UNLOGGED table
    #: cannot be replayed there).
    replayable: bool = True

    def text(self) -> str:
        return self.query.as_string(None)


def object_name(prefix: str, table: str, suffix: str) -> str:
    """A name for an object we create, kept within Postgres' 63-byte limit."""
    name = f"{prefix}_{table}_{suffix}"
    if len(name.encode()) <= 63:
        return name
    digest = hashlib.sha1(table.encode(), usedforsecurity=False).hexdigest()[:8]
    keep = 63 - len(prefix) - len(suffix) - len(digest) - 3
    return f"{prefix}_{table.encode()[:keep].decode(errors='ignore')}{digest}_{suffix}"


class Names:
    """Identifiers of the table, its columns and the objects we install."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.table = sql.Identifier(layout.schema, layout.table)
        self.index_name = object_name("order_monitor", layout.table, "inflight_v1")
        self.index = sql.Identifier(layout.schema, self.index_name)
        self.function_name = object_name("order_monitor", layout.table, "notify_v2")
        self.function = sql.Identifier(layout.schema, self.function_name)
        self.inbox_name = object_name("order_monitor", layout.table, "inbox_v2")
        self.inbox = sql.Identifier(layout.schema, self.inbox_name)
        self.write_function_name = object_name("order_monitor", layout.table, "write_v1")
        self.write_function = sql.Identifier(layout.schema, self.write_function_name)
        self.insert_trigger_name = "order_monitor_insert_v2"
        self.update_trigger_name = "order_monitor_update_v2"
        self.role = sql.Identifier(layout.role)
        #: What version 1 installed and version 2 replaces (dropped by install).
        self.v1_function_name = object_name("order_monitor", layout.table, "notify_v1")
        self.v1_function = sql.Identifier(layout.schema, self.v1_function_name)
        self.v1_insert_trigger_name = "order_monitor_insert_v1"
        self.v1_update_trigger_name = "order_monitor_update_v1"


def advisory_key(name: str) -> int:
    """A bigint advisory lock key for *name*: the first 64 bits of its MD5, signed.

    Stable across versions, hosts and processes, and computable in psql as
    ``('x' || left(md5(name), 16))::bit(64)::bigint``.
    """
    digest = hashlib.md5(name.encode(), usedforsecurity=False)
    return int.from_bytes(digest.digest()[:8], "big", signed=True)


def advisory_key_parts(key: int) -> tuple[int, int]:
    """(classid, objid): how pg_locks shows a bigint advisory key (high and low 32 bits)."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return unsigned >> 32, unsigned & 0xFFFF_FFFF


def idle_lock_key(layout: Layout) -> int:
    """The advisory lock the daemon holds while it wants NOTIFYs (see handoff).

    Like the leader lock's key, the first 64 bits of an MD5, as a signed
    bigint, computable in psql::

        SELECT ('x' || left(md5('order_monitor:idle:public.product_orders'), 16))::bit(64)::bigint;
    """
    return advisory_key(f"order_monitor:idle:{layout.schema}.{layout.table}")


def in_flight_predicate(layout: Layout, row: str | None = None) -> sql.Composed:
    """The "order is in flight" rule, optionally on a row alias (NEW, OLD, o).

    The partial index is built on this exact expression and the sweep query
    repeats it, with the values as literals: the planner can only use a
    partial index when the query's predicate visibly implies the index's.
    """
    c = layout.columns

    def ref(column: str) -> sql.Composable:
        if row is None:
            return sql.Identifier(column)
        # The row alias is one of our constants (NEW, OLD, o), never configuration.
        return sql.Composed([sql.SQL(row + "."), sql.Identifier(column)])

    external = sql.SQL(", ").join(sql.Literal(s) for s in layout.in_flight_external_statuses)
    final = sql.SQL(", ").join(sql.Literal(s) for s in layout.final_statuses)
    return sql.SQL(
        "{ref} IS NOT NULL AND lower({external_status}) IN ({external}) "
        "AND lower({status}) NOT IN ({final})"
    ).format(
        ref=ref(c.provider_ref),
        external_status=ref(c.external_status),
        external=external,
        status=ref(c.status),
        final=final,
    )


def _dollar_quoted(body: str) -> sql.SQL:
    """*body* as a dollar-quoted string whose tag does not occur inside it.

    The body contains configured identifiers; a fixed ``$$`` could be closed
    by one of them.
    """
    tag = "$om$"
    n = 0
    while tag in body:
        n += 1
        tag = f"$om{n}$"
    return sql.SQL(tag + body + tag)  # the tag is ours, the body was composed


#: The write function's parameters, in order: what the daemon sends per order.
WRITE_PARAMETERS: Final = (
    ("p_ids", "uuid[]"),
    ("p_references", "text[]"),
    ("p_provider_ids", "text[]"),
    ("p_kinds", "text[]"),
    ("p_pins", "text[]"),
    ("p_provider_messages", "text[]"),
    ("p_last_messages", "text[]"),
)
#: The outcomes the write function accepts; anything else is ignored.
WRITE_KINDS: Final = ("done", "failed", "gave_up", "pending")


def write_signature() -> sql.Composed:
    """The write function's argument types, as DROP/GRANT/REVOKE name them."""
    return sql.SQL(", ").join(sql.SQL(t) for _, t in WRITE_PARAMETERS)


def write_function_body(layout: Layout, writes: OutcomeWrites) -> str:
    """The plpgsql body of the write function, for these settings.

    What each outcome writes is fixed here, at install time, from the
    settings: the daemon sends only the outcome and the provider's text, so
    its role cannot set a status word the DBA did not install.
    """
    c = layout.columns
    o = sql.Identifier("o")

    def col(name: str) -> sql.Composed:
        return sql.Composed([o, sql.SQL("."), sql.Identifier(name)])

    def by_kind(column: str, values: dict[str, str | None]) -> sql.Composed:
        arms = [
            sql.SQL("WHEN {kind} THEN {value}").format(
                kind=sql.Literal(kind), value=sql.Literal(value)
            )
            for kind, value in values.items()
            if value is not None
        ]
        return sql.SQL(
            "CASE v.kind\n                {arms}\n                ELSE {old} END"
        ).format(arms=sql.SQL("\n                ").join(arms), old=col(column))

    sets = [
        sql.SQL("{column} = {value}").format(
            column=sql.Identifier(c.external_status),
            value=by_kind(
                c.external_status,
                {
                    "done": writes.done_external_status,
                    "failed": writes.failed_external_status,
                    "gave_up": writes.gave_up_external_status,
                },
            ),
        ),
        sql.SQL(
            "{pin} = CASE WHEN v.kind = 'done' THEN coalesce(v.pin, {o_pin}) ELSE {o_pin} END"
        ).format(pin=sql.Identifier(c.pin_code), o_pin=col(c.pin_code)),
        sql.SQL("{column} = coalesce(v.provider_message, {old})").format(
            column=sql.Identifier(c.provider_message), old=col(c.provider_message)
        ),
        sql.SQL("{column} = coalesce(v.last_message, {old})").format(
            column=sql.Identifier(c.last_message), old=col(c.last_message)
        ),
        sql.SQL("{column} = now()").format(column=sql.Identifier(c.last_sync_at)),
        sql.SQL("{column} = CASE WHEN v.kind <> 'pending' THEN now() ELSE {old} END").format(
            column=sql.Identifier(c.completed_at), old=col(c.completed_at)
        ),
        sql.SQL(
            "{column} = CASE WHEN v.kind <> 'pending' THEN least(\n"
            "            extract(epoch FROM now() - coalesce({sent}, {created})) * 1000,\n"
            "            2147483647)::integer ELSE {old} END"
        ).format(
            column=sql.Identifier(c.duration_ms),
            sent=col(c.sent_at),
            created=col(c.created_at),
            old=col(c.duration_ms),
        ),
    ]
    if writes.done_status is not None or writes.failed_status is not None:
        sets.append(
            sql.SQL("{column} = {value}").format(
                column=sql.Identifier(c.status),
                value=by_kind(
                    c.status, {"done": writes.done_status, "failed": writes.failed_status}
                ),
            )
        )
    params = [sql.SQL(name) for name, _ in WRITE_PARAMETERS]
    # One set-based statement, not a loop with a PERFORM and RETURN NEXT per
    # row; in plpgsql, whose plan is prepared once per session (a LANGUAGE
    # sql body is planned again at every call).
    body = sql.SQL(
        """
BEGIN
RETURN QUERY
WITH v AS (
    SELECT * FROM unnest({params})
        AS v(id, ref, provider_id, kind, pin, provider_message, last_message)
), written AS (
    UPDATE {table} AS o SET
        {sets}
    FROM v
    WHERE {o_id} = v.id
      -- The guard: the same reference and provider as when the daemon read
      -- the row, and the row still in flight. A result that lost a race
      -- (an operator finished the order, the application re-sent it) is
      -- not written, and a finished row, its PIN included, is out of reach.
      AND {o_ref} = v.ref
      AND {o_provider_id}::text IS NOT DISTINCT FROM v.provider_id
      AND v.kind IN ({kinds})
      AND {in_flight}
    RETURNING {o_id} AS id, v.kind AS kind,
        -- A hint for the application, in the same transaction: anyone may
        -- NOTIFY on any channel, so it re-reads the row (by id and reference)
        -- before acting on it. RETURNING runs for every row written.
        CASE WHEN v.kind <> 'pending' THEN pg_notify({channel}, json_build_object(
            'id', {o_id}, 'outcome', v.kind, 'reference', {o_ref},
            'externalStatus', {o_external_status}, 'status', {o_status})::text)::text
        END AS announced
)
SELECT written.id, written.kind FROM written;
END
"""
    ).format(
        params=sql.SQL(",\n                 ").join(params),
        table=sql.Identifier(layout.schema, layout.table),
        sets=sql.SQL(",\n        ").join(sets),
        o_id=col(c.id),
        o_ref=col(c.provider_ref),
        o_provider_id=col(c.provider_id),
        kinds=sql.SQL(", ").join(sql.Literal(k) for k in WRITE_KINDS),
        in_flight=in_flight_predicate(layout, "o"),
        o_external_status=col(c.external_status),
        o_status=col(c.status),
        channel=sql.Literal(layout.result_channel),
    )
    return body.as_string(None)


def write_function_statement(layout: Layout, writes: OutcomeWrites) -> Statement:
    n = Names(layout)
    params = sql.SQL(",\n    ").join(
        sql.SQL("{name} {type}").format(name=sql.SQL(name), type=sql.SQL(type_))
        for name, type_ in WRITE_PARAMETERS
    )
    return Statement(
        "The daemon's only way to write: one call applies a batch of results, each\n"
        "guarded (same reference and provider, row still in flight), and announces\n"
        "the finished ones on the result channel in the same transaction.\n"
        "SECURITY DEFINER: it runs with the rights of its owner (install as the\n"
        "table's owner, not as a superuser), so the daemon's role needs no UPDATE\n"
        "on the table and cannot touch a row that is not in flight. What each\n"
        "outcome writes is fixed here, from the settings at install time.",
        sql.SQL(
            "CREATE OR REPLACE FUNCTION {function}(\n    {params}\n)"
            " RETURNS TABLE (order_id uuid, outcome text)\n"
            "    LANGUAGE plpgsql\n"
            "    SECURITY DEFINER\n"
            "    SET search_path = pg_catalog, pg_temp\n"
            "AS {body}"
        ).format(
            function=n.write_function,
            params=params,
            body=_dollar_quoted(write_function_body(layout, writes)),
        ),
    )


# --- install / uninstall -------------------------------------------------------------


def notify_function_body(layout: Layout) -> str:
    """The trigger function's plpgsql body: NOTIFY, or the inbox while the daemon is busy."""
    n = Names(layout)
    return (
        sql.SQL(
            "\nBEGIN\n"
            "    -- The daemon holds this lock (exclusively, for its session) while it\n"
            "    -- wants a NOTIFY per order: the shared try then fails at once, never\n"
            "    -- waits. While it does not hold it (busy, or not running), every\n"
            "    -- order goes to the inbox instead, and this transaction keeps the\n"
            "    -- shared lock until it ends: the daemon cannot take the lock back, and\n"
            "    -- so cannot stop reading the inbox, before this row is committed.\n"
            "    IF pg_try_advisory_xact_lock_shared({key}) THEN\n"
            "        INSERT INTO {inbox} (order_id) VALUES (NEW.{id});\n"
            "    ELSE\n"
            "        -- The payload is the id alone: far below NOTIFY's 8000-byte\n"
            "        -- limit, and the daemon reads the committed row itself.\n"
            "        PERFORM pg_notify(TG_ARGV[0], NEW.{id}::text);\n"
            "    END IF;\n"
            "    RETURN NULL;\n"
            "END\n"
        )
        .format(
            key=sql.Literal(idle_lock_key(layout)),
            inbox=n.inbox,
            id=sql.Identifier(layout.columns.id),
        )
        .as_string(None)
    )


def install_statements(layout: Layout, writes: OutcomeWrites | None = None) -> list[Statement]:
    n = Names(layout)
    c = layout.columns
    channel = sql.Literal(layout.channel)
    return [
        Statement(
            "Fail fast instead of queueing the application's writes behind us if the\n"
            "table is busy: re-run later when this times out.",
            sql.SQL("SET lock_timeout = '5s'"),
        ),
        Statement(
            "The provider's reference for an order. Nullable and without a default,\n"
            "so adding it changes only the catalog: no table rewrite.",
            sql.SQL("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {ref} varchar(255)").format(
                table=n.table, ref=sql.Identifier(c.provider_ref)
            ),
        ),
        Statement(
            "The sweep's index: only orders in flight, keyed by id for keyset\n"
            "pagination. Small (finished orders leave it) and built CONCURRENTLY, so\n"
            "the application keeps writing while it builds. If a build is interrupted\n"
            "it leaves an INVALID index: DROP INDEX CONCURRENTLY it and run this again\n"
            "(`order-monitor doctor` reports it).",
            sql.SQL(
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON {table} ({id})\n"
                "    WHERE {predicate}"
            ).format(
                index=sql.Identifier(n.index_name),
                table=n.table,
                id=sql.Identifier(c.id),
                predicate=in_flight_predicate(layout),
            ),
        ),
        Statement(
            "Why not a NOTIFY per order: a transaction that has NOTIFYed takes one\n"
            "lock for the whole cluster at COMMIT and holds it through its WAL flush,\n"
            "so notifying commits run one at a time and lose group commit (pgbench\n"
            "on 2 cores: a quarter of the application's dispatch throughput). So the\n"
            "trigger NOTIFYs only while the daemon is idle enough to want it; while\n"
            "it is busy, order ids wait here and the daemon reads them every few\n"
            "milliseconds, and the application's commits take no lock of ours.\n"
            "UNLOGGED: no WAL for the application to write; after a crash it is\n"
            "empty, and the daemon sweeps the whole table on every reconnect anyway.\n"
            "No index: the daemon takes whatever is here, oldest pages first.",
            sql.SQL(
                "CREATE UNLOGGED TABLE IF NOT EXISTS {inbox} (\n"
                "    order_id uuid NOT NULL,\n"
                "    queued_at timestamptz NOT NULL DEFAULT now()\n"
                ")"
            ).format(inbox=n.inbox),
            replayable=False,
        ),
        Statement(
            "Announces an order: by NOTIFY on the channel named by the trigger's\n"
            "argument while the daemon holds its idle lock, else through the inbox.\n"
            "Either way the daemon sees the order only once it is committed.\n"
            "SECURITY DEFINER: the application's roles need no grant on the inbox.",
            sql.SQL(
                "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger\n"
                "    LANGUAGE plpgsql\n"
                "    SECURITY DEFINER\n"
                "    SET search_path = pg_catalog, pg_temp\n"
                "AS {body}"
            ).format(function=n.function, body=_dollar_quoted(notify_function_body(layout))),
        ),
        Statement(
            "The triggers are swapped in one transaction: every application commit\n"
            "sees either the version 1 triggers or these, never both, never neither.",
            sql.SQL("BEGIN"),
            replayable=False,
        ),
        Statement(
            "A new row that is already in flight (it has a provider reference).",
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {trigger}\n"
                "    AFTER INSERT ON {table}\n"
                "    FOR EACH ROW\n"
                "    WHEN ({new_in_flight})\n"
                "    EXECUTE FUNCTION {function}({channel})"
            ).format(
                trigger=sql.Identifier(n.insert_trigger_name),
                table=n.table,
                new_in_flight=in_flight_predicate(layout, "NEW"),
                function=n.function,
                channel=channel,
            ),
        ),
        Statement(
            "A row that becomes in flight, or gets a new provider reference while in\n"
            "flight. Every other update (including the daemon's own result writes,\n"
            "which take the row out of flight) is kept out by UPDATE OF and WHEN,\n"
            "so it costs the application nothing.",
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {trigger}\n"
                "    AFTER UPDATE OF {ref}, {external_status}, {status} ON {table}\n"
                "    FOR EACH ROW\n"
                "    WHEN ({new_in_flight}\n"
                "          AND (OLD.{ref} IS DISTINCT FROM NEW.{ref}\n"
                "               OR NOT coalesce({old_in_flight}, false)))\n"
                "    EXECUTE FUNCTION {function}({channel})"
            ).format(
                trigger=sql.Identifier(n.update_trigger_name),
                ref=sql.Identifier(c.provider_ref),
                external_status=sql.Identifier(c.external_status),
                status=sql.Identifier(c.status),
                table=n.table,
                new_in_flight=in_flight_predicate(layout, "NEW"),
                old_in_flight=in_flight_predicate(layout, "OLD"),
                function=n.function,
                channel=channel,
            ),
        ),
        Statement(
            "Version 1's triggers, which NOTIFYed for every order.",
            sql.SQL("DROP TRIGGER IF EXISTS {trigger} ON {table}").format(
                trigger=sql.Identifier(n.v1_insert_trigger_name), table=n.table
            ),
        ),
        Statement(
            "",
            sql.SQL("DROP TRIGGER IF EXISTS {trigger} ON {table}").format(
                trigger=sql.Identifier(n.v1_update_trigger_name), table=n.table
            ),
        ),
        Statement("", sql.SQL("COMMIT"), replayable=False),
        Statement(
            "Version 1's trigger function: no trigger uses it any more.",
            sql.SQL("DROP FUNCTION IF EXISTS {function}()").format(function=n.v1_function),
        ),
        write_function_statement(layout, writes or OutcomeWrites()),
        Statement(
            "Functions are executable by PUBLIC by default: this one only by the\n"
            "roles granted it (sql/role.sql).",
            sql.SQL("REVOKE ALL ON FUNCTION {function}({signature}) FROM PUBLIC").format(
                function=n.write_function, signature=write_signature()
            ),
        ),
        Statement("", sql.SQL("RESET lock_timeout")),
    ]


def uninstall_statements(layout: Layout) -> list[Statement]:
    n = Names(layout)

    def drop_trigger(name: str) -> sql.Composed:
        return sql.SQL("DROP TRIGGER IF EXISTS {trigger} ON {table}").format(
            trigger=sql.Identifier(name), table=n.table
        )

    return [
        Statement("See install.sql.", sql.SQL("SET lock_timeout = '5s'")),
        Statement(
            "Triggers first, this version's and version 1's: from here on the\n"
            "application's writes announce nothing.",
            drop_trigger(n.insert_trigger_name),
        ),
        Statement("", drop_trigger(n.update_trigger_name)),
        Statement("", drop_trigger(n.v1_insert_trigger_name)),
        Statement("", drop_trigger(n.v1_update_trigger_name)),
        Statement(
            "",
            sql.SQL("DROP FUNCTION IF EXISTS {function}()").format(function=n.function),
        ),
        Statement(
            "",
            sql.SQL("DROP FUNCTION IF EXISTS {function}()").format(function=n.v1_function),
        ),
        Statement(
            "Order ids still waiting in it are orders in flight: the table keeps them\n"
            "and the partial index finds them.",
            sql.SQL("DROP TABLE IF EXISTS {inbox}").format(inbox=n.inbox),
        ),
        Statement(
            "From here on the daemon cannot write results.",
            sql.SQL("DROP FUNCTION IF EXISTS {function}({signature})").format(
                function=n.write_function, signature=write_signature()
            ),
        ),
        Statement(
            "CONCURRENTLY: dropping the index does not block the application's writes.",
            sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {index}").format(index=n.index),
        ),
        Statement(
            "The provider reference column and every row stay: they are the\n"
            "application's data now.",
            sql.SQL("RESET lock_timeout"),
        ),
    ]


def role_statements(layout: Layout) -> list[Statement]:
    n = Names(layout)
    c = layout.columns
    create_role = sql.SQL(
        "\nBEGIN\n"
        "    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = {name}) THEN\n"
        "        CREATE ROLE {role} LOGIN;\n"
        "    END IF;\n"
        "    EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), {name});\n"
        "END\n"
    ).format(name=sql.Literal(layout.role), role=n.role)
    return [
        Statement(
            "A login role for the daemon, created once. Give it a password or a\n"
            "certificate yourself (ALTER ROLE ... PASSWORD), outside this file.",
            sql.SQL("DO {body}").format(body=_dollar_quoted(create_role.as_string(None))),
        ),
        Statement(
            "",
            sql.SQL("GRANT USAGE ON SCHEMA {schema} TO {role}").format(
                schema=sql.Identifier(layout.schema), role=n.role
            ),
        ),
        Statement(
            "Start from nothing on the table (this also takes back what an older\n"
            "release granted: UPDATE on columns, SELECT on the PIN).",
            sql.SQL("REVOKE ALL ON TABLE {table} FROM {role}").format(table=n.table, role=n.role),
        ),
        Statement(
            "Read: only the columns the daemon looks at. Not the PIN, the provider's\n"
            "message or the duration: it writes those, and never needs to see them.",
            sql.SQL("GRANT SELECT ({columns}) ON TABLE {table} TO {role}").format(
                columns=sql.SQL(", ").join(sql.Identifier(x) for x in c.read()),
                table=n.table,
                role=n.role,
            ),
        ),
        Statement(
            "Write: only through the write function (install.sql), which writes\n"
            "nothing but results into rows still in flight. No UPDATE, INSERT or\n"
            "DELETE on the table itself.",
            sql.SQL("GRANT EXECUTE ON FUNCTION {function}({signature}) TO {role}").format(
                function=n.write_function, signature=write_signature(), role=n.role
            ),
        ),
        Statement(
            "The inbox (install.sql): the daemon takes the order ids the trigger left\n"
            "there while it was busy. DELETE needs SELECT to find the rows it takes.",
            sql.SQL("GRANT SELECT, DELETE ON TABLE {inbox} TO {role}").format(
                inbox=n.inbox, role=n.role
            ),
        ),
    ]


# --- files -----------------------------------------------------------------------------

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
